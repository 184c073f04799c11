"""A node's data directory: recovery, snapshots, and where the WAL and blobs live.

Layout of ``data_dir``::

    wal/00000007.wal            WAL segments (records.py), appended in order
    snapshot-00000007.snap      state before segment 7 (records.py, snapshot format)
    blobs/XX/<id>.json          payloads in the blob store (blobs.py)

Recovery = newest valid snapshot + replay of the segments from its number on,
stopping at the first torn or corrupt record (that segment is cut there and
later segments are set aside as ``.corrupt``, so nothing appended later can
hide behind the damage). Snapshots are written by a forked child from a
copy-on-write image of the engine: the node only pauses for the fork.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shardq.errors import StorageFailed

from . import records as R
from .blobs import BlobStore
from .jobs import BlobRef
from .snapshot import dump
from .wal import (
    HEADER,
    Files,
    Torn,
    Wal,
    decode,
    frame,
    frame_packed,
    list_segments,
    read_frames,
    segment_name,
)

if TYPE_CHECKING:
    from .engine import Engine
    from .settings import StorageSettings

log = logging.getLogger("shardq_node.storage")

SNAP_PREFIX = "snapshot-"
SNAP_SUFFIX = ".snap"


@dataclass
class Recovery:
    """What recovery found (logged, and shown in tests and benchmarks)."""

    snapshot: str | None = None
    snapshot_records: int = 0
    #: the log position (LSN) the snapshot's state is at, and the last record's after replay
    snapshot_lsn: int = 0
    lsn: int = 0
    replayed: int = 0
    segments: list[int] = field(default_factory=list)
    torn: str | None = None
    released: int = 0
    seconds: float = 0.0


class CorruptSnapshot(Exception):
    pass


def snapshot_name(number: int) -> str:
    return f"{SNAP_PREFIX}{number:08d}{SNAP_SUFFIX}"


def list_snapshots(directory: str) -> list[int]:
    out = []
    for name in os.listdir(directory):
        if name.startswith(SNAP_PREFIX) and name.endswith(SNAP_SUFFIX):
            digits = name[len(SNAP_PREFIX) : -len(SNAP_SUFFIX)]
            if digits.isdigit():
                out.append(int(digits))
    return sorted(out)


def write_snapshot(engine: Engine, path: str, wal_segment: int, lsn: int = 0) -> int:
    """Write the engine's state (at log position ``lsn``) to ``path`` and fsync it; returns the
    record count."""
    count = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        begin = (R.SNAP_BEGIN, engine.clock(), R.SNAPSHOT_FORMAT, wal_segment, lsn)
        buf: list[bytes] = [frame(begin)]
        size = 0
        for rec in dump(engine):
            data = frame_packed(rec) if rec[0] == R.CJOBS else frame(rec)
            buf.append(data)
            size += len(data)
            count += 1
            if size > 1 << 20:
                os.write(fd, b"".join(buf))
                buf, size = [], 0
        buf.append(frame((R.SNAP_END, engine.clock(), count)))
        os.write(fd, b"".join(buf))
        os.fsync(fd)
    finally:
        os.close(fd)
    return count


def snapshot_lsn(data: bytes) -> int:
    """The log position a snapshot's state is at (0 for a format 1 snapshot)."""
    for _, payload in read_frames(data[: 1 << 16]):
        rec = decode(payload)
        return int(rec[4]) if rec[0] == R.SNAP_BEGIN and len(rec) > 4 else 0
    return 0


def load_snapshot(engine: Engine, data: bytes) -> int:
    """Apply a whole snapshot to an empty engine; CorruptSnapshot if it is not whole."""
    count = 0
    ended = False
    try:
        for i, (_, payload) in enumerate(read_frames(data)):
            rec = decode(payload)
            if i == 0:
                if rec[0] != R.SNAP_BEGIN:
                    raise CorruptSnapshot("does not start with SNAP_BEGIN")
                continue
            if rec[0] == R.SNAP_END:
                if rec[2] != count:
                    raise CorruptSnapshot(f"SNAP_END counts {rec[2]} records, found {count}")
                ended = True
                break
            engine.apply(rec)
            count += 1
    except Torn as exc:
        raise CorruptSnapshot(str(exc)) from None
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise CorruptSnapshot(f"bad record: {exc!r}") from None
    if not ended:
        raise CorruptSnapshot("no SNAP_END")
    return count


