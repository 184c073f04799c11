"""The write-ahead log: framing, segments, group commit, and the failure mode.

Every record (records.py) is framed ``[length u32][crc32 u32][payload]``
(little endian; payload = the record as JSON). All records appended during
one event-loop turn are written with one ``write``; under ``fsync=always``
one ``fsync`` covers them all before ``durable`` moves past them and their
answers go out. On a fast disk the loop fsyncs itself (commands arriving
meanwhile wait in the socket buffers and form the next group); once fsyncs
take longer (``INLINE_FSYNC_BELOW``) they move to a worker thread, so the
loop keeps serving reads and taking the next group while the disk works.
``everysec`` makes them durable for answering at the ``write`` and fsyncs
once a second; ``never`` leaves syncing to the OS.

A failed write or fsync (ENOSPC, EIO, …) puts the log in the failed state:
it refuses further appends with ``StorageFailed`` and calls ``on_failure``
so the node can answer what it could not persist with an error and reload
its state from what is on disk. All file access goes through ``Files`` so
tests can inject errors at the file layer.

Must not: know the engine, or reply to anyone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import orjson
from mypy_extensions import mypyc_attr

from shardq.errors import StorageFailed

from . import records as R
from .jobs import kept_json

log = logging.getLogger("shardq_node.wal")

HEADER = struct.Struct("<II")
MAX_RECORD = 1 << 30
SEGMENT_SUFFIX = ".wal"
#: mean fsync time below which the loop fsyncs itself instead of a worker thread: the
#: thread hand-off costs two cross-thread wake-ups (~0.1-0.2 ms on a small VM)
INLINE_FSYNC_BELOW = 0.001


@mypyc_attr(allow_interpreted_subclasses=True)  # the tests' faulty disk is a subclass
class Files:
    """The file operations the log uses; subclass to inject faults in tests."""

    def open_write(self, path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)

    def write(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n

    def prepare(self, path: str, size: int) -> None:
        """A file of ``size`` zero bytes, on disk (overwriting it later needs no metadata
        change, so an fsync of the log is a data-only flush: about half the time here)."""
        tmp = path + ".part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            zeros = bytes(min(size, 1 << 20))
            left = size
            while left > 0:
                n = os.write(fd, zeros[: min(left, len(zeros))])
                left -= n
            os.fsync(fd)
        except BaseException:
            os.unlink(tmp)  # a full disk: no spare, and no half file taking space
            raise
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def fsync(self, fd: int) -> None:
        os.fdatasync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def truncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()


def _raw(value: Any) -> Any:
    if type(value) is bytes:
        return orjson.Fragment(value)
    raise TypeError(f"cannot log {type(value).__name__}")


def frame(rec: R.Record) -> bytes:
    payload = orjson.dumps(rec, default=_raw)
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


#: The first byte of a packed record's payload (JSON starts with ``[``): a snapshot's CJOBS
#: (records.py), whose last element is binary, after its JSON head and a newline.
PACKED = b"\x01"


def frame_packed(rec: R.Record) -> bytes:
    """A record whose last element is a binary body (bytes): ``0x01``, the JSON of the rest,
    ``\n``, the body; ``decode`` gives back the same record."""
    payload = b"".join((PACKED, orjson.dumps(rec[:-1]), b"\n", rec[-1]))
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def frames(recs: list[R.Record]) -> bytes:
    dumps = orjson.dumps
    pack = HEADER.pack
    crc = zlib.crc32
    parts = []
    for rec in recs:
        payload = dumps(rec, default=_raw)
        parts.append(pack(len(payload), crc(payload)))
        parts.append(payload)
    return b"".join(parts)


def _quietly(fut: asyncio.Future[None]) -> None:
    """A spare segment that could not be prepared (full disk, a restart): no spare, then."""
    exc = fut.exception()
    if exc is not None:
        log.debug("no spare WAL segment: %s", exc)


class Torn(Exception):
    """Where reading stopped: the offset of the first bad record and why."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"{reason} at byte {offset}")
        self.offset = offset
        self.reason = reason


def read_frames(data: bytes, limit: int | None = None) -> Iterator[tuple[int, bytes]]:
    """Yield (end offset, payload) of each whole, intact record; raise Torn at the first bad one."""
    end = len(data) if limit is None else min(limit, len(data))
    pos = 0
    unpack = HEADER.unpack_from
    while pos < end:
        if end - pos < HEADER.size:
            if not any(data[pos:end]):  # the zeros of a preallocated segment's last bytes
                return
            raise Torn(pos, "torn record header")
        length, crc = unpack(data, pos)
        if length == 0 and crc == 0:  # the zeros of a preallocated segment: the end
            return
        start = pos + HEADER.size
        if length > MAX_RECORD or start + length > end:
            raise Torn(pos, "torn record")
        payload = data[start : start + length]
        if zlib.crc32(payload) != crc:
            raise Torn(pos, "record checksum mismatch")
        pos = start + length
        yield pos, payload


