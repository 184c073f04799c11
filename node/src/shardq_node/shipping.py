"""The primary's side of replication: one link per follower, its catch-up, then live shipping.

A ``FollowerLink`` connects to a member or learner of the primary's shard, says
``FOLLOW`` with the primary's term, and compares term histories with the follower
(``common_point``): a follower with a divergent tail (records that never reached
a majority) is told to cut it, one too far behind the retained log (or with no
log) gets a snapshot first. Then it sends the log from disk up to what is written
(catch-up), and from then on every group commit's frames as the WAL writes them
(``Replication.ship``). The follower's acks move the link's ``acked`` LSN, from
which ``Replication`` computes the commit LSN.

Must not: decide who is primary or what is committed (replication.py), or touch the
engine.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from typing import TYPE_CHECKING, Any

import orjson

from shardq.connection import parse_address

from .replication_wire import (
    K_ACK,
    K_RECORDS,
    K_SNAPSHOT,
    K_TRUNCATE,
    RECORDS_HEAD,
    U64,
    FrameReader,
    blobs_body,
    message,
)
from .wal import decode, read_frames

if TYPE_CHECKING:
    from .replication import Replication

log = logging.getLogger("shardq_node.replication")

#: A follower link whose unsent bytes pass this is dropped; it catches up from disk later.
MAX_LINK_BUFFER = 64 << 20
#: Bytes of log read from disk per catch-up step.
CATCH_UP_STEP = 4 << 20


def term_at(terms: list[tuple[int, int]], lsn: int) -> tuple[int, int]:
    """The term that wrote log position ``lsn`` and the LSN where that term began."""
    term, start = 0, 1
    for t, first in terms:
        if first > lsn:
            break
        term, start = t, first
    return term, start


def common_point(
    mine: list[tuple[int, int]], my_last: int, theirs: list[tuple[int, int]], their_last: int
) -> int:
    """The last LSN where two logs agree: within one term a log position was written by one
    primary only, so equal terms at a position mean equal records up to it."""
    lsn = min(my_last, their_last)
    while lsn > 0:
        a, a_start = term_at(mine, lsn)
        b, b_start = term_at(theirs, lsn)
        if a == b:
            return lsn
        lsn = max(a_start, b_start) - 1
    return 0


class FollowerLink:
    """The primary's connection to one follower or learner."""

    def __init__(self, repl: Replication, name: str, address: str) -> None:
        self.repl = repl
        self.name = name
        self.address = address
        self.writer: asyncio.StreamWriter | None = None
        self.live = False  # caught up: new frames go out as they are written
        self.sent = 0  # last LSN sent
        self.acked = 0  # last LSN the follower holds durably
        self.acked_at = 0.0  # monotonic time of its last ack
        self.live_since = 0.0  # when it caught up (a fresh link counts as answering)
        self.unacked_since = 0.0  # when the oldest record it has not acked was sent
        #: (observed only) while not live: when the first record it was not sent was written
        self.missed_since = 0.0
        self.storage_id = ""
        self.task: asyncio.Task[None] | None = None
        self.closed = False

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    def close(self) -> None:
        self.closed = True
        self.live = False
        if self.writer is not None:
            self.writer.close()
        if self.task is not None:
            self.task.cancel()

    def send(self, data: bytes) -> bool:
        writer = self.writer
        if writer is None or writer.is_closing():
            return False
        if writer.transport.get_write_buffer_size() > MAX_LINK_BUFFER:
            log.warning("follower %s is %d bytes behind; dropping its link to catch up later",
                        self.name, writer.transport.get_write_buffer_size())
            writer.close()
            self.live = False
            return False
        writer.write(data)
        return True

    def ship(self, first: int, last: int, frames: bytes, blobs: bytes, nblobs: int) -> None:
        if not self.live:
            if not self.missed_since:
                self.missed_since = time.monotonic()
            return
        if self.sent + 1 != first:  # cannot happen; if it did, a new handshake mends it
            log.error("follower %s: records from %d after %d; reconnecting", self.name, first,
                      self.sent)
            self.live = False
            if self.writer is not None:
                self.writer.close()
            return
        body = RECORDS_HEAD.pack(first, last - first + 1, nblobs) + blobs + frames
        if self.send(message(K_RECORDS, body)):
            if self.acked >= self.sent:
                self.unacked_since = time.monotonic()
            self.sent = last

    async def _run(self) -> None:
        pause = 0.05
        while not self.closed:
            try:
                await self._session()
                pause = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # an unreachable or refusing follower: try again
                (log.info if pause <= 0.05 else log.debug)(
                    "replication to %s (%s): %s", self.name, self.address, exc)
            finally:
                self.live = False
                if self.writer is not None:
                    self.writer.close()
                    self.writer = None
            if self.closed:
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    async def _session(self) -> None:
        repl = self.repl
        host, port = parse_address(self.address)
        local = repl.node.settings.host
        kwargs: dict[str, Any] = {}
        if local not in ("", "0.0.0.0", "::", "localhost"):
            kwargs["local_addr"] = (local, 0)  # peers can tell nodes apart by source address
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=1 << 20, **kwargs), 2.0)
        self.writer = writer
        hello = await self._handshake(reader, writer)
        await self._catch_up(hello)
        ack = FrameReader()
        while not self.closed:
            data = await reader.read(1 << 16)
            if not data:
                raise ConnectionError("follower closed the connection")
            for kind, body in ack.feed(data):
                if kind == K_ACK:
                    self._acked(U64.unpack_from(body)[0])

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> dict[str, Any]:
        repl = self.repl
        token = repl.node.cluster.token
        lines: list[dict[str, Any]] = []
        if token:
            lines.append({"cmd": "AUTH", "token": token})
        lines.append({"cmd": "FOLLOW", "shard": repl.shard_name, "term": repl.term,
                      "primary": repl.node.cluster.name})
        for line in lines:
            writer.write(orjson.dumps(line) + b"\n")
        answer: dict[str, Any] = {}
        for _ in lines:
            raw = await asyncio.wait_for(reader.readline(), 5.0)
            if not raw:
                raise ConnectionError("closed during the handshake")
            answer = orjson.loads(raw)
            if answer.get("ok") is not True:
                raise ConnectionError(f"refused: {answer.get('error')}")
        return answer

    async def _catch_up(self, hello: dict[str, Any]) -> None:
        """Bring the follower to the primary's written log; then ship live."""
        repl = self.repl
        node = repl.node
        storage = node.storage
        assert storage is not None
        wal = storage.wal
        self.storage_id = str(hello.get("storage_id", ""))
        their_last = int(hello.get("lsn", 0))
        their_base = int(hello.get("base", 0))
        theirs = [(int(t), int(lsn)) for t, lsn in hello.get("terms", [])]
        common = common_point(node.engine.terms, wal.written, theirs, their_last)
        durable = min(common, int(hello.get("durable", 0)))
        if common + 1 < storage.retained_from() or common < their_base:
            common = await self._send_snapshot()
            durable = 0  # it acks once the snapshot is on its disk
        elif common < their_last:
            log.info("follower %s: cutting its log from %d back to %d", self.name,
                     their_last, common)
            self.send(message(K_TRUNCATE, U64.pack(common)))
        self.sent, self.acked = common, durable
        wal.pins.append(common + 1)
        try:
            while self.sent < wal.written:
                frames, count = storage.read_log(self.sent + 1, wal.written, CATCH_UP_STEP)
                first = self.sent + 1
                blobs = repl.blobs_of(decode(p) for _, p in read_frames(frames))
                body = RECORDS_HEAD.pack(first, count, len(blobs)) + blobs_body(blobs) + frames
                if not self.send(message(K_RECORDS, body)):
                    raise ConnectionError("link dropped while catching up")
                self.sent = first + count - 1
                assert self.writer is not None
                await self.writer.drain()
        finally:
            wal.pins.remove(common + 1)
        self.live = True  # no await since the last check: nothing was written in between
        self.live_since = self.unacked_since = time.monotonic()
        self.missed_since = 0.0
        log.info("follower %s caught up to %d (term %d)", self.name, self.sent, repl.term)

    async def _send_snapshot(self) -> int:
        repl = self.repl
        storage = repl.node.storage
        assert storage is not None
        found = storage.newest_snapshot()
        if found is None:
            raise ConnectionError("no snapshot to rebuild the follower from")
        path, lsn = found
        data = storage.files.read(path)
        blobs = repl.blobs_of(decode(p) for _, p in read_frames(data))
        log.info("follower %s: sending snapshot at %d (%d bytes, %d blobs)", self.name, lsn,
                 len(data), len(blobs))
        body = U64.pack(lsn) + struct.pack("<I", len(blobs)) + blobs_body(blobs) + data
        if not self.send(message(K_SNAPSHOT, body)):
            raise ConnectionError("link dropped while sending a snapshot")
        assert self.writer is not None
        await self.writer.drain()
        return lsn

    def answering(self, now: float, timeout: float) -> bool:
        """Live and heard from (an ack; heartbeats draw one every 100 ms) within ``timeout``."""
        return self.live and now - max(self.acked_at, self.live_since) < timeout

    def lag(self, last: int, now: float) -> tuple[int, float]:
        """How far behind the primary's log (its last LSN ``last``) the follower is: records
        it has not acknowledged, and seconds since the oldest of them was sent to it (or, on
        a link that is not live, since the first record it was not sent was written)."""
        records = max(0, last - self.acked)
        if not records:
            return 0, 0.0
        since = [t for t in (self.unacked_since if self.acked < self.sent else 0.0,
                             0.0 if self.live else self.missed_since) if t]
        return records, (now - min(since)) if since else 0.0

    def _acked(self, lsn: int) -> None:
        now = time.monotonic()
        self.acked_at = now  # it answers: alive, even with nothing new to confirm
        if lsn <= self.acked:
            return
        self.acked = lsn
        self.unacked_since = now if lsn < self.sent else 0.0
        self.repl.advance()
