"""Replicated shards (DESIGN §9): the primary ships its log, followers keep a warm copy.

The log is the replication stream. A primary opens one connection to every other member
and learner of its shard (``FOLLOW`` on the line protocol, then binary messages), sends
every group commit's frames to all of them at once, right after its own ``write`` and
before its own ``fsync``, and computes the **commit LSN**: the highest log position held
durably by a majority of the members, itself counted. Answers leave the primary only
once the commit LSN reaches their records (``Replication.durable`` is what sessions
compare against, as they compare against the WAL's ``durable`` on a single copy).

A follower checks each connection's term against the highest term it promised (FENCE,
``membership.py``), appends the frames to its own WAL at the same LSNs, applies them with
``Engine.apply`` (the function recovery uses, so its engine is always warm), and acks the
LSN its WAL made durable. On the handshake the primary compares term histories and tells
the follower to cut a divergent tail (records that never reached a majority) or, when
the follower is too far behind its retained log or has no log, sends a snapshot first.

Binary messages, both ways: ``[u32 length][u8 kind][body]`` (length counts kind + body).

  primary -> follower
    RECORDS   [u64 first LSN][u32 count][u32 blobs]{[u64 id][u32 n][n bytes]}*[frames]
    TRUNCATE  [u64 LSN]                 cut everything after LSN, then records follow
    SNAPSHOT  [u64 LSN][u32 blobs]{blob}*[snapshot file bytes]   replace the whole state
    HEARTBEAT [u64 commit LSN][u64 primary's last LSN]
  follower -> primary
    ACK       [u64 durable LSN]

Must not: decide who is primary (the controller does, through the topology), or answer
clients (the runtime does).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from shardq.connection import parse_address
from shardq.wire.topology import Shard

from . import records as R
from .wal import HEADER, decode, read_frames

if TYPE_CHECKING:
    from .runtime import Node

log = logging.getLogger("shardq_node.replication")

K_RECORDS = 1
K_TRUNCATE = 2
K_SNAPSHOT = 3
K_HEARTBEAT = 4
K_ACK = 1

MSG = struct.Struct("<IB")
U64 = struct.Struct("<Q")
RECORDS_HEAD = struct.Struct("<QII")
BLOB_HEAD = struct.Struct("<QI")
HEARTBEAT = struct.Struct("<QQ")

#: Heartbeats from the primary to each follower (a follower reports how long it last heard).
HEARTBEAT_S = 0.1
#: A follower link whose unsent bytes pass this is dropped; it catches up from disk later.
MAX_LINK_BUFFER = 64 << 20
#: Bytes of log read from disk per catch-up step.
CATCH_UP_STEP = 4 << 20

STANDALONE = "standalone"
PRIMARY = "primary"
FOLLOWER = "follower"
LEARNER = "learner"
NONE = "none"


def message(kind: int, body: bytes) -> bytes:
    return MSG.pack(len(body) + 1, kind) + body


def blobs_body(blobs: list[tuple[int, bytes]]) -> bytes:
    return b"".join(BLOB_HEAD.pack(jid, len(data)) + data for jid, data in blobs)


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


class FrameReader:
    """Splits a byte stream into binary messages (kind, body)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self.buf
        buf += data
        out = []
        pos = 0
        while len(buf) - pos >= MSG.size:
            length, kind = MSG.unpack_from(buf, pos)
            end = pos + 4 + length
            if end > len(buf):
                break
            out.append((kind, bytes(buf[pos + MSG.size : end])))
            pos = end
        if pos:
            del buf[:pos]
        return out


def split_blobs(body: bytes, offset: int, count: int) -> tuple[list[tuple[int, bytes]], int]:
    blobs = []
    for _ in range(count):
        jid, n = BLOB_HEAD.unpack_from(body, offset)
        offset += BLOB_HEAD.size
        blobs.append((jid, body[offset : offset + n]))
        offset += n
    return blobs, offset


def skip_frames(frames: bytes, n: int) -> bytes:
    """``frames`` without its first ``n`` records."""
    pos = 0
    for _ in range(n):
        length, _crc = HEADER.unpack_from(frames, pos)
        pos += HEADER.size + length
    return frames[pos:]


