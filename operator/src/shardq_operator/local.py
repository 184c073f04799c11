"""``shardq up``: a local cluster of node processes and a gateway, with live scaling.

The supervisor starts ``shardq node`` processes on free loopback ports (their
names, ports and data directories are kept in ``<data-dir>/cluster.json`` so a
restart finds them again), brings the topology to the ring over them with the
rebalancer (finishing any move a killed coordinator left), starts
``shardq gateway`` on the requested port, and listens for orders on a unix
socket named after that port (``control_path``): ``shardq scale N`` and
``shardq topology`` use it. Scaling up starts nodes, then moves slots to them;
scaling down moves every slot off the leaving nodes, then stops them.

With ``replicas`` R > 1 (DESIGN §9) each of the N owners is a shard of R node processes
(``shard-I-J``), the topology's truth is a locked file (``topology.store.json``,
``store.FileStore``), and the failover controller (``controller.py``) runs in this
process: it replaces a silent primary, and ``shardq failover SHARD`` asks it for a
planned switchover. Scaling adds or removes whole shards.

Every run generates a cluster token: the nodes and the rebalancer get it, the
gateway and clients never do (they get the client tokens, when ``--token`` is
given), so no client can run a node's internal commands (docs/security.md).
Tokens reach the processes in their environment, not on their command lines
(which every local user can read in ``/proc``).

Must not: move slots itself; rebalance.py does; nor choose primaries:
controller.py does.
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

from shardq.connection import Connection
from shardq.wire.topology import NodeInfo, Shard, Topology

from .controller import Controller, ControllerSettings
from .rebalance import Rebalancer
from .ring import ring_owners
from .store import FileStore, update

log = logging.getLogger("shardq.up")


def control_path(port: int) -> str:
    """The supervisor's control socket for the cluster whose gateway listens on ``port``."""
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return os.path.join(base, f"shardq-up-{port}.sock")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the kernel's pick; another process may take it
    before it is bound again)."""
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
    shard: str = ""  # its shard (replicated clusters)

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
    replicas: int = 1
    #: For the nodes' internal commands (slot moves, replication); generated for each run.
    cluster_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    failure_timeout: float = 2.0
    nodes: list[LocalNode] = field(default_factory=list)
    gateway: subprocess.Popen[bytes] | None = None
    topology: Topology | None = None
    controller: Controller | None = None
    _server: asyncio.AbstractServer | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _watch: asyncio.Task[None] | None = None

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, count: int) -> None:
        os.makedirs(self.data_dir, exist_ok=True)
        if self.replicas > 1:
            await self._start_shards(count)
            await self._start_gateway()
            return
        self.nodes = self._load_members()
        await self._grow(count)
        self.topology = await self._converge(self.nodes[:count], None)
        for gone in self.nodes[count:]:  # a scale-down the last run did not finish
            await self._stop_node(gone)
        self.nodes = self.nodes[:count]
        self._save_members()
        await self._start_gateway()

    async def _start_gateway(self) -> None:
        self.gateway = self._spawn_gateway()
        await _wait_port(self.host, self.port, self.gateway)
        if self.http_port:
            await _wait_port(self.host, self.http_port, self.gateway)
        path = control_path(self.port)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._server = await asyncio.start_unix_server(self._control, path)

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self.controller is not None:
            await self.controller.close()
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
        return [LocalNode(m["name"], m["port"], m["http_port"], shard=m.get("shard", ""))
                for m in raw["nodes"]]

    def _save_members(self) -> None:
        raw = {"replicas": self.replicas,
               "nodes": [{"name": n.name, "port": n.port, "http_port": n.http_port,
                          **({"shard": n.shard} if n.shard else {})} for n in self.nodes]}
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
        if self.replicas > 1:
            argv += ["--failure-timeout-ms", str(int(self.failure_timeout * 1000))]
        return self._spawn(argv, node.name, SHARDQ_CLUSTER_TOKEN=self.cluster_token)

    def _spawn_gateway(self) -> subprocess.Popen[bytes]:
        seeds = ",".join(f"{self.host}:{n.port}" for n in self.nodes)
        argv = [
            sys.executable, "-m", "shardq.cli", "gateway", "--host", self.host,
            "--port", str(self.port), "--http-port", str(self.http_port), "--seed", seeds,
            # the one gateway: no Service to take it out, no other gateway to hand clients
            # to; on stop it tells its clients at once and is gone within 2 s
            "--drain-delay", "0", "--drain-timeout", "2",
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
        if self.replicas > 1:
            async with self._lock:
                return await self.scale_shards(count, progress)
        async with self._lock:
            await self._grow(count)
            self._save_members()
            self.topology = await self._converge(self.nodes[:count], progress)
            for node in self.nodes[count:]:
                await self._stop_node(node)
            self.nodes = self.nodes[:count]
            self._save_members()
            return self.topology

    # -- replicated shards (DESIGN §9) --------------------------------------------------------

    @property
    def store(self) -> FileStore:
        return FileStore(os.path.join(self.data_dir, "topology.store.json"))

    def _shard_names(self) -> list[str]:
        return list(dict.fromkeys(n.shard for n in self.nodes if n.shard))

    async def _spawn_shards(self, count: int) -> list[str]:
        """Node processes for shards ``shard-0`` .. ``shard-{count-1}`` (R members each);
        the names of the shards that are new."""
        have = set(self._shard_names())
        new = []
        for i in range(count):
            name = f"shard-{i}"
            if name in have:
                continue
            new.append(name)
            for j in range(self.replicas):
                http = free_port(self.host) if self.http_port else 0
                self.nodes.append(LocalNode(f"{name}-{j}", free_port(self.host), http,
                                            shard=name))
        for node in self.nodes:
            if node.proc is None or node.proc.poll() is not None:
                node.proc = self._spawn_node(node)
        for node in self.nodes:
            await _wait_port(self.host, node.port, node.proc)
        return new

    async def _storage_ids(self, nodes: list[LocalNode]) -> dict[str, str]:
        ids = {}
        for node in nodes:
            conn = await Connection(f"{self.host}:{node.port}", self.cluster_token).open(5)
            try:
                ids[node.name] = str((await conn.call({"cmd": "STATUS"}))["storage_id"])
            finally:
                await conn.close()
        return ids

    async def _add_shards(self, names: list[str]) -> None:
        """Write new shards into the store (the first ever: the initial topology)."""
        members = {name: [n for n in self.nodes if n.shard == name] for name in names}
        ids = await self._storage_ids([n for ns in members.values() for n in ns])
        shards = {name: Shard(members=[n.name for n in ns], primary=ns[0].name, term=1,
                              ids={n.name: ids[n.name] for n in ns})
                  for name, ns in members.items()}
        infos = [n.info(self.host) for ns in members.values() for n in ns]
        store = self.store
        _, topo = await store.read()
        if topo is None:
            topo = Topology(epoch=1, nodes=infos, shards=shards,
                            owners=ring_owners(sorted(shards)))
            await store.cas(0, topo)
            return

        def add(t: Topology) -> bool:
            for name, shard in shards.items():
                t.shards.setdefault(name, shard)
            known = {n.name for n in t.nodes}
            t.nodes.extend(i for i in infos if i.name not in known)
            return True

        await update(store, add)

    async def _start_shards(self, count: int) -> None:
        self.nodes = self._load_members()
        new = await self._spawn_shards(count)
        if new:
            await self._add_shards(new)
        self._save_members()
        self.controller = Controller(self.store, ControllerSettings(
            failure_timeout=self.failure_timeout, token=self.cluster_token))
        _, topo = await self.store.read()
        assert topo is not None
        await self.controller.publish(topo)
        self._watch = asyncio.get_running_loop().create_task(self.controller.run())
        self.topology = await self._converge_shards(count, None)
        await self._stop_gone()

    async def _converge_shards(self, count: int, progress: Callable[[int, int], None] | None
                               ) -> Topology:
        reb = Rebalancer(token=self.cluster_token, on_progress=progress, store=self.store)
        try:
            return await reb.converge_shards([f"shard-{i}" for i in range(count)])
        finally:
            await reb.close()

    async def _stop_gone(self) -> None:
        _, topo = await self.store.read()
        names = {n.name for n in topo.nodes} if topo is not None else set()
        for node in [n for n in self.nodes if n.name not in names]:
            await self._stop_node(node)
        self.nodes = [n for n in self.nodes if n.name in names]
        self._save_members()

    async def scale_shards(self, count: int, progress: Callable[[int, int], None]) -> Topology:
        new = await self._spawn_shards(count)
        self._save_members()
        if new:
            await self._add_shards(new)
        self.topology = await self._converge_shards(count, progress)
        await self._stop_gone()
        return self.topology

    async def failover(self, shard: str, to: str | None) -> Topology:
        if self.controller is None:
            raise ValueError("failover needs a replicated cluster (shardq up --replicas 3)")
        self.topology = await self.controller.switchover(shard, to)
        return self.topology

    async def current(self) -> Topology | None:
        if self.replicas > 1:
            return (await self.store.read())[1]
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
            topo = await self.current()
            yield {"ok": True, "topology": topo.wire() if topo else None}
        elif cmd == "FAILOVER" and type(req.get("shard")) is str:
            try:
                topo = await self.failover(req["shard"], req.get("to") or None)
            except Exception as exc:
                yield {"ok": False, "error": f"failover failed: {exc}"}
                return
            yield {"ok": True, "topology": topo.wire()}
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
                   "error": "Invalid: expected {cmd: TOPOLOGY}, {cmd: SCALE, nodes: N} or "
                            "{cmd: FAILOVER, shard: S, to?: MEMBER}"}


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
