"""The servers' dashboards, one function per panel: node internals (WAL, snapshots, memory,
blobs, slots), replication (quorum, lag, failovers) and the gateway.

``generate.py`` writes them. Must not: write files.
"""

from __future__ import annotations

from dashboard_blocks import assemble, q, quantile, query_variable, rate, stat, timeseries
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import stat as sb
from grafana_foundation_sdk.builders import timeseries as tb

# -- node internals -------------------------------------------------------------------------------

INST = 'instance=~"$instance"'


def wal_records() -> tb.Panel:
    return timeseries("WAL records", "Records appended to the WAL per second.", "suffix: /s",
                      q(rate("shardq_wal_records_total", INST, "instance"), "{{instance}}"))


def wal_bytes() -> tb.Panel:
    return timeseries("WAL bytes", "Bytes written to the WAL per second.", "Bps",
                      q(rate("shardq_wal_bytes_total", INST, "instance"), "{{instance}}"))


def records_per_fsync() -> tb.Panel:
    return timeseries("Records per fsync", "WAL records made durable by one fsync: the group "
                      "commit batch.", "short",
                      q(rate("shardq_wal_records_total", INST, "instance") + " / "
                        + rate("shardq_wal_fsyncs_total", INST, "instance"), "{{instance}}"))


def fsync_latency() -> tb.Panel:
    return timeseries("fsync latency p99", "99th percentile of one WAL fsync (alert above "
                      "100ms).", "s",
                      q(quantile(0.99, "shardq_wal_fsync_seconds", INST, "instance"),
                        "{{instance}}"))


def snapshots() -> tb.Panel:
    return timeseries("Snapshots", "How long the last snapshot took to write (in a forked "
                      "child), and how long the node paused for the fork.", "s",
                      q(f"max by (instance) (shardq_snapshot_duration_seconds{{{INST}}})",
                        "{{instance}} write"),
                      q(f"max by (instance) (shardq_snapshot_pause_seconds{{{INST}}})",
                        "{{instance}} fork pause"))


def memory() -> tb.Panel:
    return timeseries("Memory vs budget", "Payload bytes held in memory, and the memory budget "
                      "(past it payloads go to disk).", "bytes",
                      q(f"max by (instance) (shardq_memory_payload_bytes{{{INST}}})",
                        "{{instance}} used"),
                      q(f"max by (instance) (shardq_memory_budget_bytes{{{INST}}})",
                        "{{instance}} budget"))


def blob_store() -> tb.Panel:
    return timeseries("Blob store vs budget", "Payload bytes in the blob store on disk, and its "
                      "budget (pushes are refused when memory and disk are full).", "bytes",
                      q(f"max by (instance) (shardq_blob_bytes{{{INST}}})", "{{instance}} used"),
                      q(f"max by (instance) (shardq_blob_budget_bytes{{{INST}}})",
                        "{{instance}} budget"))


def blob_count() -> tb.Panel:
    return timeseries("Blobs", "Payloads in the blob store.", "short",
                      q(f"max by (instance) (shardq_blobs{{{INST}}})", "{{instance}}"))


def slots() -> tb.Panel:
    return timeseries("Slots", "Slots each node owns, and slots it is moving away (frozen).",
                      "short",
                      q(f"max by (instance) (shardq_slots_owned{{{INST}}})", "{{instance}} owned"),
                      q(f"max by (instance) (shardq_slots_moving{{{INST}}})",
                        "{{instance}} moving"))


def topology_epoch() -> tb.Panel:
    return timeseries("Topology epoch", "Epoch of the topology each node holds: they agree "
                      "once a change has reached every node.", "none",
                      q(f"max by (instance) (shardq_topology_epoch{{{INST}}})", "{{instance}}"),
                      min_zero=False)


def slot_skew() -> tb.Panel:
    return timeseries("Jobs per slot: fullest vs mean", "Jobs in the node's fullest slot, and "
                      "the mean over the slots it owns: a wide gap is a hot slot.", "short",
                      q(f"max by (instance) (shardq_slot_jobs_max{{{INST}}})",
                        "{{instance}} fullest"),
                      q(f"max by (instance) (shardq_jobs{{{INST}}}) / "
                        f"clamp_min(max by (instance) (shardq_slots_owned{{{INST}}}), 1)",
                        "{{instance}} mean"))


def connections() -> tb.Panel:
    return timeseries("Client connections", "Open client connections (gateways, workers).",
                      "short",
                      q(f"max by (instance) (shardq_connections{{{INST}}})", "{{instance}}"))


def storage_failed() -> tb.Panel:
    return timeseries("Storage failed", "1 while the node refuses writes after a WAL write or "
                      "fsync failed.", "short",
                      q(f"max by (instance) (shardq_storage_failed{{{INST}}})", "{{instance}}"))


