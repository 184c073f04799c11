"""``shardq up``: a local cluster of node processes and a gateway, with live scaling.

The supervisor starts ``shardq node`` processes on free loopback ports (their
names, ports and data directories are kept in ``<data-dir>/cluster.json`` so a
restart finds them again), brings the topology to the ring over them with the
rebalancer (finishing any move a killed coordinator left), starts
``shardq gateway`` on the requested port, and listens for orders on a unix
socket named after that port (``control_path``): ``shardq scale N`` and
``shardq topology`` use it. Scaling up starts nodes, then moves slots to them;
scaling down moves every slot off the leaving nodes, then stops them.

Every run generates a cluster token: the nodes and the rebalancer get it, the
gateway and clients never do (they get the client tokens, when ``--token`` is
given), so no client can run a node's internal commands (docs/security.md).
Tokens reach the processes in their environment, not on their command lines
(which every local user can read in ``/proc``).

Must not: move slots itself; operator/rebalance.py does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from shardq.topology import NodeInfo, Topology

from .rebalance import Rebalancer

log = logging.getLogger("shardq.up")


def control_path(port: int) -> str:
    """The supervisor's control socket for the cluster whose gateway listens on ``port``."""
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return os.path.join(base, f"shardq-up-{port}.sock")


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class LocalNode:
    name: str
    port: int
    http_port: int
    proc: subprocess.Popen[bytes] | None = None

    def info(self, host: str) -> NodeInfo:
        http = f"{host}:{self.http_port}" if self.http_port else ""
        return NodeInfo(self.name, f"{host}:{self.port}", http)


