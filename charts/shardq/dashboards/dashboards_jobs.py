"""The jobs' dashboards, one function per panel: the cluster overview (throughput, depth,
failures, latency; its replication row borrows the replication dashboard's stats) and one
queue's detail.

``generate.py`` writes them. Must not: write files.
"""

from __future__ import annotations

from dashboard_blocks import (
    JOBS_S,
    NODE_UP,
    assemble,
    q,
    quantile,
    query_variable,
    rate,
    stat,
    timeseries,
)
from dashboards_servers import (
    ALL_SHARDS,
    failovers_today,
    under_replicated,
    without_quorum,
    worst_lag,
)
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import stat as sb
from grafana_foundation_sdk.builders import timeseries as tb

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
    variable = query_variable("queue", "Queue", "label_values(shardq_jobs_pushed_total, queue)")
    return assemble(
        "shardq-queue", "shardq / Queue",
        "One queue: throughput, failures, depth and where it lives. A node labels at most "
        "max_queue_labels queues (1000); the rest are summed as queue=\"_other\".",
        [variable],
        [("Now", [queue_now(), queue_oldest_waiting()]),
         ("Jobs", [queue_throughput(), queue_failures(), queue_depth(), queue_owner()])],
    )