def node_jobs() -> tb.Panel:
    return timeseries("Live jobs", "Jobs each node holds.", "short",
                      q(f"max by (instance) (shardq_jobs{{{INST}}})", "{{instance}}"))


def node_internals() -> db.Dashboard:
    variable = query_variable("instance", "Node", "label_values(shardq_slots_owned, instance)",
                              every=True)
    return assemble(
        "shardq-node", "shardq / Node internals",
        "WAL, fsync, snapshots, memory and disk budgets, slots and topology of each node.",
        [variable],
        [("Write-ahead log", [wal_records(), wal_bytes(), fsync_latency(), records_per_fsync()]),
         ("State", [snapshots(), memory(), blob_store(), blob_count()]),
         ("Cluster", [slots(), topology_epoch(), slot_skew(), node_jobs()]),
         ("Health", [connections(), storage_failed()])],
    )


# -- replication ----------------------------------------------------------------------------------

#: A shard (``$shard``, multi-select); the primary's series only exist for replicated shards,
#: the others also on single-copy nodes (``shard=""``), which REPLICATED leaves out.
SHARD = 'shard=~"$shard"'
#: Every shard: the cluster overview's replication row (the overview has no ``$shard``).
ALL_SHARDS = 'shard!=""'
REPLICATED = f'{SHARD}, shard!=""'


def under_replicated(sel: str = SHARD) -> sb.Panel:
    return stat("Under-replicated shards", "Shards whose primary sees fewer members in sync "
                "than the shard has members and learners (alert ShardqShardUnderReplicated after "
                "5 minutes).", "short",
                q(f"count(shardq_replication_members_in_sync{{{sel}}} < "
                  f"shardq_replication_members{{{sel}}} + "
                  f"shardq_replication_learners{{{sel}}}) or vector(0)", "shards"),
                red_above=1)


def without_quorum(sel: str = SHARD) -> sb.Panel:
    return stat("Shards without quorum", "Shards whose primary has fewer live members than a "
                "majority: past failure_timeout it refuses writes.", "short",
                q(f"count(shardq_replication_no_quorum_seconds{{{sel}}} > 0) or vector(0)",
                  "shards"), red_above=1)


def failovers_today(sel: str = SHARD) -> sb.Panel:
    return stat("Failovers (24h)", "Promotions of a member to primary over the last 24 hours, "
                "all shards.", "short",
                q(f"sum(increase(shardq_replication_failovers_total{{{sel}}}[24h])) "
                  "or vector(0)", "failovers"))


def worst_lag(sel: str = SHARD) -> sb.Panel:
    return stat("Worst follower lag", "The longest any follower has lacked a record its "
                "primary holds (alert ShardqReplicationLagHigh above 10 s).", "s",
                q(f"max(shardq_replication_follower_lag_seconds{{{sel}}}) or vector(0)",
                  "lag"), red_above=10)


def primaries() -> tb.Panel:
    return timeseries("Primary of each shard", "1 for the node that is its shard's primary: a "
                      "new line is a new primary (a failover or a switchover).", "short",
                      q(f'max by (shard, instance) (shardq_replication_role{{role="primary", '
                        f'{REPLICATED}}}) == 1', "{{shard}}: {{instance}}"))


def terms() -> tb.Panel:
    return timeseries("Term per shard", "The newest term any member of the shard is in: it "
                      "goes up by one with every failover.", "none",
                      q(f"max by (shard) (shardq_replication_term{{{REPLICATED}}})", "{{shard}}"),
                      min_zero=False)


def members_in_sync() -> tb.Panel:
    return timeseries("Members in sync", "Members whose log is live from the primary (the "
                      "primary counted), the shard's members (writes need a majority of them) "
                      "and its learners (catching up, without a vote).", "short",
                      q(f"min by (shard) (shardq_replication_members_in_sync{{{SHARD}}})",
                        "{{shard}} in sync"),
                      q(f"max by (shard) (shardq_replication_members{{{SHARD}}})",
                        "{{shard}} members"),
                      q(f"max by (shard) (shardq_replication_learners{{{SHARD}}})",
                        "{{shard}} learners"))


def no_quorum() -> tb.Panel:
    return timeseries("Seconds without quorum", "How long each shard's primary has had fewer "
                      "live members than a majority (alert ShardqShardNoQuorum).", "s",
                      q(f"max by (shard) (shardq_replication_no_quorum_seconds{{{SHARD}}})",
                        "{{shard}}"))


def lag_records() -> tb.Panel:
    return timeseries("Follower lag (records)", "Log records each follower (or learner) has "
                      "not acknowledged, as its primary counts them.", "short",
                      q(f"max by (shard, follower) "
                        f"(shardq_replication_follower_lag_records{{{SHARD}}})",
                        "{{shard}} → {{follower}}"))