_data = kept_json


def _opt(value: Any) -> bytes | None:
    return None if value is None else kept_json(value)


def decode(payload: bytes) -> R.Record:
    """A record from its payload, with payloads turned back into raw JSON bytes."""
    if payload[:1] == PACKED:
        head, _, body = payload[1:].partition(b"\n")
        packed = orjson.loads(head)
        if type(packed) is not list or not packed or type(packed[0]) is not int:
            raise ValueError("record is not a typed array")
        packed.append(body)
        return packed
    rec = orjson.loads(payload)
    if type(rec) is not list or not rec or type(rec[0]) is not int:
        raise ValueError("record is not a typed array")
    kind = rec[0]
    if kind == R.PUSH:
        for row in rec[3]:
            if not row[10]:
                row[1] = _data(row[1])
    elif kind == R.ACK and rec[3] is not None:
        rec[3] = [_opt(r) for r in rec[3]]
    elif kind == R.CRON:
        rec[3]["data"] = _data(rec[3]["data"])
    elif kind == R.CRONFIRE:
        for row in rec[5]:
            row[1] = _data(row[1])
    elif kind == R.JOB:
        if not rec[3][18]:
            rec[3][1] = _data(rec[3][1])
    elif kind == R.FINISHED:
        rec[4] = _opt(rec[4])
    return rec


def segment_name(number: int) -> str:
    return f"{number:08d}{SEGMENT_SUFFIX}"


def list_segments(directory: str) -> list[int]:
    out = []
    for name in os.listdir(directory):
        if name.endswith(SEGMENT_SUFFIX) and name[: -len(SEGMENT_SUFFIX)].isdigit():
            out.append(int(name[: -len(SEGMENT_SUFFIX)]))
    return sorted(out)


