"""shardq's Grafana dashboards, generated from Python (grafana-foundation-sdk), one function
per panel.

    python charts/shardq/dashboards/generate.py            # (re)write the *.json beside it
    python charts/shardq/dashboards/generate.py --out DIR  # write them somewhere else
    python charts/shardq/dashboards/generate.py --list     # every PromQL expression in use

`make dashboards` runs the first. The JSON is sorted and stable (``sort_keys``, a trailing
newline): tests/unit/test_dashboards.py regenerates it and fails on any difference with the
committed files, so edit this file, never the JSON.

This module is also **the one list of every PromQL expression** shardq's monitoring uses:
``all_exprs()`` returns the panels' queries and the alert rules' expressions (read from
``../alerts/shardq-rules.yaml``); tests/integration/test_observability.py runs each of them
against a real Prometheus scraping real nodes. ``concrete()`` turns a panel query into plain
PromQL by filling in the Grafana variables.

Every panel and query uses the ``$datasource`` variable, so the dashboards work with any
Prometheus data source. Node metrics have no node label: ``instance`` is the node.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as pb
from grafana_foundation_sdk.builders import stat as sb
from grafana_foundation_sdk.builders import timeseries as tb
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm

HERE = Path(__file__).resolve().parent
RULES = HERE.parent / "alerts" / "shardq-rules.yaml"

DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
#: Grafana's rate window: at least four scrape intervals, whatever the zoom.
RI = "$__rate_interval"
#: Node targets (as in the alert rules): a job named *shardq* that is not a gateway.
NODE_UP = 'up{job=~".*shardq.*", job!~".*gateway.*"}'

Panel = tb.Panel | sb.Panel


# -- building blocks ------------------------------------------------------------------------------


def q(expr: str, legend: str = "") -> pb.Dataquery:
    """One PromQL target (the refId is set when the panel is assembled)."""
    target = pb.Dataquery().expr(expr).datasource(DS).range()
    if legend:
        target = target.legend_format(legend)
    return target


def timeseries(title: str, description: str, unit: str, *targets: pb.Dataquery,
               width: int = 12, stacked: bool = False, min_zero: bool = True) -> tb.Panel:
    panel = (
        tb.Panel().title(title).description(description).datasource(DS).unit(unit)
        .span(width).height(8).fill_opacity(10).line_width(1)
        .legend(cb.VizLegendOptions().display_mode(cm.LegendDisplayMode.LIST)
                .placement(cm.LegendPlacement.BOTTOM).show_legend(True))
    )
    if min_zero:
        panel = panel.min(0)
    if stacked:
        panel = panel.stacking(cb.StackingConfig().mode(cm.StackingMode.NORMAL))
    for ref, target in zip("ABCDEFGHIJ", targets, strict=False):
        panel = panel.with_target(target.ref_id(ref))
    return panel


def stat(title: str, description: str, unit: str, *targets: pb.Dataquery,
         red_above: float | None = None, width: int = 6) -> sb.Panel:
    panel = (
        sb.Panel().title(title).description(description).datasource(DS).unit(unit)
        .span(width).height(4).graph_mode(cm.BigValueGraphMode.AREA)
        .color_mode(cm.BigValueColorMode.VALUE)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]))
    )
    if red_above is not None:
        panel = panel.thresholds(db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps([
            dm.Threshold(value=None, color="green"), dm.Threshold(value=red_above, color="red"),
        ]))
    for ref, target in zip("ABCDEFGHIJ", targets, strict=False):
        panel = panel.with_target(target.ref_id(ref))
    return panel


def rate(metric: str, selector: str = "", by: str = "") -> str:
    """``sum [by (…)] (rate(metric{selector}[$__rate_interval]))``."""
    grouping = f" by ({by}) " if by else ""
    sel = f"{{{selector}}}" if selector else ""
    return f"sum{grouping}(rate({metric}{sel}[{RI}]))"


def quantile(phi: float, histogram: str, selector: str = "", by: str = "") -> str:
    """``histogram_quantile(phi, …)`` over the buckets of ``histogram`` (base name)."""
    keep = f"{by}, le" if by else "le"
    return f"histogram_quantile({phi}, {rate(histogram + '_bucket', selector, keep)})"


JOBS_S = "suffix: jobs/s"


# -- cluster overview -----------------------------------------------------------------------------


def nodes_up() -> sb.Panel:
    return stat("Nodes up", "Node targets Prometheus scraped successfully, of all node targets.",
                "short", q(f"sum({NODE_UP})", "up"), q(f"count({NODE_UP})", "scraped"))


def live_jobs() -> sb.Panel:
    return stat("Live jobs", "Jobs held by all nodes (waiting, delayed, active, dead).", "short",
                q("sum(shardq_jobs)", "jobs"))


def nodes_storage_failed() -> sb.Panel:
    return stat("Nodes refusing writes", "Nodes whose storage failed (they answer reads only).",
                "short", q("sum(shardq_storage_failed)", "failed"), red_above=1)


def oldest_waiting() -> sb.Panel:
    return stat("Oldest waiting job", "Age of the oldest ready job over every queue.", "s",
                q("max(shardq_queue_oldest_waiting_age_seconds)", "age"))


def throughput() -> tb.Panel:
    return timeseries("Throughput", "Jobs pushed and completed per second, all queues.", JOBS_S,
                      q(rate("shardq_jobs_pushed_total"), "pushed"),
                      q(rate("shardq_jobs_completed_total"), "completed"))


def depth_by_state() -> tb.Panel:
    return timeseries("Jobs by state", "Jobs in all queues by state (dead = in a DLQ).", "short",
                      q("sum by (state) (shardq_queue_jobs)", "{{state}}"), stacked=True)


def failures() -> tb.Panel:
    return timeseries(
        "Failures and errors",
        "Failed attempts, retries, jobs sent to a DLQ and jobs expired per second; requests "
        "the gateways answered with an error.", "suffix: /s",
        q(rate("shardq_jobs_failed_total"), "failed attempts"),
        q(rate("shardq_jobs_retried_total"), "retried"),
        q(rate("shardq_jobs_dead_total"), "dead"),
        q(rate("shardq_jobs_expired_total"), "expired"),
        q(rate("shardq_gateway_requests_total", 'outcome="error"'), "gateway request errors"),
    )


def wait_latency() -> tb.Panel:
    return timeseries("Wait time (ready → started)", "p50 and p99 of how long a ready job "
                      "waited for a worker, all queues.", "s",
                      q(quantile(0.5, "shardq_job_wait_seconds"), "p50"),
                      q(quantile(0.99, "shardq_job_wait_seconds"), "p99"))


def run_latency() -> tb.Panel:
    return timeseries("Run time (started → acked)", "p50 and p99 of how long a worker held a "
                      "job until it acked it, all queues.", "s",
                      q(quantile(0.5, "shardq_job_run_seconds"), "p50"),
                      q(quantile(0.99, "shardq_job_run_seconds"), "p99"))


def top_waiting_queues() -> tb.Panel:
    return timeseries("Queues with the most waiting jobs", "The ten queues with the most ready "
                      "jobs.", "short",
                      q('topk(10, sum by (queue) (shardq_queue_jobs{state="waiting"}))',
                        "{{queue}}"))


def jobs_per_node() -> tb.Panel:
    return timeseries("Jobs per node", "Live jobs on each node: how evenly slots spread the load.",
                      "short", q("sum by (instance) (shardq_jobs)", "{{instance}}"), width=24)


def overview() -> db.Dashboard:
    return assemble(
        "shardq-overview", "shardq / Cluster overview",
        "Throughput, depth, failures and latency of a whole shardq cluster.",
        [],
        [("Now", [nodes_up(), live_jobs(), nodes_storage_failed(), oldest_waiting()]),
         ("Jobs", [throughput(), depth_by_state(), failures(), top_waiting_queues()]),
         ("Latency", [wait_latency(), run_latency()]),
         ("Replication", [under_replicated(ALL_SHARDS), without_quorum(ALL_SHARDS),
                          failovers_today(ALL_SHARDS), worst_lag(ALL_SHARDS)]),
         ("Nodes", [jobs_per_node()])],
    )


# -- per-queue detail -----------------------------------------------------------------------------

QUEUE = 'queue="$queue"'


def queue_now() -> sb.Panel:
    return stat("Jobs now", "Jobs of the queue by state.", "short",
                q(f"sum by (state) (shardq_queue_jobs{{{QUEUE}}})", "{{state}}"), width=12)


def queue_oldest_waiting() -> sb.Panel:
    return stat("Oldest waiting job", "Age of the queue's oldest ready job.", "s",
                q(f"max(shardq_queue_oldest_waiting_age_seconds{{{QUEUE}}})", "age"), width=12)


def queue_throughput() -> tb.Panel:
    return timeseries("Throughput", "Jobs of the queue pushed and completed per second.", JOBS_S,
                      q(rate("shardq_jobs_pushed_total", QUEUE), "pushed"),
                      q(rate("shardq_jobs_completed_total", QUEUE), "completed"))


def queue_failures() -> tb.Panel:
    return timeseries("Failures", "Failed attempts, retries, dead and expired jobs of the queue "
                      "per second.", "suffix: /s",
                      q(rate("shardq_jobs_failed_total", QUEUE), "failed attempts"),
                      q(rate("shardq_jobs_retried_total", QUEUE), "retried"),
                      q(rate("shardq_jobs_dead_total", QUEUE), "dead"),
                      q(rate("shardq_jobs_expired_total", QUEUE), "expired"))


def queue_depth() -> tb.Panel:
    return timeseries("Jobs by state", "The queue's jobs by state over time (dead = in its DLQ).",
                      "short", q(f"sum by (state) (shardq_queue_jobs{{{QUEUE}}})", "{{state}}"),
                      stacked=True)


def queue_owner() -> tb.Panel:
    return timeseries("Node holding the queue", "Jobs of the queue per node: the owner of its "
                      "slot (two nodes for a moment while the slot moves).", "short",
                      q(f"sum by (instance) (shardq_queue_jobs{{{QUEUE}}})", "{{instance}}"))


def queue_detail() -> db.Dashboard:
    variable = (
        db.QueryVariable("queue").label("Queue").datasource(DS)
        .query("label_values(shardq_jobs_pushed_total, queue)")
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.ALPHABETICAL_ASC)
    )
    return assemble(
        "shardq-queue", "shardq / Queue",
        "One queue: throughput, failures, depth and where it lives. A node labels at most "
        "max_queue_labels queues (1000); the rest are summed as queue=\"_other\".",
        [variable],
        [("Now", [queue_now(), queue_oldest_waiting()]),
         ("Jobs", [queue_throughput(), queue_failures(), queue_depth(), queue_owner()])],
    )


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
    variable = (
        db.QueryVariable("instance").label("Node").datasource(DS)
        .query("label_values(shardq_slots_owned, instance)")
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.ALPHABETICAL_ASC)
        .multi(True).include_all(True).all_value(".*")
    )
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
    variable = (
        db.QueryVariable("shard").label("Shard").datasource(DS)
        .query('label_values(shardq_replication_term{shard!=""}, shard)')
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.ALPHABETICAL_ASC)
        .multi(True).include_all(True).all_value(".*")
    )
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


# -- assembling -----------------------------------------------------------------------------------


def assemble(uid: str, title: str, description: str, variables: list[db.QueryVariable],
             sections: list[tuple[str, list[Panel]]]) -> db.Dashboard:
    """A dashboard: the datasource variable first, rows in order, panel ids 1, 2, 3, …"""
    dash = (
        db.Dashboard(title).uid(uid).description(description).tags(["shardq"])
        .time("now-1h", "now").refresh("30s").timezone("browser")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .link(db.DashboardLink("shardq").type(dm.DashboardLinkType.DASHBOARDS).tags(["shardq"])
              .as_dropdown(True).include_vars(False).keep_time(True))
        .with_variable(db.DatasourceVariable("datasource").label("Data source").type("prometheus"))
    )
    for variable in variables:
        dash = dash.with_variable(variable)
    next_id = 1
    for row_title, panels in sections:
        dash = dash.with_row(db.Row(row_title).id(next_id))
        next_id += 1
        for panel in panels:
            dash = dash.with_panel(panel.id(next_id))
            next_id += 1
    return dash


#: File name → dashboard.
DASHBOARDS: dict[str, Callable[[], db.Dashboard]] = {
    "cluster-overview.json": overview,
    "queue-detail.json": queue_detail,
    "node-internals.json": node_internals,
    "gateway.json": gateway,
    "replication.json": replication,
}


def render(dashboard: db.Dashboard) -> str:
    """Sorted, stable JSON with a trailing newline."""
    return json.dumps(dashboard.build(), cls=JSONEncoder, sort_keys=True, indent=2,
                      ensure_ascii=False) + "\n"


def dashboards() -> dict[str, dict[str, Any]]:
    """File name → the dashboard as JSON data."""
    return {name: json.loads(render(make())) for name, make in DASHBOARDS.items()}


def write(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, make in DASHBOARDS.items():
        path = out / name
        path.write_text(render(make()), encoding="utf-8")
        written.append(path)
    return written


# -- every expression -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Expr:
    #: ``dashboard:<uid>`` or ``rule:<group>``.
    source: str
    #: Panel title (with the legend of the target) or alert name.
    name: str
    expr: str

    @property
    def is_rule(self) -> bool:
        return self.source.startswith("rule:")


def panels_of(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, also those nested in collapsed rows."""
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels") or [])
    return out