def _die_with_parent() -> None:
    """Linux: the snapshot child gets SIGKILL when the node dies (no orphan writers)."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Storage:
    """Owns the WAL, the blob store and the snapshots of one data directory."""

    def __init__(self, settings: StorageSettings, files: Files | None = None) -> None:
        assert settings.data_dir is not None
        self.settings = settings
        self.files = files or Files()
        self.dir = settings.data_dir
        self.wal_dir = os.path.join(self.dir, "wal")
        os.makedirs(self.wal_dir, exist_ok=True)
        self.blobs = BlobStore(os.path.join(self.dir, "blobs"), self.files)
        self.wal = Wal(self.wal_dir, settings.fsync, settings.segment_bytes, self.files,
                       settings.group_commit)
        self._snap: tuple[int, int, str, int, float] | None = None
        self._poll: asyncio.TimerHandle | None = None
        self.last_snapshot_pause = 0.0
        self.last_snapshot_seconds = 0.0
        self.snapshots_written = 0
        self.last_snapshot_at = 0.0

    # -- recovery ---------------------------------------------------------------------------------

    def recover(
        self, engine: Engine, open_wal: bool = True, stop_at: tuple[int, int] | None = None
    ) -> Recovery:
        """Rebuild ``engine`` from disk; ``stop_at`` = (segment, size): trust nothing after it
        (the storage-failure reload: what lies beyond was answered with an error)."""
        started = time.perf_counter()
        report = Recovery()
        engine.emitting = False
        for name in os.listdir(self.dir):
            if name.endswith(".tmp"):  # a snapshot that was never finished
                os.unlink(os.path.join(self.dir, name))
        for name in os.listdir(self.wal_dir):
            if name.endswith((".spare", ".part")):  # a segment prepared ahead, unused
                os.unlink(os.path.join(self.wal_dir, name))
        first_segment = self._load_newest_snapshot(engine, report)
        report.lsn = report.snapshot_lsn
        self.wal.bases = {}
        segments = [n for n in list_segments(self.wal_dir) if n >= first_segment]
        if stop_at is not None:
            for number in [n for n in segments if n > stop_at[0]]:
                path = os.path.join(self.wal_dir, segment_name(number))
                os.replace(path, path + ".failed")
                log.warning("WAL segment %s held only writes that failed; set aside", number)
            segments = [n for n in segments if n <= stop_at[0]]
        for i, number in enumerate(segments):
            seg_limit = stop_at[1] if (stop_at is not None and number == stop_at[0]) else None
            if not self._replay_segment(engine, number, report, seg_limit):
                for later in segments[i + 1 :]:
                    path = os.path.join(self.wal_dir, segment_name(later))
                    os.replace(path, path + ".corrupt")
                    log.error("WAL segment %s set aside after the damage before it", later)
                break
        engine.timers.compact()
        engine.deps.rebuild()
        engine.emitting = True
        engine.journal.clear()
        engine.events.clear()
        keep = {jid for jid, job in engine.jobs.items() if type(job.data) is BlobRef}
        removed = self.blobs.scan(keep)
        if removed:
            log.info("removed %d blob files of finished jobs", removed)
        if open_wal:
            last = max(segments[-1] if segments else 0, first_segment)
            wal = self.wal
            wal.seq = wal.written = wal.durable = report.lsn
            wal.open_segment(last + 1)
        report.seconds = time.perf_counter() - started
        return report

    def _load_newest_snapshot(self, engine: Engine, report: Recovery) -> int:
        for number in reversed(list_snapshots(self.dir)):
            path = os.path.join(self.dir, snapshot_name(number))
            try:
                data = self.files.read(path)
                report.snapshot_records = load_snapshot(engine, data)
                report.snapshot_lsn = snapshot_lsn(data)
            except CorruptSnapshot as exc:
                log.error("snapshot %s unusable (%s); trying an older one", path, exc)
                engine.__init__(engine.clock, engine.config)  # type: ignore[misc]
                engine.emitting = False
                continue
            report.snapshot = path
            return number
        return 0

    def _replay_segment(
        self, engine: Engine, number: int, report: Recovery, limit: int | None
    ) -> bool:
        path = os.path.join(self.wal_dir, segment_name(number))
        data = self.files.read(path)
        report.segments.append(number)
        self.wal.bases[number] = report.lsn + 1
        good = 0
        try:
            for end, payload in read_frames(data, limit):
                try:
                    rec = decode(payload)
                    engine.apply(rec)
                except Exception as exc:  # a record that does not apply is damage too
                    raise Torn(good, f"record does not apply ({exc!r})") from None
                good = end
                report.replayed += 1
                report.lsn += 1
        except Torn as exc:
            report.torn = f"{path}: {exc.reason} at byte {exc.offset}"
            log.warning("WAL %s: %s at byte %d; recovery stops there (%d bytes cut)",
                        path, exc.reason, exc.offset, len(data) - exc.offset)
            os.truncate(path, exc.offset)
            return False
        if limit is not None and len(data) > good:
            try:
                os.truncate(path, good)
            except OSError as exc:
                log.error("could not cut %s back to %d bytes: %s", path, good, exc)
        return True

    # -- payloads in the blob store (payloads.py, following.py) --------------------------------

    def write_blobs(self, items: list[tuple[int, bytes]]) -> list[int]:
        """Write (job id, payload) pairs before the records that name them; their open fds
        (``keep_blobs`` once the records are made). A write that fails (ENOSPC, EMFILE, EIO)
        leaves nothing behind and fails the storage: StorageFailed."""
        try:
            return self.blobs.write_all(items)
        except OSError as exc:
            self.wal.fail(f"write to blob store failed: {exc.strerror or exc}")
            raise StorageFailed(str(self.wal.failed)) from None

    def keep_blobs(self, fds: list[int]) -> None:
        """Blob files whose records were made: fsynced with the next group commit (fsync
        ``always``) or closed now."""
        wal = self.wal
        for fd in fds:
            if wal.policy == "always":
                wal.extra_fsync.append(fd)
            else:
                self.files.close(fd)

    # -- the log for followers (shipping.py, following.py) ---------------------------------------

    def retained_from(self) -> int:
        """The first LSN still in a WAL segment on disk (before it: only in a snapshot)."""
        bases = self.wal.bases
        return min(bases.values()) if bases else self.wal.written + 1

    def read_log(self, first: int, last: int, limit: int = 8 << 20) -> tuple[bytes, int]:
        """The framed records ``first``..``last`` (at most ``limit`` bytes, at least one
        record), as written; and how many they are."""
        bases = self.wal.bases
        segments = sorted(n for n, base in bases.items() if base <= first)
        if not segments:
            raise LookupError(f"LSN {first} is no longer in the log (snapshot needed)")
        out: list[bytes] = []
        size = count = 0
        lsn = bases[segments[-1]]
        for number in sorted(n for n in bases if n >= segments[-1]):
            lsn = bases[number]
            data = self.files.read(os.path.join(self.wal_dir, segment_name(number)))
            start = 0
            for end, _payload in read_frames(data):
                if lsn >= first:
                    out.append(data[start:end])
                    size += end - start
                    count += 1
                    if lsn >= last or size >= limit:
                        return b"".join(out), count
                lsn += 1
                start = end
        return b"".join(out), count

    def newest_snapshot(self) -> tuple[str, int] | None:
        """The newest snapshot file and the LSN its state is at."""
        numbers = list_snapshots(self.dir)
        if not numbers:
            return None
        path = os.path.join(self.dir, snapshot_name(numbers[-1]))
        return path, snapshot_lsn(self.files.read(path)[: 1 << 16])

    def cut_after(self, lsn: int) -> None:
        """Drop every record after ``lsn`` from the log (a follower's divergent tail, which
        never reached a majority). The caller rebuilds its engine with ``recover``."""
        self.wal.flush_now()
        bases = self.wal.bases
        for number in sorted(bases):
            base = bases[number]
            path = os.path.join(self.wal_dir, segment_name(number))
            if base > lsn:
                os.replace(path, path + ".cut")
                os.unlink(path + ".cut")
                continue
            data = self.files.read(path)
            n = base
            for end, _payload in read_frames(data):
                if n == lsn:
                    os.truncate(path, end)
                    break
                n += 1
            else:
                if base == lsn + 1:
                    os.truncate(path, 0)
        self.files.fsync_dir(self.wal_dir)

    def install_snapshot(self, data: bytes) -> None:
        """Replace everything in this directory with a snapshot from the primary (a learner,
        or a follower too far behind). The caller rebuilds its engine with ``recover``."""
        self.wal.flush_now()
        numbers = list_segments(self.wal_dir) + list_snapshots(self.dir) + [self.wal.segment]
        number = max(numbers) + 1
        tmp = os.path.join(self.dir, f"{snapshot_name(number)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self.files.write(fd, data)
            self.files.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, os.path.join(self.dir, snapshot_name(number)))
        for old in list_segments(self.wal_dir):
            os.unlink(os.path.join(self.wal_dir, segment_name(old)))
        for old in list_snapshots(self.dir):
            if old < number:
                os.unlink(os.path.join(self.dir, snapshot_name(old)))
        self.files.fsync_dir(self.dir)
        self.files.fsync_dir(self.wal_dir)

    # -- snapshots --------------------------------------------------------------------------------

    def snapshot_due(self) -> bool:
        return (
            self._snap is None and self.wal.failed is None
            and self.wal.bytes_since_snapshot >= self.settings.snapshot_bytes
        )

    def start_snapshot(self, engine: Engine) -> None:
        """Rotate the WAL and fork a child that writes the state before the new segment."""
        if self._snap is not None or self.wal.failed is not None:
            return
        self.wal.flush_now()
        if self.wal.failed is not None:
            return
        number = self.wal.rotate()
        if self.wal.failed is not None:
            return
        target = self.wal.written
        tmp = os.path.join(self.dir, f"{snapshot_name(number)}.{os.getpid()}.tmp")
        started = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the child: write and leave, touching nothing of the parent's loop
            code = 1
            parent = os.getppid()
            try:
                # first the sockets and the loop's fds: a child outliving a killed node must not
                # hold its listening port (a restart could not bind, clients would be reset)
                os.closerange(3, 1 << 16)
                _die_with_parent()
                if os.getppid() != parent:  # the node died before the death signal was set
                    os._exit(1)
                gc.disable()
                write_snapshot(engine, tmp, number, target)
                os.sync()  # blob files the snapshot refers to
                code = 0
            finally:
                os._exit(code)
        self.last_snapshot_pause = time.perf_counter() - started
        self.wal.bytes_since_snapshot = 0
        self._snap = (pid, number, tmp, target, started)
        self._poll = asyncio.get_running_loop().call_later(0.02, self._poll_snapshot)

    def _poll_snapshot(self) -> None:
        assert self._snap is not None
        pid, number, tmp, target, started = self._snap
        done, status = os.waitpid(pid, os.WNOHANG)
        loop = asyncio.get_running_loop()
        if done == 0:
            self._poll = loop.call_later(0.02, self._poll_snapshot)
            return
        if os.waitstatus_to_exitcode(status) != 0 or self.wal.failed is not None:
            log.error("snapshot %d failed (child status %d)", number, status)
            self._snap = None
            if os.path.exists(tmp):
                os.unlink(tmp)
            return
        if self.wal.durable < target:  # what the snapshot holds must be durable first
            self._snap = (0, number, tmp, target, started)
            self._poll = loop.call_later(0.005, self._finish_snapshot)
            return
        self._finish_snapshot()

    def _finish_snapshot(self) -> None:
        assert self._snap is not None
        _, number, tmp, target, started = self._snap
        if self.wal.failed is not None:
            os.unlink(tmp)
            self._snap = None
            return
        if self.wal.durable < target:
            self._poll = asyncio.get_running_loop().call_later(0.005, self._finish_snapshot)
            return
        final = os.path.join(self.dir, snapshot_name(number))
        os.replace(tmp, final)
        self.files.fsync_dir(self.dir)
        for old in list_segments(self.wal_dir):
            if old < number and old not in self.wal.pinned():
                os.unlink(os.path.join(self.wal_dir, segment_name(old)))
                self.wal.bases.pop(old, None)
        for old in list_snapshots(self.dir):
            if old < number:
                os.unlink(os.path.join(self.dir, snapshot_name(old)))
        self._snap = None
        self.snapshots_written += 1
        self.last_snapshot_at = time.time()
        self.last_snapshot_seconds = time.perf_counter() - started
        log.info("snapshot %s written in %.2fs (node paused %.1f ms for the fork)",
                 final, self.last_snapshot_seconds, self.last_snapshot_pause * 1000)

    def close(self) -> None:
        wal = self.wal
        if wal.fsyncs:
            recent = wal.fsync_seconds
            log.info("WAL: %d records in %d fsyncs (%.1f per fsync), recent fsync mean %.3f ms",
                     wal.appends, wal.fsyncs, wal.appends / wal.fsyncs,
                     1000 * sum(recent) / max(1, len(recent)))
        if self._poll is not None:
            self._poll.cancel()
        if self._snap is not None and self._snap[0]:
            try:
                os.waitpid(self._snap[0], 0)
            except ChildProcessError:
                pass
        self.wal.close()


__all__ = ["HEADER", "Recovery", "Storage"]