def lag_seconds() -> tb.Panel:
    return timeseries("Follower lag (seconds)", "How long each follower has lacked the oldest "
                      "record it has not acknowledged (alert ShardqReplicationLagHigh).", "s",
                      q(f"max by (shard, follower) "
                        f"(shardq_replication_follower_lag_seconds{{{SHARD}}})",
                        "{{shard}} → {{follower}}"))


def failovers() -> tb.Panel:
    return timeseries("Failovers", "Promotions to primary in the last 5 minutes, by shard.",
                      "short",
                      q(f"sum by (shard) (increase(shardq_replication_failovers_total"
                        f"{{{REPLICATED}}}[5m]))", "{{shard}}"))


def fence_refusals() -> tb.Panel:
    return timeseries("Fence refusals", "Replication sessions or records members refused in "
                      "the last 5 minutes because they came from a deposed primary (an older "
                      "term).", "short",
                      q(f"sum by (shard) (increase(shardq_replication_fence_refusals_total"
                        f"{{{REPLICATED}}}[5m]))", "{{shard}}"))


def replication() -> db.Dashboard:
    variable = query_variable("shard", "Shard",
                              'label_values(shardq_replication_term{shard!=""}, shard)', every=True)
    return assemble(
        "shardq-replication", "shardq / Replication",
        "Replicated shards (DESIGN §9): primaries and terms, members in sync, quorum, follower "
        "lag, failovers. Empty for a cluster of single copies.",
        [variable],
        [("Now", [under_replicated(), without_quorum(), failovers_today(), worst_lag()]),
         ("Replication", [primaries(), terms(), members_in_sync(), no_quorum(), lag_records(),
                          lag_seconds(), failovers(), fence_refusals()])],
    )


# -- gateway --------------------------------------------------------------------------------------


def gateway_requests() -> tb.Panel:
    return timeseries("Requests", "Requests per second by command and outcome.", "reqps",
                      q(rate("shardq_gateway_requests_total", by="command, outcome"),
                        "{{command}} {{outcome}}"))


def gateway_error_ratio() -> tb.Panel:
    return timeseries("Error ratio", "Share of requests answered with an error.", "percentunit",
                      q(rate("shardq_gateway_requests_total", 'outcome="error"') + " / "
                        + rate("shardq_gateway_requests_total"), "errors"))


def gateway_latency() -> tb.Panel:
    return timeseries("Latency p99 by command", "99th percentile of a request's time in the "
                      "gateway (to the node and back), by command.", "s",
                      q(quantile(0.99, "shardq_gateway_request_duration_seconds", by="command"),
                        "{{command}}"))


def gateway_upstream_errors() -> tb.Panel:
    return timeseries("Upstream errors", "Errors talking to nodes per second, by node and "
                      "reason (unreachable, timeout, closed).", "suffix: /s",
                      q(rate("shardq_gateway_upstream_errors_total", by="node, reason"),
                        "{{node}} {{reason}}"))


def gateway_retries() -> tb.Panel:
    return timeseries("Retries", "Requests retried per second, by reason (MOVED, TRYAGAIN, "
                      "timeout).", "suffix: /s",
                      q(rate("shardq_gateway_retries_total", by="reason"), "{{reason}}"))


def gateway_topology() -> tb.Panel:
    return timeseries("Topology refreshes", "Topology reloads of each gateway in the last 5 "
                      "minutes.", "short",
                      q("sum by (instance) (increase(shardq_gateway_topology_refreshes_total[5m]))",
                        "{{instance}}"))


def gateway_epoch() -> tb.Panel:
    return timeseries("Topology epoch", "The epoch each gateway routes by, and the newest a "
                      "node holds: a gateway behind gets MOVED until it refreshes.", "none",
                      q("max by (instance) (shardq_gateway_topology_epoch)", "{{instance}}"),
                      q("max(shardq_topology_epoch)", "nodes (newest)"), min_zero=False)


def gateway_connections() -> tb.Panel:
    return timeseries("Client connections", "Open client connections of each gateway.", "short",
                      q("sum by (instance) (shardq_gateway_connections)", "{{instance}}"))


def gateway() -> db.Dashboard:
    return assemble(
        "shardq-gateway", "shardq / Gateways",
        "Requests, latency, upstream errors, retries and topology of the gateways.",
        [],
        [("Requests", [gateway_requests(), gateway_error_ratio(), gateway_latency(),
                       gateway_connections()]),
         ("Nodes", [gateway_upstream_errors(), gateway_retries(), gateway_topology(),
                    gateway_epoch()])],
    )


