"""``shardq node``: the sub-command that runs one storage node (DESIGN §8).

Registered under the ``shardq.commands`` entry-point group (node/pyproject.toml), so the
``shardq`` command has it when this distribution is installed. Its flags are a contract
and each is also a ``SHARDQ_…`` environment variable. Must not: import the node's runtime
before the sub-command runs (every ``shardq`` invocation loads this module).
"""

from __future__ import annotations

import argparse

from shardq.cli.flags import flag, tokens
from shardq.cli.subcommands import SubCommand
from shardq_server.cli_flags import limit_flags, limits, server_flags, setup_logging

from .engine_config import EngineConfig
from .settings import FSYNC_POLICIES, NodeSettings, RequestLimits, StorageSettings


def node_arguments(p: argparse.ArgumentParser) -> None:
    server_flags(p)
    limit_flags(p)
    flag(p, "--name", "node-0", help="node name in the topology")
    flag(p, "--data-dir", None, help="directory for WAL, snapshots, blobs (none = memory)")
    flag(p, "--fsync", "always", help="always | everysec | never", choices=FSYNC_POLICIES)
    flag(p, "--cluster-token", None, help="token for internal cluster commands")
    flag(p, "--default-lease-ms", 30 * 60 * 1000, int, "lease of jobs without timeout")
    flag(p, "--max-payload", 8 * 1024 * 1024, int, "largest payload accepted (bytes)")
    flag(p, "--max-line", 16 * 1024 * 1024, int, "longest request line accepted (bytes)")
    flag(p, "--max-queue-labels", 1000, int, "queues with their own /metrics label")
    flag(p, "--failure-timeout-ms", 2000, int,
         "a replicated primary without quorum this long refuses writes")
    p.add_argument("--no-metrics", dest="metrics", action="store_false",
                   help="no per-request metrics on the hot path (to measure their cost)")
    _storage_flags(p)
    _request_limit_flags(p)


def _storage_flags(p: argparse.ArgumentParser) -> None:
    flag(p, "--segment-bytes", 64 * 1024 * 1024, int, "WAL segment size")
    flag(p, "--snapshot-bytes", 256 * 1024 * 1024, int, "WAL growth that triggers a snapshot")
    flag(p, "--blob-threshold", 64 * 1024, int, "payloads above this go to the blob store")
    flag(p, "--memory-budget", 1024**3, int, "bytes of payloads kept in memory")
    flag(p, "--disk-budget", 10 * 1024**3, int, "bytes of payloads in the blob store")
    flag(p, "--storage-retry-seconds", 2.0, float,
         "after a storage failure, how often to try the disk again")
    p.add_argument("--no-group-commit", dest="group_commit", action="store_false",
                   help="fsync every command on its own (benchmark baseline only)")


def _request_limit_flags(p: argparse.ArgumentParser) -> None:
    """What client input may make a node hold (docs/limits.md)."""
    flag(p, "--max-queues", 100_000, int, "queues a node holds; more are refused")
    flag(p, "--queue-idle-ms", 60_000, int,
         "ms after which an empty queue without settings is forgotten")
    flag(p, "--max-crons", 1_000, int, "crons a node holds; more are refused")
    flag(p, "--max-cron-payload", 64 * 1024, int, "largest cron data (bytes)")
    flag(p, "--max-result", None, int, "largest ACK result (bytes; default: --max-payload)")
    flag(p, "--max-message", None, int,
         "longest PROGRESS message / FAIL error (bytes; default: --max-payload)")
    flag(p, "--results-max", 100_000, int, "finished jobs (and results) kept for GETRESULT")
    flag(p, "--results-max-bytes", 256 * 1024**2, int, "bytes of results kept for GETRESULT")
    flag(p, "--max-list-queues", 10_000, int, "queues in one LISTQUEUES answer")


def node_settings(args: argparse.Namespace) -> NodeSettings:
    """The ``NodeSettings`` that ``node_arguments``'s flags describe."""
    return NodeSettings(
        name=args.name,
        host=args.host,
        port=args.port,
        http_port=args.http_port,
        tokens=tokens(args.token),
        cluster_token=args.cluster_token,
        max_line=args.max_line,
        max_queue_labels=args.max_queue_labels,
        metrics=args.metrics,
        failure_timeout=args.failure_timeout_ms / 1000,
        limits=limits(args),
        storage=StorageSettings(
            data_dir=args.data_dir, fsync=args.fsync, max_payload=args.max_payload,
            segment_bytes=args.segment_bytes, snapshot_bytes=args.snapshot_bytes,
            blob_threshold=args.blob_threshold, memory_budget=args.memory_budget,
            disk_budget=args.disk_budget, group_commit=args.group_commit,
            retry_seconds=args.storage_retry_seconds,
        ),
        engine=EngineConfig(
            default_lease_ms=args.default_lease_ms, max_queues=args.max_queues,
            queue_idle_ms=args.queue_idle_ms, max_crons=args.max_crons,
            results_max=args.results_max, results_max_bytes=args.results_max_bytes,
        ),
        request_limits=RequestLimits(
            max_result=args.max_result, max_message=args.max_message,
            max_cron_payload=args.max_cron_payload, max_list_queues=args.max_list_queues,
        ),
    )


def run_node(args: argparse.Namespace) -> int:
    from .main import run

    setup_logging(args.log_level)
    run(node_settings(args))
    return 0


NODE = SubCommand("node", "run one storage node", node_arguments, run_node)