def dashboard_exprs() -> list[Expr]:
    out = []
    for dashboard in dashboards().values():
        for panel in panels_of(dashboard):
            for target in panel.get("targets") or []:
                label = f"{panel['title']} [{target.get('legendFormat', target['refId'])}]"
                out.append(Expr(f"dashboard:{dashboard['uid']}", label, target["expr"]))
    return out


def rules(path: Path = RULES) -> list[dict[str, Any]]:
    """The alert rules of the rule file, each with its group's name as ``group``."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [{**rule, "group": group["name"]} for group in data["groups"] for rule in group["rules"]]


def rule_exprs(path: Path = RULES) -> list[Expr]:
    return [Expr(f"rule:{r['group']}", r.get("alert") or r["record"], r["expr"].strip())
            for r in rules(path)]


def all_exprs() -> list[Expr]:
    """Every PromQL expression of the dashboards and of the alert rules."""
    return dashboard_exprs() + rule_exprs()


#: Grafana's own variables (not defined in a dashboard's templating).
BUILTIN_VARIABLES = frozenset({"__rate_interval", "__interval", "__range", "datasource"})
VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)\}")


def variables_in(expr: str) -> set[str]:
    return {a or b for a, b in VARIABLE.findall(expr)}


def concrete(expr: str, values: dict[str, str] | None = None, rate_interval: str = "1m") -> str:
    """``expr`` as plain PromQL: Grafana's variables replaced (``$instance`` and ``$shard`` by
    ``.*``)."""
    values = {"instance": ".*", "shard": ".*", "__rate_interval": rate_interval,
              "__interval": rate_interval,
              "__range": rate_interval, **(values or {})}

    def fill(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"no value for ${name} in {expr!r}")
        return values[name]

    return VARIABLE.sub(fill, expr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE, help="where to write the JSON")
    parser.add_argument("--list", action="store_true", help="print every PromQL expression")
    args = parser.parse_args(argv)
    if args.list:
        for e in all_exprs():
            print(f"{e.source}\t{e.name}\t{' '.join(e.expr.split())}")
        return 0
    for path in write(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