@dataclass
class LocalCluster:
    host: str
    port: int
    http_port: int
    data_dir: str
    fsync: str = "always"
    tokens: tuple[str, ...] = ()
    #: For the nodes' internal commands (slot moves); generated for each run.
    cluster_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    nodes: list[LocalNode] = field(default_factory=list)
    gateway: subprocess.Popen[bytes] | None = None
    topology: Topology | None = None
    _server: asyncio.AbstractServer | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, count: int) -> None:
        os.makedirs(self.data_dir, exist_ok=True)
        self.nodes = self._load_members()
        await self._grow(count)
        self.topology = await self._converge(self.nodes[:count], None)
        for gone in self.nodes[count:]:  # a scale-down the last run did not finish
            await self._stop_node(gone)
        self.nodes = self.nodes[:count]
        self._save_members()
        self.gateway = self._spawn_gateway()
        await _wait_port(self.host, self.port, self.gateway)
        if self.http_port:
            await _wait_port(self.host, self.http_port, self.gateway)
        path = control_path(self.port)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._server = await asyncio.start_unix_server(self._control, path)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(control_path(self.port))
        procs = [p for p in [self.gateway, *(n.proc for n in self.nodes)] if p is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                await asyncio.to_thread(proc.wait, 15)
            except subprocess.TimeoutExpired:
                proc.kill()

    # -- members --------------------------------------------------------------------------------

    def _members_path(self) -> str:
        return os.path.join(self.data_dir, "cluster.json")

    def _load_members(self) -> list[LocalNode]:
        try:
            with open(self._members_path(), "rb") as f:
                raw = orjson.loads(f.read())
        except FileNotFoundError:
            return []
        return [LocalNode(m["name"], m["port"], m["http_port"]) for m in raw["nodes"]]

    def _save_members(self) -> None:
        raw = {"nodes": [{"name": n.name, "port": n.port, "http_port": n.http_port}
                         for n in self.nodes]}
        tmp = self._members_path() + ".tmp"
        with open(tmp, "wb") as f:
            f.write(orjson.dumps(raw, option=orjson.OPT_INDENT_2))
        os.replace(tmp, self._members_path())

    async def _grow(self, count: int) -> None:
        names = {n.name for n in self.nodes}
        i = 0
        while len(self.nodes) < count:
            name = f"node-{i}"
            i += 1
            if name in names:
                continue
            http = free_port(self.host) if self.http_port else 0
            self.nodes.append(LocalNode(name, free_port(self.host), http))
        for node in self.nodes:
            if node.proc is None or node.proc.poll() is not None:
                node.proc = self._spawn_node(node)
        for node in self.nodes:
            await _wait_port(self.host, node.port, node.proc)

    def _spawn_node(self, node: LocalNode) -> subprocess.Popen[bytes]:
        argv = [
            sys.executable, "-m", "shardq.cli", "node", "--name", node.name, "--host", self.host,
            "--port", str(node.port), "--http-port", str(node.http_port),
            "--data-dir", os.path.join(self.data_dir, node.name), "--fsync", self.fsync,
        ]
        return self._spawn(argv, node.name, SHARDQ_CLUSTER_TOKEN=self.cluster_token)

    def _spawn_gateway(self) -> subprocess.Popen[bytes]:
        seeds = ",".join(f"{self.host}:{n.port}" for n in self.nodes)
        argv = [
            sys.executable, "-m", "shardq.cli", "gateway", "--host", self.host,
            "--port", str(self.port), "--http-port", str(self.http_port), "--seed", seeds,
        ]
        return self._spawn(argv, "gateway")  # it speaks to the nodes with a client token

    def _spawn(self, argv: list[str], name: str, **extra_env: str) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("SHARDQ_TOKEN", "SHARDQ_CLUSTER_TOKEN")}
        env.update(extra_env, SHARDQ_TOKEN=",".join(self.tokens))
        logfile = open(os.path.join(self.data_dir, f"{name}.log"), "ab")  # noqa: SIM115
        try:
            return subprocess.Popen(argv, stdout=logfile, stderr=subprocess.STDOUT, env=env,
                                    preexec_fn=_die_with_parent)
        finally:
            logfile.close()

    async def _stop_node(self, node: LocalNode) -> None:
        if node.proc is not None and node.proc.poll() is None:
            node.proc.terminate()
            await asyncio.to_thread(node.proc.wait, 15)

    # -- scaling --------------------------------------------------------------------------------

    async def _converge(
        self, members: list[LocalNode], progress: Callable[[int, int], None] | None
    ) -> Topology:
        reb = Rebalancer(token=self.cluster_token, on_progress=progress)
        try:
            seeds = [f"{self.host}:{n.port}" for n in self.nodes]
            return await reb.converge([n.info(self.host) for n in members], seeds)
        finally:
            await reb.close()

    async def scale(self, count: int, progress: Callable[[int, int], None]) -> Topology:
        if count < 1:
            raise ValueError("a cluster needs at least one node")
        async with self._lock:
            await self._grow(count)
            self._save_members()
            self.topology = await self._converge(self.nodes[:count], progress)
            for node in self.nodes[count:]:
                await self._stop_node(node)
            self.nodes = self.nodes[:count]
            self._save_members()
            return self.topology

    # -- control socket -------------------------------------------------------------------------

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            req = orjson.loads(line) if line.strip() else {}
            async for answer in self._answer(req):
                writer.write(orjson.dumps(answer) + b"\n")
                await writer.drain()
        except (ConnectionError, orjson.JSONDecodeError) as exc:
            log.warning("control connection: %s", exc)
        finally:
            writer.close()

    async def _answer(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        cmd = req.get("cmd")
        if cmd == "TOPOLOGY":
            topo = self.topology
            yield {"ok": True, "topology": topo.wire() if topo else None}
        elif cmd == "SCALE" and type(req.get("nodes")) is int:
            queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
            task = asyncio.create_task(self.scale(req["nodes"], _reporter(queue)))
            while not task.done():
                getter = asyncio.create_task(queue.get())
                await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    done, total = getter.result()
                    yield {"progress": done, "total": total}
                else:
                    getter.cancel()
            try:
                topo = task.result()
            except Exception as exc:  # report the failure to the caller, keep running
                yield {"ok": False, "error": f"scale failed: {exc}"}
                return
            yield {"ok": True, "topology": topo.wire()}
        else:
            yield {"ok": False,
                   "error": "Invalid: expected {cmd: TOPOLOGY} or {cmd: SCALE, nodes: N}"}


def _reporter(queue: asyncio.Queue[tuple[int, int]]) -> Callable[[int, int], None]:
    def report(done: int, total: int) -> None:
        queue.put_nowait((done, total))

    return report


async def _wait_port(host: str, port: int, proc: subprocess.Popen[bytes] | None) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while loop.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[3] if isinstance(proc.args, list) else ''} "
                               f"exited with {proc.returncode}; see its log in the data dir")
        try:
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after 30 s")
