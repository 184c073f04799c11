"""Replicated shards (DESIGN §9): a node's role in its shard, its term, and the commit LSN.

The log is the replication stream. A primary opens one link to every other member
and learner of its shard (shipping.py), sends every group commit's frames to all of
them at once, right after its own ``write`` and before its own ``fsync``, and
computes the **commit LSN**: the highest log position held durably by a majority of
the members, itself counted. Answers leave the primary only once the commit LSN
reaches their records (``Replication.durable`` is what sessions compare against, as
they compare against the WAL's ``durable`` on a single copy).

A follower takes the primary's stream on a ``FOLLOW`` connection (following.py):
it appends the frames to its own WAL at the same LSNs, applies them, and acks the
LSN its WAL made durable. The messages both ways are in replication_wire.py.

Must not: decide who is primary (the controller does, through the topology), or answer
clients (the runtime does).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from shardq.wire.topology import Shard

from . import records as R
from .following import FollowerStream as FollowerStream
from .replication_wire import HEARTBEAT, K_HEARTBEAT, blobs_body, message
from .shipping import FollowerLink

if TYPE_CHECKING:
    from .cluster import Cluster
    from .engine import Engine
    from .membership import Membership
    from .settings import NodeSettings
    from .storage import Storage

log = logging.getLogger("shardq_node.replication")

#: Heartbeats from the primary to each follower (a follower reports how long it last heard).
HEARTBEAT_S = 0.1

STANDALONE = "standalone"
PRIMARY = "primary"
FOLLOWER = "follower"
LEARNER = "learner"
NONE = "none"


class ReplicationHost(Protocol):
    """What replication needs of its node (the runtime is one): its name, topology and term
    promises, its log and engine, and the gate answers wait behind."""

    #: what answers wait for: the log, or (a replicated primary) this Replication
    gate: Any

    @property
    def settings(self) -> NodeSettings: ...

    @property
    def cluster(self) -> Cluster: ...

    @property
    def membership(self) -> Membership: ...

    @property
    def engine(self) -> Engine: ...

    @property
    def log(self) -> Any: ...

    @property
    def storage(self) -> Storage | None: ...

    def after_batch(self) -> None: ...

    def released(self) -> None: ...

    def fail_unconfirmed(self, durable: int, text: str) -> None: ...


class Replication:
    """One node's part in its shard: role, term, commit LSN, follower links."""

    def __init__(self, node: ReplicationHost) -> None:
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
