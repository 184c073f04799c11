"""The coordinator's sub-commands of ``shardq`` (DESIGN §8): ``operator``, ``up``,
``controller``, ``rebalance``, and ``scale``, ``topology``, ``failover``, which talk to a
running ``shardq up`` over its control socket.

Registered under the ``shardq.commands`` entry-point group (operator/pyproject.toml). Flags
are a contract and each is also a ``SHARDQ_…`` environment variable. Must not: import
kopf, the local cluster or the controller before a sub-command runs (every ``shardq``
invocation loads this module).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections import Counter
from typing import Any

import orjson

from shardq.cli.flags import boolean, flag, tokens
from shardq.cli.subcommands import SubCommand
from shardq.errors import ShardqError
from shardq_node.settings import FSYNC_POLICIES
from shardq_server.cli_flags import server_flags, setup_logging
from shardq_server.running import install_uvloop, until_signalled

# -- operator ----------------------------------------------------------------------------------


def _operator_arguments(p: argparse.ArgumentParser) -> None:
    flag(p, "--kubeconfig", None, help="kubeconfig file (default: in-cluster service account)")
    flag(p, "--namespace", None, help="watch one namespace (default: all)")


def run_operator(args: argparse.Namespace) -> int:
    from .handlers import run

    run(args.kubeconfig, args.namespace)
    return 0


# -- up: the local cluster --------------------------------------------------------------------


def _up_arguments(p: argparse.ArgumentParser) -> None:
    server_flags(p)
    flag(p, "--nodes", 3, int, help="number of nodes (with --replicas > 1: of shards)")
    flag(p, "--replicas", 1, int, help="copies of every shard: 1, 3 or 5", choices=[1, 3, 5])
    flag(p, "--failure-timeout-ms", 2000, int, help="a primary silent this long is replaced")
    flag(p, "--data-dir", ".shardq", help="data directory (one sub-directory per node)")
    flag(p, "--fsync", "always", help="always | everysec | never", choices=FSYNC_POLICIES)


def run_up(args: argparse.Namespace) -> int:
    from .local import LocalCluster

    setup_logging(args.log_level)
    install_uvloop()

    async def main() -> None:
        cluster = LocalCluster(args.host, args.port, args.http_port,
                               os.path.abspath(args.data_dir), args.fsync, tokens(args.token),
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


# -- scale, topology, failover: a running `shardq up`, over its control socket ---------------


def _port_flag(p: argparse.ArgumentParser) -> None:
    flag(p, "--port", 6789, int, help="gateway port of the local cluster")


async def _control(port: int, req: dict[str, Any]) -> tuple[asyncio.StreamReader,
                                                             asyncio.StreamWriter]:
    from .local import control_path

    path = control_path(port)
    try:
        reader, writer = await asyncio.open_unix_connection(path)
    except OSError as exc:
        raise ShardqError(f"no local cluster with a gateway on port {port} ({path}: "
                          f"{exc.strerror}); start one with: shardq up --port {port}") from None
    writer.write(orjson.dumps(req) + b"\n")
    await writer.drain()
    return reader, writer


def _bar(done: int, total: int) -> None:
    width = 40
    filled = width * done // total if total else width
    sys.stdout.write(f"\rmoving slots [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    sys.stdout.flush()


def print_topology(topo: dict[str, Any] | None) -> None:
    if topo is None:
        print("no topology (standalone)")
        return
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


def _scale_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("nodes", type=int)
    _port_flag(p)


def run_scale(args: argparse.Namespace) -> int:
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
                print_topology(msg["topology"])
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


def _topology_arguments(p: argparse.ArgumentParser) -> None:
    _port_flag(p)
    flag(p, "--json", False, boolean, "print raw JSON", nargs="?", const=True)


def run_topology(args: argparse.Namespace) -> int:
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
        print_topology(answer["topology"])
    return 0


def _failover_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("shard")
    flag(p, "--to", "", help="the member to make primary (default: any caught-up follower)")
    _port_flag(p)


def run_failover(args: argparse.Namespace) -> int:
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
        print_topology(msg["topology"])
        return 0

    try:
        return asyncio.run(main())
    except ShardqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


# -- controller, rebalance --------------------------------------------------------------------


def _controller_arguments(p: argparse.ArgumentParser) -> None:
    flag(p, "--store", "", help="the topology store file (shardq up: DATA/topology.store.json)")
    flag(p, "--cluster-token", None, help="token for the nodes' internal commands")
    flag(p, "--failure-timeout-ms", 2000, int, help="a primary silent this long is replaced")
    flag(p, "--log-level", "INFO", help="logging level")


def run_controller(args: argparse.Namespace) -> int:
    from .controller import Controller, ControllerSettings
    from .store import FileStore

    setup_logging(args.log_level)
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


def _rebalance_arguments(p: argparse.ArgumentParser) -> None:
    flag(p, "--nodes", "", help="the wanted nodes: name=host:port[,name=host:port…]")
    flag(p, "--seed", "", help="more node addresses to read the topology from")
    flag(p, "--cluster-token", None, help="token for the nodes' internal commands")
    flag(p, "--batch", 4, int, help="slots moved per step")


def run_rebalance(args: argparse.Namespace) -> int:
    from shardq.wire.topology import NodeInfo

    from .rebalance import Rebalancer

    setup_logging("WARNING")
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


OPERATOR = SubCommand("operator", "run the Kubernetes operator (kopf) of ShardqCluster",
                      _operator_arguments, run_operator)
UP = SubCommand("up", "run a local cluster on loopback in the foreground", _up_arguments, run_up)
SCALE = SubCommand("scale", "grow or shrink the local cluster (shardq up) live",
                   _scale_arguments, run_scale)
TOPOLOGY = SubCommand("topology", "print the topology of the local cluster",
                      _topology_arguments, run_topology)
FAILOVER = SubCommand("failover", "move a shard's primary (planned, no failed request)",
                      _failover_arguments, run_failover)
CONTROLLER = SubCommand("controller", "run the failover controller over a topology store",
                        _controller_arguments, run_controller)
REBALANCE = SubCommand("rebalance", "move slots so the given nodes own the ring",
                       _rebalance_arguments, run_rebalance)
