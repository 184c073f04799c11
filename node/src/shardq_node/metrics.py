"""The node's Prometheus metrics, read from the engine when scraped.

Counters and gauges cost nothing on the hot path: the engine already keeps
per-queue counts, and a collector turns them into metric families at scrape
time. The few distributions (wait time, run time, fsync latency) are
``Buckets``: a list of counts bumped with one bisect, no locks. Per-queue
labels are capped (``max_queue_labels``); the queues beyond the cap are summed
into ``queue="_other"`` so a million queues cannot explode the series count.

Replication (DESIGN §9) comes from ``Replication`` the same way: its role, term and
log positions, and on a primary each follower link's lag, read when scraped.

Names: ``shardq_`` prefix, base units (seconds, bytes), ``_total`` counters.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from shardq_server.buckets import Buckets
from shardq_server.limits import DROP_REASONS
from shardq_server.running import build_info

from . import replication as RP

if TYPE_CHECKING:
    from .jobs import QueueState
    from .runtime import Node

#: Seconds: wait (ready -> started) and run (started -> acked) times.
JOB_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0, 3600.0)
#: Every role a node can have in a shard (``shardq_replication_role``).
ROLES = (RP.PRIMARY, RP.FOLLOWER, RP.LEARNER, RP.NONE, RP.STANDALONE)
#: Seconds: one fsync of the WAL.
FSYNC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


class NodeCollector(Collector):
    def __init__(self, node: Node, max_queue_labels: int = 1000) -> None:
        self.node = node
        self.max_queue_labels = max_queue_labels

    def _queues(self) -> Iterator[tuple[str, list[QueueState]]]:
        queues = sorted(self.node.engine.queues.values(), key=lambda q: q.name)
        for q in queues[: self.max_queue_labels]:
            yield q.name, [q]
        if len(queues) > self.max_queue_labels:
            yield "_other", queues[self.max_queue_labels :]

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        yield from self._job_counters()
        yield from self._depths()
        yield from self._histograms()
        yield from self._storage()
        yield from self._cluster()
        yield from self._replication()

    def _job_counters(self) -> Iterator[CounterMetricFamily]:
        specs = [
            ("pushed", "Jobs pushed", "pushed"), ("completed", "Jobs completed", "completed"),
            ("failed", "Failed attempts", "failed"), ("retried", "Attempts retried", "retried"),
            ("dead", "Jobs sent to the DLQ", "dead_total"),
            ("expired", "Jobs expired before a pull", "expired"),
        ]
        families = {key: CounterMetricFamily(f"shardq_jobs_{key}", doc, labels=["queue"])
                    for key, doc, _ in specs}
        for name, group in self._queues():
            for key, _, attr in specs:
                families[key].add_metric([name], float(sum(getattr(q, attr) for q in group)))
        yield from families.values()

    def _depths(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("shardq_queue_jobs", "Jobs in a queue by state",
                                  labels=["queue", "state"])
        oldest = GaugeMetricFamily("shardq_queue_oldest_waiting_age_seconds",
                                   "Age of the oldest ready job of a queue",
                                   labels=["queue"])
        now = self.node.clock()
        jobs = self.node.engine.jobs
        for name, group in self._queues():
            for state, attr in (("waiting", "n_waiting"), ("delayed", "n_delayed"),
                                ("waiting-children", "n_children"), ("active", "n_active")):
                depth.add_metric([name, state], float(sum(getattr(q, attr) for q in group)))
            depth.add_metric([name, "dead"], float(sum(len(q.dlq) for q in group)))
            ages = []
            for q in group:
                if q.n_waiting and q.ready:
                    job = jobs.get(q.ready[0] & ((1 << 53) - 1))
                    if job is not None:
                        ages.append(max(0, now - job.run_at) / 1000)
                for lane in q.lanes:  # the first of its compact jobs of each priority
                    if lane.live:
                        ages.append(max(0, now - lane.times[lane.head]) / 1000)
            oldest.add_metric([name], max(ages) if ages else 0.0)
        yield depth
        yield oldest

    def _histograms(self) -> Iterator[HistogramMetricFamily]:
        m = self.node.measures
        for name, doc, b in (
            ("shardq_job_wait_seconds", "Time from ready to started", m.wait),
            ("shardq_job_run_seconds", "Time from started to acked", m.run),
            ("shardq_wal_fsync_seconds", "Duration of one WAL fsync", m.fsync),
        ):
            yield HistogramMetricFamily(name, doc, buckets=b.family_buckets(), sum_value=b.sum)

    def _storage(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        node = self.node
        settings = node.settings.storage
        storage = node.storage
        wal = storage.wal if storage is not None else None
        yield CounterMetricFamily("shardq_wal_records_total", "Records appended to the WAL",
                                  value=float(wal.appends if wal else 0))
        yield CounterMetricFamily("shardq_wal_bytes_total", "Bytes written to the WAL",
                                  value=float(wal.bytes_written if wal else 0))
        yield CounterMetricFamily("shardq_wal_fsyncs_total", "fsyncs of the WAL",
                                  value=float(wal.fsyncs if wal else 0))
        yield GaugeMetricFamily("shardq_storage_failed", "1 while the node refuses writes",
                                value=1.0 if node.log.failed else 0.0)
        yield GaugeMetricFamily("shardq_snapshot_duration_seconds",
                                "How long the last snapshot took to write",
                                value=storage.last_snapshot_seconds if storage else 0.0)
        yield CounterMetricFamily("shardq_snapshots", "Snapshots written",
                                  value=float(storage.snapshots_written if storage else 0))
        yield GaugeMetricFamily("shardq_snapshot_last_success_timestamp_seconds",
                                "When the last snapshot was finished (0 = never)",
                                value=storage.last_snapshot_at if storage else 0.0)
        yield GaugeMetricFamily("shardq_snapshot_pause_seconds",
                                "How long the node paused to fork the last snapshot",
                                value=storage.last_snapshot_pause if storage else 0.0)
        yield GaugeMetricFamily("shardq_memory_payload_bytes", "Payload bytes held in memory",
                                value=float(node.engine.payload_bytes))
        yield GaugeMetricFamily("shardq_memory_budget_bytes", "Memory budget for payloads",
                                value=float(settings.memory_budget))
        yield GaugeMetricFamily("shardq_blob_bytes", "Payload bytes in the blob store",
                                value=float(storage.blobs.used if storage else 0))
        yield GaugeMetricFamily("shardq_blobs", "Payloads in the blob store",
                                value=float(storage.blobs.count if storage else 0))
        yield GaugeMetricFamily("shardq_blob_budget_bytes", "Disk budget for the blob store",
                                value=float(settings.disk_budget))

    def _cluster(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        node = self.node
        cluster = node.cluster
        owned = sum(1 for s in cluster.state if s)
        yield GaugeMetricFamily("shardq_slots_owned", "Slots this node owns", value=float(owned))
        yield GaugeMetricFamily("shardq_slots_moving", "Slots this node is moving away",
                                value=float(sum(1 for s in cluster.state if s == 2)))
        per_slot = GaugeMetricFamily("shardq_slot_jobs_max",
                                     "Jobs in this node's fullest slot (skew between slots)")
        counts: dict[int, int] = {}
        for q in node.engine.queues.values():
            counts[q.slot] = counts.get(q.slot, 0) + q.pending + q.n_active + len(q.dlq)
        per_slot.add_metric([], float(max(counts.values(), default=0)))
        yield per_slot
        info = GaugeMetricFamily("shardq_node_info", "The node's name (to join with gateway "
                                 "metrics)", labels=["node"])
        info.add_metric([node.settings.name], 1.0)
        yield info
        yield build_info()
        requests = CounterMetricFamily("shardq_requests", "Requests answered, by command",
                                       labels=["command"])
        for cmd, count in sorted(node.requests.items()):
            requests.add_metric([cmd], float(count))
        yield requests
        refused = CounterMetricFamily("shardq_requests_refused", "Requests refused, by command "
                                      "and reason", labels=["command", "reason"])
        for (cmd, reason), count in sorted(node.refusals.items()):
            refused.add_metric([cmd, reason], float(count))
        yield refused
        topo = cluster.topology
        yield GaugeMetricFamily("shardq_topology_epoch", "Epoch of the topology this node holds",
                                value=float(topo.epoch if topo else 0))
        yield GaugeMetricFamily("shardq_connections", "Open client connections",
                                value=float(len(node.sessions)))
        yield GaugeMetricFamily(
            "shardq_connection_buffered_bytes", "Bytes held for client connections: lines "
            "waiting behind a blocked command, answers not yet sent",
            value=float(sum(s.backlog_bytes + s.unsent() for s in node.sessions
                            if s.transport is not None)))
        dropped = CounterMetricFamily(
            "shardq_connections_dropped", "Connections closed or refused for a limit, by reason "
            "(docs/limits.md)", labels=["reason"])
        for reason in DROP_REASONS:
            dropped.add_metric([reason], float(node.drops.get(reason, 0)))
        yield dropped
        yield GaugeMetricFamily("shardq_jobs", "Live jobs on this node",
                                value=float(node.engine.job_count()))

    def _replication(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        node = self.node
        repl = node.replication
        shard = repl.shard_name
        role = GaugeMetricFamily("shardq_replication_role", "1 for the node's role in its shard "
                                 "(primary, follower, learner, none, standalone), 0 for the "
                                 "others", labels=["shard", "role"])
        for name in ROLES:
            role.add_metric([shard, name], 1.0 if repl.role == name else 0.0)
        yield role
        primary = repl.role == RP.PRIMARY
        for name, doc, value in (
            ("shardq_replication_term", "The term of the shard this node is in (0: standalone)",
             repl.term),
            ("shardq_replication_lsn", "The last log position durable on this node's disk",
             node.log.durable),
            ("shardq_replication_commit_lsn", "The commit LSN: on a primary the last position "
             "durable on a majority of the members, on a follower the one the primary last "
             "told it (a single copy: its own durable position)",
             repl.durable if primary else repl.commit_seen if repl.replicated
             else node.log.durable),
        ):
            family = GaugeMetricFamily(name, doc, labels=["shard"])
            family.add_metric([shard], float(value))
            yield family
        for name, doc, value in (
            ("shardq_replication_failovers", "Times this node was promoted to primary",
             repl.failovers),
            ("shardq_replication_fence_refusals", "Replication sessions or records this node "
             "refused because they came from an older term than it promised (FENCE)",
             repl.fence_refusals),
        ):
            counter = CounterMetricFamily(name, doc, labels=["shard"])
            counter.add_metric([shard], float(value))
            yield counter
        if not primary or repl.shard is None:
            return
        members = GaugeMetricFamily("shardq_replication_members", "Voting members of the shard "
                                    "(on its primary)", labels=["shard"])
        members.add_metric([shard], float(len(repl.shard.members)))
        yield members
        learners = GaugeMetricFamily("shardq_replication_learners", "Learners of the shard: "
                                     "members to be, catching up without a vote (on its "
                                     "primary)", labels=["shard"])
        learners.add_metric([shard], float(len(repl.shard.learners)))
        yield learners
        in_sync = GaugeMetricFamily("shardq_replication_members_in_sync", "Members of the shard "
                                    "whose log is live from the primary and who acknowledged "
                                    "within failure_timeout, the primary counted (its quorum "
                                    "needs a majority)", labels=["shard"])
        in_sync.add_metric([shard], float(repl.members_in_sync()))
        yield in_sync
        no_quorum = GaugeMetricFamily("shardq_replication_no_quorum_seconds", "Seconds this "
                                      "primary has had fewer live members than a majority (0: "
                                      "it has one); past failure_timeout it refuses writes",
                                      labels=["shard"])
        no_quorum.add_metric([shard], repl.quorum_lost_for())
        yield no_quorum
        labels = ["shard", "follower"]
        lag_records = GaugeMetricFamily("shardq_replication_follower_lag_records", "Log records "
                                        "the primary holds and the follower has not "
                                        "acknowledged", labels=labels)
        lag_seconds = GaugeMetricFamily("shardq_replication_follower_lag_seconds", "How long the "
                                        "follower has lacked the oldest record it has not "
                                        "acknowledged (0: it holds everything)", labels=labels)
        live = GaugeMetricFamily("shardq_replication_follower_in_sync", "1 while the follower's "
                                 "link is live (caught up, records shipped as they are "
                                 "written) and it acknowledged within failure_timeout, as the "
                                 "primary counts its quorum", labels=labels)
        now = time.monotonic()
        last = node.log.seq
        for link in sorted(repl.links.values(), key=lambda lk: lk.name):
            records, seconds = link.lag(last, now)
            lag_records.add_metric([shard, link.name], float(records))
            lag_seconds.add_metric([shard, link.name], seconds)
            answering = link.answering(now, node.settings.failure_timeout)
            live.add_metric([shard, link.name], 1.0 if answering else 0.0)
        yield lag_records
        yield lag_seconds
        yield live


class Measures:
    """The node's distributions, bumped where they happen."""

    def __init__(self) -> None:
        self.wait = Buckets(JOB_BUCKETS)
        self.run = Buckets(JOB_BUCKETS)
        self.fsync = Buckets(FSYNC_BUCKETS)


def registry_for(node: Node, max_queue_labels: int) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node, max_queue_labels))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return bytes(generate_latest(registry))
