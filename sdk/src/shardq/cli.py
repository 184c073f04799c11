"""The ``shardq`` command line (DESIGN §8: its flags are a contract).

Every flag is also an environment variable: ``--data-dir`` is
``SHARDQ_DATA_DIR``, ``--port`` is ``SHARDQ_PORT``, and so on; a flag given on
the command line wins. Server sub-commands import server code lazily, so the
SDK alone can run the client sub-commands.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from shardq.errors import ShardqError


def _env_name(flag: str) -> str:
    return "SHARDQ_" + flag.lstrip("-").replace("-", "_").upper()


def _flag(
    parser: argparse.ArgumentParser,
    flag: str,
    default: Any = None,
    type: Callable[[str], Any] = str,
    help: str = "",
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> None:
    """Add ``--flag`` whose default comes from ``SHARDQ_FLAG`` when set."""
    environ = os.environ if env is None else env
    name = _env_name(flag)
    if name in environ:
        default = type(environ[name])
    parser.add_argument(flag, default=default, type=type,
                        help=f"{help} [env {name}]".strip(), **kwargs)


def _tokens(value: str) -> tuple[str, ...]:
    return tuple(t for t in value.split(",") if t)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardq", description="shardq job queue")
    sub = parser.add_subparsers(dest="command", required=True)

    node = sub.add_parser("node", help="run one storage node")
    _server_flags(node)
    _limit_flags(node)
    _flag(node, "--name", "node-0", help="node name in the topology")
    _flag(node, "--data-dir", None, help="directory for WAL, snapshots, blobs (none = memory)")
    _flag(node, "--fsync", "always", help="always | everysec | never",
          choices=["always", "everysec", "never"])
    _flag(node, "--cluster-token", None, help="token for internal cluster commands")
    _flag(node, "--default-lease-ms", 30 * 60 * 1000, int, "lease of jobs without timeout")
    _flag(node, "--max-payload", 8 * 1024 * 1024, int, "largest payload accepted (bytes)")
    _flag(node, "--max-line", 16 * 1024 * 1024, int, "longest request line accepted (bytes)")
    _flag(node, "--max-queue-labels", 1000, int, "queues with their own /metrics label")
    _flag(node, "--failure-timeout-ms", 2000, int,
          "a replicated primary without quorum this long refuses writes")
    node.add_argument("--no-metrics", dest="metrics", action="store_false",
                      help="no per-request metrics on the hot path (to measure their cost)")
    _storage_flags(node)
    _request_limit_flags(node)

    op = sub.add_parser("operator", help="run the Kubernetes operator (kopf) of ShardqCluster")
    _flag(op, "--kubeconfig", None, help="kubeconfig file (default: in-cluster service account)")
    _flag(op, "--namespace", None, help="watch one namespace (default: all)")

    gw = sub.add_parser("gateway", help="run a gateway (routes by slot to the nodes)")
    _server_flags(gw)
    _limit_flags(gw)
    _flag(gw, "--seed", "127.0.0.1:6800", help="node addresses host:port[,host:port…]")
    _flag(gw, "--cluster-token", None, help="token the gateway uses with the nodes")

    up = sub.add_parser("up", help="run a local cluster on loopback in the foreground")
    _server_flags(up)
    _flag(up, "--nodes", 3, int, help="number of nodes (with --replicas > 1: of shards)")
    _flag(up, "--replicas", 1, int, help="copies of every shard: 1, 3 or 5", choices=[1, 3, 5])
    _flag(up, "--failure-timeout-ms", 2000, int, help="a primary silent this long is replaced")
    _flag(up, "--data-dir", ".shardq", help="data directory (one sub-directory per node)")
    _flag(up, "--fsync", "always", help="always | everysec | never",
          choices=["always", "everysec", "never"])

    scale = sub.add_parser("scale", help="grow or shrink the local cluster (shardq up) live")
    scale.add_argument("nodes", type=int)
    _flag(scale, "--port", 6789, int, help="gateway port of the local cluster")
    topo = sub.add_parser("topology", help="print the topology of the local cluster")
    _flag(topo, "--port", 6789, int, help="gateway port of the local cluster")
    _flag(topo, "--json", False, lambda v: v.lower() in ("1", "true", "yes"), "print raw JSON",
          nargs="?", const=True)

    fo = sub.add_parser("failover", help="move a shard's primary (planned, no failed request)")
    fo.add_argument("shard")
    _flag(fo, "--to", "", help="the member to make primary (default: any caught-up follower)")
    _flag(fo, "--port", 6789, int, help="gateway port of the local cluster")

    ctl = sub.add_parser("controller", help="run the failover controller over a topology store")
    _flag(ctl, "--store", "", help="the topology store file (shardq up: DATA/topology.store.json)")
    _flag(ctl, "--cluster-token", None, help="token for the nodes' internal commands")
    _flag(ctl, "--failure-timeout-ms", 2000, int, help="a primary silent this long is replaced")
    _flag(ctl, "--log-level", "INFO", help="logging level")

    reb = sub.add_parser("rebalance", help="move slots so the given nodes own the ring")
    _flag(reb, "--nodes", "", help="the wanted nodes: name=host:port[,name=host:port…]")
    _flag(reb, "--seed", "", help="more node addresses to read the topology from")
    _flag(reb, "--cluster-token", None, help="token for the nodes' internal commands")
    _flag(reb, "--batch", 4, int, help="slots moved per step")

    for name, helptext in (("push", "push one job"), ("pull", "pull one job and print it"),
                           ("stats", "print STATS"), ("queues", "list queues")):
        p = sub.add_parser(name, help=helptext)
        _client_flags(p)
        if name == "push":
            p.add_argument("queue")
            p.add_argument("data", help="the job's JSON payload")
            p.add_argument("--priority", type=int, default=0)
            p.add_argument("--delay", type=int, default=None, help="ms")
            p.add_argument("--max-attempts", type=int, default=None)
            p.add_argument("--backoff", type=int, default=None, help="ms")
            p.add_argument("--unique-key", default=None)
        elif name == "pull":
            p.add_argument("queue")
            p.add_argument("--timeout", type=int, default=5000, help="ms to wait")
            p.add_argument("--ack", action="store_true", help="ack the job right away")
    cron = sub.add_parser("cron", help="manage crons: add, list, delete")
    cron_sub = cron.add_subparsers(dest="action", required=True)
    add = cron_sub.add_parser("add", help="create or replace a cron")
    add.add_argument("name")
    add.add_argument("queue")
    add.add_argument("schedule", help="'*/N' (every N s) or a 5/6-field cron expression")
    add.add_argument("data", nargs="?", default="null", help="the job's JSON payload")
    add.add_argument("--priority", type=int, default=0)
    cron_sub.add_parser("list", help="list crons with their next run")
    delete = cron_sub.add_parser("delete", help="delete a cron")
    delete.add_argument("name")
    for p in cron_sub.choices.values():
        _client_flags(p)

    queue = sub.add_parser("queue", help="control a queue: pause, resume, limit, dlq, retry")
    queue_sub = queue.add_subparsers(dest="action", required=True)
    for action in ("pause", "resume", "dlq", "retry"):
        q = queue_sub.add_parser(action)
        q.add_argument("queue")
    limit = queue_sub.add_parser("limit", help="set or clear rate and concurrency limits")
    limit.add_argument("queue")
    limit.add_argument("--rate", type=int, default=None, help="jobs per second (0 = clear)")
    limit.add_argument("--concurrency", type=int, default=None, help="active jobs (0 = clear)")
    for p in queue_sub.choices.values():
        _client_flags(p)
    return parser


def _storage_flags(p: argparse.ArgumentParser) -> None:
    _flag(p, "--segment-bytes", 64 * 1024 * 1024, int, "WAL segment size")
    _flag(p, "--snapshot-bytes", 256 * 1024 * 1024, int, "WAL growth that triggers a snapshot")
    _flag(p, "--blob-threshold", 64 * 1024, int, "payloads above this go to the blob store")
    _flag(p, "--memory-budget", 1024**3, int, "bytes of payloads kept in memory")
    _flag(p, "--disk-budget", 10 * 1024**3, int, "bytes of payloads in the blob store")
    _flag(p, "--storage-retry-seconds", 2.0, float,
          "after a storage failure, how often to try the disk again")
    p.add_argument("--no-group-commit", dest="group_commit", action="store_false",
                   help="fsync every command on its own (benchmark baseline only)")


def _request_limit_flags(p: argparse.ArgumentParser) -> None:
    """What client input may make a node hold (docs/limits.md)."""
    _flag(p, "--max-queues", 100_000, int, "queues a node holds; more are refused")
    _flag(p, "--queue-idle-ms", 60_000, int,
          "ms after which an empty queue without settings is forgotten")
    _flag(p, "--max-crons", 1_000, int, "crons a node holds; more are refused")
    _flag(p, "--max-cron-payload", 64 * 1024, int, "largest cron data (bytes)")
    _flag(p, "--max-result", None, int, "largest ACK result (bytes; default: --max-payload)")
    _flag(p, "--max-message", None, int,
          "longest PROGRESS message / FAIL error (bytes; default: --max-payload)")
    _flag(p, "--results-max", 100_000, int, "finished jobs (and results) kept for GETRESULT")
    _flag(p, "--results-max-bytes", 256 * 1024**2, int, "bytes of results kept for GETRESULT")
    _flag(p, "--max-list-queues", 10_000, int, "queues in one LISTQUEUES answer")


def _server_flags(p: argparse.ArgumentParser) -> None:
    _flag(p, "--host", "127.0.0.1", help="address to listen on")
    _flag(p, "--port", 6789, int, help="TCP port")
    _flag(p, "--http-port", 6790, int, help="HTTP port (0 = off)")
    _flag(p, "--token", "", help="client token(s), comma-separated (empty = no auth)")
    _flag(p, "--log-level", "INFO", help="logging level")


def _limit_flags(p: argparse.ArgumentParser) -> None:
    """The flags of ``shardq_server.limits.Limits`` (docs/limits.md), one per field."""
    from shardq_server.limits import Limits

    d = Limits()
    _flag(p, "--max-output", d.max_output, int,
          "unsent answer bytes of a connection past which it stops running lines and reading")
    _flag(p, "--max-output-hard", d.max_output_hard, int,
          "unsent answer bytes past which a connection is closed")
    _flag(p, "--output-timeout", d.output_timeout, float,
          "seconds a connection over --max-output may read nothing before it is closed (0 = never)")
    _flag(p, "--max-backlog-bytes", d.max_backlog_bytes, int,
          "bytes of lines waiting behind a blocked command before reading pauses")
    _flag(p, "--max-backlog-lines", d.max_backlog_lines, int,
          "lines waiting behind a blocked command before reading pauses")
    _flag(p, "--max-connections", d.max_connections, int, "open TCP connections")
    _flag(p, "--http-max-connections", d.http_max_connections, int, "open HTTP connections")
    _flag(p, "--http-header-timeout", d.http_header_timeout, float,
          "seconds to receive a request's head (also the idle keep-alive time)")
    _flag(p, "--http-body-timeout", d.http_body_timeout, float,
          "seconds to receive a request's body once its head came")
    _flag(p, "--max-depth", d.max_depth, int,
          "levels of arrays/objects a kept value (data, result) may nest (1-200)")


def _limits(args: argparse.Namespace) -> Any:
    from shardq_server.limits import Limits

    try:
        return Limits(
            max_output=args.max_output, max_output_hard=args.max_output_hard,
            output_timeout=args.output_timeout, max_backlog_bytes=args.max_backlog_bytes,
            max_backlog_lines=args.max_backlog_lines, max_connections=args.max_connections,
            http_max_connections=args.http_max_connections,
            http_header_timeout=args.http_header_timeout,
            http_body_timeout=args.http_body_timeout, max_depth=args.max_depth,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _client_flags(p: argparse.ArgumentParser) -> None:
    _flag(p, "--address", "127.0.0.1:6789", help="gateway or node address host:port")
    _flag(p, "--token", None, help="client token")


def _node_settings(args: argparse.Namespace) -> Any:
    from shardq_node.engine import EngineConfig
    from shardq_node.settings import NodeSettings, RequestLimits, StorageSettings

    return NodeSettings(
        name=args.name,
        host=args.host,
        port=args.port,
        http_port=args.http_port,
        tokens=_tokens(args.token),
        cluster_token=args.cluster_token,
        max_line=args.max_line,
        max_queue_labels=args.max_queue_labels,
        metrics=args.metrics,
        failure_timeout=args.failure_timeout_ms / 1000,
        limits=_limits(args),
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


def _setup_logging(level: str) -> None:
    import logging

    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_node(args: argparse.Namespace) -> int:
    from shardq_node.main import run

    _setup_logging(args.log_level)
    run(_node_settings(args))
    return 0


def cmd_operator(args: argparse.Namespace) -> int:
    from shardq_operator.handlers import run

    run(args.kubeconfig, args.namespace)
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    from shardq_gateway.main import run
    from shardq_gateway.settings import GatewaySettings

    _setup_logging(args.log_level)
    run(GatewaySettings(
        host=args.host, port=args.port, http_port=args.http_port,
        seeds=[s for s in args.seed.split(",") if s], tokens=_tokens(args.token),
        cluster_token=args.cluster_token, limits=_limits(args),
    ))
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    import signal

    from shardq_operator.local import LocalCluster
    from shardq_server.running import install_uvloop

    _setup_logging(args.log_level)
    install_uvloop()

    async def main() -> None:
        cluster = LocalCluster(args.host, args.port, args.http_port,
                               os.path.abspath(args.data_dir), args.fsync, _tokens(args.token),
                               replicas=args.replicas,
                               failure_timeout=args.failure_timeout_ms / 1000)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await cluster.start(args.nodes)
            what = (f"{args.nodes} shards of {args.replicas} nodes" if args.replicas > 1
                    else f"{args.nodes} nodes")
            print(f"shardq is up: {what} and a gateway on TCP "
                  f"{args.host}:{args.port} (data in {cluster.data_dir})", flush=True)
            if args.http_port:
                print(f"dashboard: http://{args.host}:{args.http_port}/", flush=True)
            print(f"scale it live with: shardq scale N --port {args.port}; Ctrl-C stops it.",
                  flush=True)
            await stop.wait()
        finally:
            await cluster.stop()

    asyncio.run(main())
    return 0


async def _control(port: int, req: dict[str, Any]) -> Any:
    from shardq_operator.local import control_path

    path = control_path(port)
    try:
        reader, writer = await asyncio.open_unix_connection(path)
    except OSError as exc:
        raise ShardqError(f"no local cluster with a gateway on port {port} ({path}: "
                          f"{exc.strerror}); start one with: shardq up --port {port}") from None
    writer.write(orjson.dumps(req) + b"\n")
    await writer.drain()
    return reader, writer


def cmd_scale(args: argparse.Namespace) -> int:
    async def main() -> int:
        reader, writer = await _control(args.port, {"cmd": "SCALE", "nodes": args.nodes})
        try:
            while line := await reader.readline():
                msg = orjson.loads(line)
                if "progress" in msg:
                    _bar(msg["progress"], msg["total"])
                    continue
                sys.stdout.write("\n")
                if not msg.get("ok"):
                    print(f"error: {msg.get('error')}", file=sys.stderr)
                    return 1
                _print_topology(msg["topology"])
                return 0
            print("error: the supervisor closed the connection", file=sys.stderr)
            return 1
        finally:
            writer.close()

    try:
        return asyncio.run(main())
    except ShardqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _bar(done: int, total: int) -> None:
    width = 40
    filled = width * done // total if total else width
    sys.stdout.write(f"\rmoving slots [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    sys.stdout.flush()


def _print_topology(topo: dict[str, Any] | None) -> None:
    if topo is None:
        print("no topology (standalone)")
        return
    from collections import Counter

    counts = Counter(topo["owners"])
    print(f"epoch {topo['epoch']}, {len(topo['nodes'])} nodes, {len(topo['moving'])} slots moving")
    shards = topo.get("shards") or {}
    if not shards:
        for n in topo["nodes"]:
            slots = counts.get(n["name"], 0)
            print(f"  {n['name']:<10} {n['tcp']:<22} {n['state']:<8} {slots:>5} slots")
        return
    where = {n["name"]: n["tcp"] for n in topo["nodes"]}
    for name, sh in sorted(shards.items()):
        print(f"  {name:<10} term {sh['term']:<4} {sh['state']:<8} {counts.get(name, 0):>5} slots")
        for member in [*sh["members"], *sh["learners"]]:
            role = ("primary" if member == sh["primary"] else
                    "learner" if member in sh["learners"] else "follower")
            print(f"    {member:<14} {where.get(member, '?'):<22} {role}")


def cmd_topology(args: argparse.Namespace) -> int:
    async def main() -> Any:
        reader, writer = await _control(args.port, {"cmd": "TOPOLOGY"})
        try:
            return orjson.loads(await reader.readline())
        finally:
            writer.close()

    try:
        answer = asyncio.run(main())
    except ShardqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(orjson.dumps(answer["topology"]).decode())
    else:
        _print_topology(answer["topology"])
    return 0


def cmd_failover(args: argparse.Namespace) -> int:
    async def main() -> int:
        reader, writer = await _control(args.port, {"cmd": "FAILOVER", "shard": args.shard,
                                                    "to": args.to})
        try:
            msg = orjson.loads(await reader.readline() or b"{}")
        finally:
            writer.close()
        if not msg.get("ok"):
            print(f"error: {msg.get('error', 'the supervisor closed the connection')}",
                  file=sys.stderr)
            return 1
        _print_topology(msg["topology"])
        return 0

    try:
        return asyncio.run(main())
    except ShardqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def cmd_controller(args: argparse.Namespace) -> int:
    from shardq_operator.controller import Controller, ControllerSettings
    from shardq_operator.store import FileStore
    from shardq_server.running import install_uvloop, until_signalled

    _setup_logging(args.log_level)
    if not args.store:
        print("error: --store is required", file=sys.stderr)
        return 2
    install_uvloop()

    async def main() -> None:
        ctl = Controller(FileStore(args.store), ControllerSettings(
            failure_timeout=args.failure_timeout_ms / 1000, token=args.cluster_token))
        task = asyncio.get_running_loop().create_task(ctl.run())
        try:
            await until_signalled()
        finally:
            task.cancel()
            await ctl.close()

    asyncio.run(main())
    return 0


def cmd_rebalance(args: argparse.Namespace) -> int:
    from shardq.wire.topology import NodeInfo
    from shardq_operator.rebalance import Rebalancer

    _setup_logging("WARNING")
    wanted = []
    for item in (x for x in args.nodes.split(",") if x):
        name, sep, address = item.partition("=")
        if not sep:
            print(f"error: --nodes takes name=host:port, got {item!r}", file=sys.stderr)
            return 2
        wanted.append(NodeInfo(name, address))

    def progress(done: int, total: int) -> None:
        print(orjson.dumps({"progress": done, "total": total}).decode(), flush=True)

    async def main() -> Any:
        reb = Rebalancer(token=args.cluster_token, batch=args.batch, on_progress=progress)
        try:
            return await reb.converge(wanted, [s for s in args.seed.split(",") if s])
        finally:
            await reb.close()

    topo = asyncio.run(main())
    print(orjson.dumps({"ok": True, "epoch": topo.epoch}).decode(), flush=True)
    return 0


def _client_call(args: argparse.Namespace, fn: Callable[[Any], Any]) -> int:
    from shardq.client import AsyncClient

    async def main() -> Any:
        async with AsyncClient(args.address, token=args.token) as client:
            return await fn(client)

    try:
        result = asyncio.run(main())
    except ShardqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if result is not None:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    try:
        data = orjson.loads(args.data)
    except orjson.JSONDecodeError as exc:
        print(f"error: data is not valid JSON: {exc}", file=sys.stderr)
        return 2

    async def push(client: Any) -> Any:
        job_id = await client.push(
            args.queue, data, priority=args.priority, delay=args.delay,
            max_attempts=args.max_attempts, backoff=args.backoff, unique_key=args.unique_key,
        )
        return {"id": job_id}

    return _client_call(args, push)


def cmd_pull(args: argparse.Namespace) -> int:
    async def pull(client: Any) -> Any:
        job = await client.pull(args.queue, timeout=args.timeout)
        if job is None:
            return None
        if args.ack:
            await client.ack(job)
        return dataclasses.asdict(job)

    return _client_call(args, pull)


def cmd_stats(args: argparse.Namespace) -> int:
    return _client_call(args, lambda client: client.stats())


def cmd_queues(args: argparse.Namespace) -> int:
    return _client_call(args, lambda client: client.list_queues())


def cmd_cron(args: argparse.Namespace) -> int:
    async def run(client: Any) -> Any:
        if args.action == "add":
            await client.add_cron(args.name, args.queue, args.schedule, orjson.loads(args.data),
                                  args.priority)
            return {"ok": True}
        if args.action == "delete":
            await client.delete_cron(args.name)
            return {"ok": True}
        return await client.list_crons()

    if args.action == "add":
        try:
            orjson.loads(args.data)
        except orjson.JSONDecodeError as exc:
            print(f"error: data is not valid JSON: {exc}", file=sys.stderr)
            return 2
    return _client_call(args, run)


def cmd_queue(args: argparse.Namespace) -> int:
    async def run(client: Any) -> Any:
        q = args.queue
        if args.action == "pause":
            await client.pause(q)
        elif args.action == "resume":
            await client.resume(q)
        elif args.action == "dlq":
            return [dataclasses.asdict(job) for job in await client.dlq(q)]
        elif args.action == "retry":
            return {"retried": await client.retry_dlq(q)}
        else:
            if args.rate is None and args.concurrency is None:
                raise ShardqError("give --rate and/or --concurrency (0 clears a limit)")
            if args.rate is not None:
                await (client.set_rate_limit(q, args.rate) if args.rate
                       else client.clear_rate_limit(q))
            if args.concurrency is not None:
                await (client.set_concurrency(q, args.concurrency) if args.concurrency
                       else client.clear_concurrency(q))
        return {"ok": True}

    return _client_call(args, run)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "node": cmd_node, "up": cmd_up, "push": cmd_push, "pull": cmd_pull, "stats": cmd_stats,
    "queues": cmd_queues, "cron": cmd_cron, "queue": cmd_queue, "gateway": cmd_gateway,
    "operator": cmd_operator,
    "scale": cmd_scale, "topology": cmd_topology, "rebalance": cmd_rebalance,
    "failover": cmd_failover, "controller": cmd_controller,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