class Wal:
    """The node's log: append records, make them durable in groups, rotate segments."""

    def __init__(
        self,
        directory: str,
        fsync: str = "always",
        segment_bytes: int = 64 * 1024 * 1024,
        files: Files | None = None,
        group_commit: bool = True,
        preallocate: bool = True,
    ) -> None:
        self.dir = directory
        self.group_commit = group_commit
        self.preallocate = preallocate
        self._spare: tuple[int, str, asyncio.Future[None]] | None = None
        self.policy = fsync
        self.segment_bytes = segment_bytes
        self.files = files or Files()
        #: Log positions (LSNs): the last record appended, handed to write(), and known to
        #: be on stable storage (answerable). Recovery sets all three to the log's end.
        self.seq = 0
        self.written = 0
        self.durable = 0
        #: segment number -> LSN of its first record (what recovery and rotation saw)
        self.bases: dict[int, int] = {}
        #: LSNs a follower's catch-up is reading from: their segments outlive snapshots
        self.pins: list[int] = []
        self.failed: str | None = None
        self.closing = False
        self.segment = 0
        self.fd = -1
        self.segment_size = 0
        #: (segment, size): everything before this point is on stable storage
        self.durable_pos = (0, 0)
        self.bytes_since_snapshot = 0
        self._buffer: list[bytes] = []
        self._flush_scheduled = False
        self._syncing = False
        self._sync_again = False
        self._everysec: asyncio.TimerHandle | None = None
        self.on_durable: Callable[[], None] = lambda: None
        self.on_failure: Callable[[str], None] = lambda reason: None
        self.on_flushed: Callable[[], None] = lambda: None
        #: Called with (first LSN, last LSN, frames) right after frames are written, before
        #: they are synced: replication ships them to followers meanwhile (replication.py).
        self.on_written: Callable[[int, int, bytes], None] | None = None
        self.extra_fsync: list[int] = []  # blob files to fsync with the next group
        self.observe_fsync: Callable[[float], None] = lambda seconds: None
        # metrics
        self.appends = 0
        self.bytes_written = 0
        self.fsyncs = 0
        self.fsync_seconds: list[float] = []
        #: moving mean of fsync times: below INLINE_FSYNC_BELOW the loop fsyncs itself
        self.fsync_ewma = 0.0

    # -- segments -------------------------------------------------------------------------------

    def open_segment(self, number: int) -> None:
        """Start writing segment ``number`` (a new one), preallocated when a spare is ready."""
        self._retire()
        path = os.path.join(self.dir, segment_name(number))
        spare = self._take_spare(number)
        if spare is not None:
            os.replace(spare, path)
        self.fd = self.files.open_write(path)
        self.segment = number
        self.segment_size = 0
        self.bases[number] = self.written + 1
        if self.durable == self.written:
            self.durable_pos = (number, 0)
        self.files.fsync_dir(self.dir)
        self._prepare_spare(number + 1)

    def _prepare_spare(self, number: int) -> None:
        """Zero-fill the next segment in a worker thread, ahead of need."""
        if not self.preallocate:
            return
        path = os.path.join(self.dir, segment_name(number) + ".spare")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not serving (tests, tools): segments are just appended to
        fut = loop.run_in_executor(None, self.files.prepare, path, self.segment_bytes)
        fut.add_done_callback(_quietly)
        self._spare = (number, path, fut)

    def _take_spare(self, number: int) -> str | None:
        spare, self._spare = self._spare, None
        if spare is None:
            return None
        n, path, fut = spare
        if n == number and fut.done() and fut.exception() is None and os.path.exists(path):
            return path  # (a reload after a storage failure removes spares)
        if fut.done() and os.path.exists(path):
            os.unlink(path)
        return None

    def rotate(self) -> int:
        """Start the next segment; returns its number. Call with nothing buffered. A segment
        that cannot be opened (ENOSPC, EMFILE) fails the log like a failed write."""
        try:
            self.open_segment(self.segment + 1)
        except OSError as exc:
            self._fail(f"new WAL segment failed: {exc.strerror or exc}")
        return self.segment

    def _retire(self) -> None:
        """Hand the current segment's fd to the next group sync (which fsyncs and closes it)."""
        old = self.fd
        self.fd = -1
        if old < 0:
            return
        if self.policy == "always" and self.failed is None:
            self.extra_fsync.append(old)
            return
        try:
            if self.failed is None:
                self.files.fsync(old)
        finally:
            self.files.close(old)

    def close(self) -> None:
        self.closing = True
        if self._everysec is not None:
            self._everysec.cancel()
        if self.fd >= 0:
            try:
                if not self.failed:
                    self.flush_now()
                    for fd in [*self.extra_fsync, self.fd]:
                        self.files.fsync(fd)
            except OSError as exc:
                log.error("final fsync failed: %s", exc)
            for fd in [*self.extra_fsync, self.fd]:
                try:
                    self.files.close(fd)
                except OSError:
                    pass
            self.extra_fsync = []
            self.fd = -1

    # -- appending -------------------------------------------------------------------------------

    def writable(self) -> None:
        if self.failed is not None:
            raise StorageFailed(self.failed)

    def pinned(self) -> set[int]:
        """Segments a follower's catch-up still reads (a snapshot must not delete them)."""
        if not self.pins:
            return set()
        low = min(self.pins)
        keep = {n for n, base in self.bases.items() if base > low}
        older = [n for n, base in self.bases.items() if base <= low]
        if older:
            keep.add(max(older))
        return keep

    def append(self, recs: list[R.Record]) -> None:
        self.append_raw(frames(recs), len(recs))

    def append_raw(self, data: bytes, count: int) -> None:
        """Append ``count`` records already framed (a follower's copy of its primary's)."""
        if self.failed is not None:
            raise StorageFailed(self.failed)
        self._buffer.append(data)
        self.seq += count
        self.appends += count
        if not self.group_commit:
            self.sync_now()
            if self.failed is None:
                self.on_durable()
            return
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self.flush_now()

    def flush_now(self) -> None:
        """Write everything buffered with one write(), then sync per policy."""
        if not self._buffer or self.failed is not None:
            return
        data = b"".join(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        self._buffer = []
        target = self.seq
        first = self.written + 1
        try:
            self.files.pwrite(self.fd, data, self.segment_size)
        except OSError as exc:
            self._fail(f"write to WAL failed: {exc.strerror or exc}")
            return
        self.written = target
        if self.on_written is not None:
            self.on_written(first, target, data)
        self.segment_size += len(data)
        self.bytes_written += len(data)
        self.bytes_since_snapshot += len(data)
        if self.segment_size >= self.segment_bytes:
            self.rotate()
        if self.policy == "always":
            self._start_sync()
        else:
            self.durable = target
            self.durable_pos = (self.segment, self.segment_size)
            self.on_durable()
            if self.policy == "everysec" and self._everysec is None:
                loop = asyncio.get_running_loop()
                self._everysec = loop.call_later(1.0, self._sync_everysec)
        self.on_flushed()

    def _start_sync(self) -> None:
        if self.closing:  # close() fsyncs and closes everything itself
            return
        if self._syncing:
            self._sync_again = True
            return
        target, pos = self.written, (self.segment, self.segment_size)
        files = self.extra_fsync
        self.extra_fsync = []
        if not files and self.fsync_ewma < INLINE_FSYNC_BELOW:
            # A fast disk: fsync right here. Handing a ~0.1 ms fsync to a thread costs more
            # (two cross-thread wake-ups) than the fsync; the commands that arrive meanwhile
            # wait in the socket buffers and form the next group. Blob files and a retired
            # segment (megabytes to write back) always go to the thread.
            try:
                seconds = self._sync_blocking(self.fd, files)
            except OSError as exc:
                self._fail(f"fsync of WAL failed: {exc.strerror or exc}")
                return
            self._sync_done(seconds, target, pos)
            return
        self._syncing = True
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, self._sync_blocking, self.fd, files)
        fut.add_done_callback(lambda f: self._synced(f, target, pos))

    def _sync_blocking(self, fd: int, files: list[int]) -> float:
        started = time.perf_counter()
        try:
            for blob_fd in files:
                self.files.fsync(blob_fd)
            self.files.fsync(fd)
        finally:  # closed whether or not their fsync worked: nobody else holds them
            for blob_fd in files:
                try:
                    self.files.close(blob_fd)
                except OSError:
                    pass
        return time.perf_counter() - started

    def _synced(self, fut: asyncio.Future[float], target: int, pos: tuple[int, int]) -> None:
        self._syncing = False
        exc = fut.exception()  # retrieved even when ignored below
        if self.closing or self.failed is not None:  # a failed write already cut `durable`
            return
        if exc is not None:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self._fail(f"fsync of WAL failed: {reason}")
            return
        self._sync_done(fut.result(), target, pos)
        if self._sync_again or self.written > self.durable:
            self._sync_again = False
            self._start_sync()

    def _sync_done(self, seconds: float, target: int, pos: tuple[int, int]) -> None:
        self.fsyncs += 1
        self._note_fsync(seconds)
        if target > self.durable:
            self.durable = target
            self.durable_pos = pos
            self.on_durable()

    def _note_fsync(self, seconds: float) -> None:
        self.fsync_ewma += (seconds - self.fsync_ewma) * 0.2
        self.observe_fsync(seconds)
        self.fsync_seconds.append(seconds)
        if len(self.fsync_seconds) > 4096:
            del self.fsync_seconds[:2048]

    def _sync_everysec(self) -> None:
        self._everysec = None
        if self.failed is not None or self.fd < 0:
            return
        loop = asyncio.get_running_loop()
        files = self.extra_fsync
        self.extra_fsync = []
        fut = loop.run_in_executor(None, self._sync_blocking, self.fd, files)

        def done(f: asyncio.Future[float]) -> None:
            if self.closing:
                return
            if f.exception() is not None:
                self._fail(f"fsync of WAL failed: {f.exception()}")
            else:
                self.fsyncs += 1
                self._note_fsync(f.result())

        fut.add_done_callback(done)

    def fail(self, reason: str) -> None:
        """A write outside the log failed (the blob store): fail as if the log's had."""
        self._fail(reason)

    def _fail(self, reason: str) -> None:
        if self.failed is not None:
            return
        self.failed = reason
        self._buffer = []
        self.seq = self.written = self.durable  # what was not persisted does not count
        log.error("storage failed, refusing writes: %s", reason)
        self.on_failure(reason)

    def sync_now(self) -> None:
        """Blocking write + fsync of everything (no group commit)."""
        data = b"".join(self._buffer)
        self._buffer = []
        try:
            self.files.pwrite(self.fd, data, self.segment_size)
            self.files.fsync(self.fd)
        except OSError as exc:
            self._fail(f"WAL write failed: {exc.strerror or exc}")
            return
        self.written = self.durable = self.seq
        self.segment_size += len(data)
        self.bytes_written += len(data)
        self.bytes_since_snapshot += len(data)
        self.fsyncs += 1
        self.durable_pos = (self.segment, self.segment_size)

    def try_recover(self) -> bool:
        """After a failure, once the node reloaded what is durable (which cut the log back to
        ``durable_pos``): start a fresh segment and accept writes again."""
        if self.failed is None:
            return True
        try:
            for fd in self.extra_fsync:
                self.files.close(fd)
            self.extra_fsync = []
            if self.fd >= 0:
                self.files.close(self.fd)
                self.fd = -1
            self.seq = self.written = self.durable
            self.open_segment(self.segment + 1)
            self.files.fsync(self.fd)
        except OSError as exc:
            log.warning("storage still failing: %s", exc)
            return False
        log.info("storage works again; accepting writes")
        self.failed = None
        return True
