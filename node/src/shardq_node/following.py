"""The follower's side of replication: the primary's stream in, its records applied, acks out.

A ``FollowerStream`` is the follower's end of one ``FOLLOW`` connection: it checks
the stream's term against the highest term this node promised (FENCE,
``membership.py``), splits the binary messages (replication_wire.py) and acks the
LSN its WAL made durable. ``Follower`` does what the messages say: append the
primary's records at the same LSNs and apply them with ``Engine.apply`` (the
function recovery uses, so the engine is always warm), cut a divergent tail, or
replace the whole state with the primary's snapshot; the last two rebuild the
engine from disk (``FollowerHost.rebuild``).

Must not: make records of its own, answer clients, or decide who is primary.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from .replication_wire import (
    HEARTBEAT,
    K_ACK,
    K_HEARTBEAT,
    K_RECORDS,
    K_SNAPSHOT,
    K_TRUNCATE,
    RECORDS_HEAD,
    U64,
    FrameReader,
    message,
    skip_frames,
    split_blobs,
)
from .wal import decode, read_frames

if TYPE_CHECKING:
    from .engine import Engine
    from .membership import Membership
    from .replication import Replication
    from .storage import Storage

log = logging.getLogger("shardq_node.replication")


class FollowerHost(Protocol):
    """What a follower needs of its node: the engine now, a rebuild from disk, and where
    the blobs of finished jobs wait until their records are durable."""

    @property
    def engine(self) -> Engine: ...

    def rebuild(self) -> None: ...

    def blobs_dropped(self, lsn: int, job_ids: list[int]) -> None: ...


class Follower:
    """Applies what the primary sends to this node's log and engine."""

    def __init__(self, host: FollowerHost, storage: Storage) -> None:
        self.host = host
        self.storage = storage
        self.wal = storage.wal

    def records(self, first: int, count: int, blobs: list[tuple[int, bytes]],
                frames: bytes) -> None:
        """Append the primary's records at the same LSNs and apply them."""
        wal = self.wal
        if first > wal.seq + 1:
            raise ValueError(f"records from {first} but this log ends at {wal.seq}")
        skip = wal.seq + 1 - first
        if skip >= count:
            return
        if skip:
            frames = skip_frames(frames, skip)
            count -= skip
        storage = self.storage
        for job_id, data in blobs:
            storage.keep_blobs([storage.blobs.write(job_id, data)])
        wal.append_raw(frames, count)
        engine = self.host.engine
        for _, payload in read_frames(frames):
            engine.apply(decode(payload))
        engine.events.clear()
        engine.wakeups.clear()
        engine.deps.to_watch.clear()
        engine.deps.outbox.clear()
        if engine.dropped_blobs:
            self.host.blobs_dropped(wal.seq, engine.dropped_blobs)
            engine.dropped_blobs = []
        timers = engine.timers
        if len(timers.deadlines) + len(timers.delayed) > 2 * len(engine.jobs) + 10_000:
            timers.compact()  # a follower never ticks: drop what its timers will never pop

    def truncate(self, lsn: int) -> None:
        """Cut this log back to ``lsn`` (a tail no majority held) and rebuild from disk."""
        log.warning("cutting the log back from %d to %d (a tail the new primary lacks)",
                    self.wal.seq, lsn)
        self.storage.cut_after(lsn)
        self.host.rebuild()

    def snapshot(self, lsn: int, blobs: list[tuple[int, bytes]], data: bytes) -> None:
        """Replace this node's whole state with the primary's snapshot at ``lsn``."""
        storage = self.storage
        log.warning("rebuilding from the primary's snapshot at %d (%d bytes)", lsn, len(data))
        for job_id, payload in blobs:
            storage.files.close(storage.blobs.write(job_id, payload))
        storage.install_snapshot(data)
        self.host.rebuild()


class StreamNode(Protocol):
    """What a ``FollowerStream`` takes from the node whose connection it runs on."""

    @property
    def replication(self) -> Replication: ...

    @property
    def membership(self) -> Membership: ...

    @property
    def follower(self) -> Follower | None: ...

    @property
    def log(self) -> Any: ...


class FollowerStream:
    """A follower's end of the primary's connection: binary messages in, acks out."""

    def __init__(self, node: StreamNode, term: int, primary: str,
                 write: Callable[[bytes], None], close: Callable[[], None]) -> None:
        assert node.follower is not None  # FOLLOW is refused without a data directory
        self.follower = node.follower
        self.repl = node.replication
        self.membership = node.membership
        self.log = node.log
        self.term = term
        self.primary = primary
        self.write = write
        self._close = close
        self.reader = FrameReader()
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._close()

    def ack(self, lsn: int) -> None:
        if not self.closed:
            self.write(message(K_ACK, U64.pack(lsn)))

    def feed(self, data: bytes) -> None:
        repl = self.repl
        if self.closed:
            return
        if self.term < self.membership.fenced_term:
            repl.fence_refusals += 1
            log.warning("records from %s in term %d refused: promised term %d", self.primary,
                        self.term, self.membership.fenced_term)
            self.close()
            return
        repl.last_heard = time.monotonic()
        for kind, body in self.reader.feed(data):
            try:
                self._message(kind, body)
            except Exception:
                log.exception("replication stream from %s broken; closing it", self.primary)
                self.close()
                return

    def _message(self, kind: int, body: bytes) -> None:
        if kind == K_RECORDS:
            first, count, nblobs = RECORDS_HEAD.unpack_from(body)
            blobs, offset = split_blobs(body, RECORDS_HEAD.size, nblobs)
            self.follower.records(first, count, blobs, body[offset:])
        elif kind == K_HEARTBEAT:
            commit, last = HEARTBEAT.unpack_from(body)
            repl = self.repl
            repl.commit_seen, repl.primary_lsn = commit, last
            self.ack(self.log.durable)
        elif kind == K_TRUNCATE:
            self.follower.truncate(U64.unpack_from(body)[0])
        elif kind == K_SNAPSHOT:
            lsn = U64.unpack_from(body)[0]
            (nblobs,) = struct.unpack_from("<I", body, U64.size)
            blobs, offset = split_blobs(body, U64.size + 4, nblobs)
            self.follower.snapshot(lsn, blobs, body[offset:])
        else:
            raise ValueError(f"unknown replication message {kind}")