# -- the primary's side ---------------------------------------------------------------------


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


class Replication:
    """One node's part in its shard: role, term, commit LSN, follower links."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.role = STANDALONE
        self.shard_name = ""
        self.shard: Shard | None = None
        self.term = 0
        self.primary = ""  # the node the follower follows
        #: the commit LSN (a primary) or the WAL's durable LSN: what answers wait for
        self.durable = 0
        self.links: dict[str, FollowerLink] = {}
        self._blobs: list[tuple[int, bytes]] = []
        self.last_heard = 0.0  # follower: monotonic time of the last message from the primary
        self.primary_lsn = 0  # follower: the primary's last LSN, from its heartbeats
        self.commit_seen = 0  # follower: the commit LSN the primary last told
        self.upstream: Any = None  # follower: the session the primary streams on
        self.no_quorum_since: float | None = None
        self._beat: asyncio.TimerHandle | None = None
        self.handing_off = False  # a planned switchover: writes get TRYAGAIN meanwhile
        self.failovers = 0  # promotions of this node
        self.fence_refusals = 0  # FOLLOW sessions or records refused for an old term

    @property
    def replicated(self) -> bool:
        return self.role != STANDALONE

    @property
    def follows(self) -> bool:
        """A follower, learner or retired member: it writes only what a primary sends."""
        return self.role in (FOLLOWER, LEARNER, NONE)

    @property
    def writable(self) -> bool:
        """May this node change its state of its own accord (timers, peers)?"""
        return self.role in (STANDALONE, PRIMARY) and not self.handing_off

    @property
    def voter(self) -> bool:
        shard = self.shard
        me = self.node.cluster.name
        return (shard is not None and me in shard.members
                and shard.ids.get(me, self.node.membership.storage_id)
                == self.node.membership.storage_id)

    # -- roles ----------------------------------------------------------------------------------

    def set_role(self, role: str, shard_name: str, shard: Shard | None) -> None:
        """Follow the topology: become (or stay) ``role`` in ``shard``."""
        old = self.role
        self.shard_name, self.shard = shard_name, shard
        if shard is not None:
            self.node.membership.fence(shard.term)
        if role == PRIMARY and shard is not None:
            if old == PRIMARY and self.term != shard.term:
                self._step_down()
                self.role = NONE
            if self.role != PRIMARY:
                self._become_primary(shard.term)
            self._sync_links()
            return
        if old == PRIMARY:
            self._step_down()
        self.role = role
        self.term = shard.term if shard is not None else 0
        self.primary = shard.primary if shard is not None else ""
        if role == STANDALONE:
            self.node.gate = self.node.log
        else:
            self.node.gate = self.node.log  # a follower's answers wait for its own disk only
        if role in (FOLLOWER, LEARNER, NONE):
            self.node.engine.emitting = False

    def _become_primary(self, term: int) -> None:
        node = self.node
        was = self.role
        self.role = PRIMARY
        self.term = term
        self.primary = node.cluster.name
        self.failovers += int(was in (FOLLOWER, LEARNER, NONE))
        node.membership.lead(term)
        engine = node.engine
        engine.emitting = True
        if engine.last_term != term:
            engine.begin_term(term, node.cluster.name, node.log.seq + 1)
        if was in (FOLLOWER, LEARNER, NONE):
            _fresh_leases(engine)
            engine.timers.compact()
            engine.deps.rebuild()
            engine.timers.dirty = True
        self.durable = min(self.durable, node.log.durable)
        node.gate = self
        node.log.on_written = self.ship
        self.no_quorum_since = None
        log.info("primary of %s in term %d at LSN %d", self.shard_name, term, node.log.seq)
        if self._beat is None:
            self._beat = asyncio.get_running_loop().call_later(HEARTBEAT_S, self._heartbeat)
        node.after_batch()

    def _step_down(self) -> None:
        node = self.node
        self.handing_off = False
        log.info("no longer primary of %s (term %d)", self.shard_name, self.term)
        for link in self.links.values():
            link.close()
        self.links.clear()
        node.log.on_written = None
        if self._beat is not None:
            self._beat.cancel()
            self._beat = None
        text = (f"Unavailable: shard {self.shard_name} changed primary before the write was "
                "confirmed (it may have been applied)")
        node.fail_unconfirmed(self.durable, text)
        node.gate = node.log

    def _sync_links(self) -> None:
        shard = self.shard
        topo = self.node.cluster.topology
        if shard is None or topo is None:
            return
        me = self.node.cluster.name
        want = {n: topo.node(n) for n in [*shard.members, *shard.learners] if n != me}
        for name in list(self.links):
            info = want.get(name)
            if info is None or info.tcp != self.links[name].address:
                self.links.pop(name).close()
        for name, info in want.items():
            if info is not None and name not in self.links:
                link = self.links[name] = FollowerLink(self, name, info.tcp)
                link.start()
        self.advance()

    # -- the primary's log ------------------------------------------------------------------------

    def note_blob(self, job_id: int, data: bytes) -> None:
        """A payload spilled to the blob store: it travels with its PUSH record."""
        if self.links:
            self._blobs.append((job_id, data))

    def ship(self, first: int, last: int, frames: bytes) -> None:
        """The WAL wrote ``first``..``last``: send them to every live follower at once."""
        blobs, self._blobs = self._blobs, []
        body = blobs_body(blobs) if blobs else b""
        for link in self.links.values():
            link.ship(first, last, frames, body, len(blobs))

    def blobs_of(self, recs: Any) -> list[tuple[int, bytes]]:
        """The blob payloads the records ``recs`` refer to and this node still holds."""
        storage = self.node.storage
        assert storage is not None
        ids: list[int] = []
        for rec in recs:
            if rec[0] == R.PUSH:
                ids.extend(row[0] for row in rec[3] if row[10])
            elif rec[0] == R.JOB and rec[3][18]:
                ids.append(rec[3][0])
        out = []
        for jid in ids:
            try:
                out.append((jid, storage.blobs.read(jid)))
            except OSError:
                pass  # the job finished since: its later records say so
        return out

    def local_durable(self) -> None:
        """The WAL made more records durable."""
        if self.role == PRIMARY:
            self.advance()
        elif self.upstream is not None:
            self.upstream.ack(self.node.log.durable)

    def advance(self) -> None:
        """Recompute the commit LSN; let held answers out when it moved."""
        if self.role != PRIMARY or self.shard is None:
            return
        shard = self.shard
        me = self.node.cluster.name
        acked = [self.node.log.durable]
        for name in shard.members:
            if name != me:
                link = self.links.get(name)
                acked.append(link.acked if link is not None else 0)
        acked.sort(reverse=True)
        commit = acked[shard.majority() - 1]
        if self.members_in_sync() >= shard.majority():
            self.no_quorum_since = None
        elif self.no_quorum_since is None:
            self.no_quorum_since = time.monotonic()
        if commit > self.durable:
            self.durable = commit
            self.node.released()

    def members_in_sync(self) -> int:
        """Members (not learners) whose link is live and acked within ``failure_timeout``
        (a paused or silently cut follower does not count), this primary counted: what its
        quorum is counted from (``advance``); 0 on a node that is not a primary."""
        shard = self.shard
        if self.role != PRIMARY or shard is None:
            return 0
        me = self.node.cluster.name
        now = time.monotonic()
        timeout = self.node.settings.failure_timeout
        return 1 + sum(1 for n in shard.members
                       if n != me and (lk := self.links.get(n)) is not None
                       and lk.answering(now, timeout))

    def quorum_lost_for(self) -> float:
        """Seconds this primary has had fewer live members than a majority (0: it has one)."""
        since = self.no_quorum_since
        return 0.0 if since is None else time.monotonic() - since

    def _heartbeat(self) -> None:
        self._beat = None
        if self.role != PRIMARY:
            return
        beat = message(K_HEARTBEAT, HEARTBEAT.pack(self.durable, self.node.log.seq))
        for link in self.links.values():
            if link.live:
                link.send(beat)
        self.advance()
        if self.quorum_lost_for() > self.node.settings.failure_timeout:
            # what waits for a majority now waits for nothing that is coming: say so (the
            # records stay in the log, and count if the followers come back)
            self.node.fail_unconfirmed(self.durable, (
                f"Unavailable: shard {self.shard_name} has no quorum (the write may have "
                "been applied)"))
        self._beat = asyncio.get_running_loop().call_later(HEARTBEAT_S, self._heartbeat)

    def close(self) -> None:
        for link in self.links.values():
            link.close()
        self.links.clear()
        if self._beat is not None:
            self._beat.cancel()
            self._beat = None
        if self.upstream is not None:
            self.upstream.close()

    # -- status ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        node = self.node
        wal = node.log
        now = time.monotonic()
        out: dict[str, Any] = {
            "name": node.cluster.name, "role": self.role, "shard": self.shard_name,
            "term": self.term, "fenced_term": node.membership.fenced_term,
            "last_term": node.engine.last_term, "lsn": wal.durable, "seq": wal.seq,
            "commit": self.durable if self.role == PRIMARY else self.commit_seen,
            "storage_id": node.membership.storage_id, "voter": self.voter,
            "epoch": node.cluster.topology.epoch if node.cluster.topology else 0,
            "primary": self.primary,
        }
        if self.role in (FOLLOWER, LEARNER):
            out["heard_ms"] = int((now - self.last_heard) * 1000) if self.last_heard else -1
            out["primary_lsn"] = self.primary_lsn
        if self.role == PRIMARY:
            followers = []
            for link in self.links.values():
                records, seconds = link.lag(wal.seq, now)
                followers.append({"name": link.name, "live": link.live, "acked": link.acked,
                                  "lag_records": records, "lag_seconds": round(seconds, 3),
                                  "storage_id": link.storage_id})
            out["followers"] = followers
            out["members_in_sync"] = self.members_in_sync()
            out["quorum_lost_s"] = round(self.quorum_lost_for(), 3)
        return out


def _fresh_leases(engine: Any) -> None:
    """A new primary gives every active job a full lease from now: a worker that held it
    through the failover must not lose it (its TOUCHes were not replicated)."""
    now = engine.clock()
    default = engine.config.default_lease_ms
    for jid, lease in engine.active.items():
        job = engine.jobs[jid]
        deadline = now + (job.opts.timeout or default)
        if deadline > lease.deadline:
            lease.deadline = deadline


# -- the follower's side --------------------------------------------------------------------


class FollowerStream:
    """A follower's end of the primary's connection: binary messages in, acks out."""

    def __init__(self, node: Node, term: int, primary: str,
                 write: Callable[[bytes], None], close: Callable[[], None]) -> None:
        self.node = node
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
        repl = self.node.replication
        if self.closed:
            return
        if self.term < self.node.membership.fenced_term:
            repl.fence_refusals += 1
            log.warning("records from %s in term %d refused: promised term %d", self.primary,
                        self.term, self.node.membership.fenced_term)
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
        node = self.node
        if kind == K_RECORDS:
            first, count, nblobs = RECORDS_HEAD.unpack_from(body)
            blobs, offset = split_blobs(body, RECORDS_HEAD.size, nblobs)
            node.follow_records(first, count, blobs, body[offset:])
        elif kind == K_HEARTBEAT:
            commit, last = HEARTBEAT.unpack_from(body)
            repl = node.replication
            repl.commit_seen, repl.primary_lsn = commit, last
            self.ack(node.log.durable)
        elif kind == K_TRUNCATE:
            node.follow_truncate(U64.unpack_from(body)[0])
        elif kind == K_SNAPSHOT:
            lsn = U64.unpack_from(body)[0]
            (nblobs,) = struct.unpack_from("<I", body, U64.size)
            blobs, offset = split_blobs(body, U64.size + 4, nblobs)
            node.follow_snapshot(lsn, blobs, body[offset:])
        else:
            raise ValueError(f"unknown replication message {kind}")
