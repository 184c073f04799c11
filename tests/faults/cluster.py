"""The fault tier's cluster: node processes behind proxies, a gateway, and (at R = 3) a
controller, all on loopback, each process on its own 127.0.0.x address.

This is the one module that knows how a cluster is launched; the runner only uses
``FaultCluster``'s methods (start/stop, kill/respawn/pause/resume/wipe a member,
kill/respawn the controller, who is primary, the proxies, live jobs, a rebalance).

Addresses. Member ``i`` listens on ``127.0.0.(11 + i)``; its proxy listens on the same
address, another port, and the topology publishes the *proxy's* address, so every
connection to a member passes its proxy. A proxy tells its clients apart by source IP:
a member's replication links leave from its own address, and whatever dials without
binding (the gateway, the controller, a rebalancer) comes from ``UNBOUND_SOURCE``
(127.0.0.1, what Linux picks for 127/8), so those three are cut together. The harness's
own calls (SETTOPOLOGY, STATUS, LISTQUEUES for the drain) go to the members' real
addresses, never through a proxy.

R = 1: ``shards`` nodes, one per shard, the shard named like its node. R = 3 (or 5):
``shards`` shards of R members, the topology in a FileStore that ``shardq controller``
watches, as ``shardq up --replicas R`` runs it (but each process on its own address, behind
its proxy); the R > 1 rounds run when ``REPLICATION_READY`` is True.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardq.connection import Connection
from shardq.errors import ShardqError
from shardq.wire.slots import slot_of
from shardq.wire.topology import NodeInfo, Shard, Topology
from shardq_operator.ring import initial, ring_owners
from shardq_operator.store import FileStore

from ..helpers import eventually, free_port
from .proxy import Proxy

# ------------------------------------------------------------------------------------------------
# THE SWITCH of the R = 3 fault rounds (test_faults.py; `make faults` defaults to R = 3 with
# it): True runs them; False skips them with REPLICATION_SKIP (and `make faults` runs R = 1).
REPLICATION_READY = True
REPLICATION_SKIP = "replication: the shard rebalancer does not survive a failover yet"
# ------------------------------------------------------------------------------------------------

GATEWAY_IP = "127.0.0.2"
#: The source address of a connection whose socket was not bound (Linux's choice for 127/8):
#: the gateway's, the controller's and the rebalancer's links to the members.
UNBOUND_SOURCE = "127.0.0.1"
FAILURE_TIMEOUT_MS = 2000
START_TIMEOUT = 30.0
ADMIN_TIMEOUT = 5.0
REPO = Path(__file__).resolve().parents[2]
#: Small WAL segments and snapshot thresholds, so faults land in rotations and snapshots too.
STORAGE_FLAGS = ("--segment-bytes", "65536", "--snapshot-bytes", "262144")


def member_ip(index: int) -> str:
    return f"127.0.0.{11 + index}"


def _die_with_parent() -> None:  # in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class Member:
    name: str
    shard: str
    ip: str
    port: int
    data_dir: Path
    log: Path
    proxy: Proxy
    proc: subprocess.Popen[bytes] | None = None
    paused: bool = False

    @property
    def address(self) -> str:
        """Where the node really listens (the harness's own calls)."""
        return f"{self.ip}:{self.port}"

    def info(self) -> NodeInfo:
        """What the topology says: the proxy's address."""
        return NodeInfo(self.name, self.proxy.address)


@dataclass
class FaultCluster:
    root: Path
    shards: int = 3
    replicas: int = 1
    token: str = "faults-cluster-token"
    #: clients authenticate, and so does the gateway on each of its node connections (as
    #: every pod the operator makes does: an AUTH line first on each link)
    client_token: str = "faults-client-token"
    members: dict[str, Member] = field(default_factory=dict)
    shard_names: list[str] = field(default_factory=list)
    gateway: subprocess.Popen[bytes] | None = None
    gateway_port: int = 0
    controller: subprocess.Popen[bytes] | None = None
    others: list[subprocess.Popen[bytes]] = field(default_factory=list)  # rebalancers

    def __post_init__(self) -> None:
        # R = 1: the shard is its node (owners name nodes); R > 1: shards of members
        prefix = "node" if self.replicas == 1 else "shard"
        self.shard_names = [f"{prefix}-{i}" for i in range(self.shards)]

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self, owning: int | None = None) -> None:
        """Start every member, publish a topology whose ring covers the first ``owning``
        shards (all by default; the others own nothing until a rebalance), then the
        gateway (and the controller)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.replicas == 1:
            await self._start_single(owning or self.shards)
        else:
            await self._start_replicated(owning or self.shards)
        self.gateway_port = free_port(GATEWAY_IP)
        seeds = ",".join(m.proxy.address for m in self.members.values())
        self.gateway = self._spawn("gateway", [
            "gateway", "--host", GATEWAY_IP, "--port", str(self.gateway_port),
            "--http-port", "0", "--seed", seeds, "--token", self.client_token,
            "--cluster-token", self.token,
        ])
        await self._wait_listening(GATEWAY_IP, self.gateway_port, self.gateway, "gateway")

    async def _start_single(self, owning: int) -> None:
        """R = 1: one node per shard; the shard is the node (owners name nodes)."""
        for i, name in enumerate(self.shard_names):
            await self._add_member(name, name, i)
        for member in self.members.values():
            self.respawn(member.name)
        for member in self.members.values():
            await self.wait_member(member.name)
        names = self.shard_names[:owning]
        topo = initial([self.members[n].info() for n in names])
        topo.nodes = [m.info() for m in self.members.values()]  # the others own nothing yet
        for member in self.members.values():
            answer = await self.call(member.name, {"cmd": "SETTOPOLOGY",
                                                   "topology": topo.wire()})
            assert answer.get("ok"), answer

    async def _start_replicated(self, owning: int) -> None:
        """R = 3 (or 5): ``shards`` shards of ``replicas`` members (``shard-i-j``), the first
        member of each its primary in term 1, written to the topology store (a FileStore,
        as ``shardq up`` keeps it) and published; then the controller process."""
        index = 0
        for shard in self.shard_names:
            for j in range(self.replicas):
                await self._add_member(f"{shard}-{j}", shard, index)
                index += 1
        for member in self.members.values():
            self.respawn(member.name)
        for member in self.members.values():
            await self.wait_member(member.name)
        ids = {m.name: str((await self.call(m.name, {"cmd": "STATUS"}))["storage_id"])
               for m in self.members.values()}
        shards = {}
        for shard in self.shard_names:
            members = [m.name for m in self.members.values() if m.shard == shard]
            shards[shard] = Shard(members=members, primary=members[0], term=1,
                                  ids={m: ids[m] for m in members})
        topo = Topology(epoch=1, nodes=[m.info() for m in self.members.values()],
                        owners=ring_owners(self.shard_names[:owning]), shards=shards)
        await self.store().cas(0, topo)
        for member in self.members.values():
            answer = await self.call(member.name, {"cmd": "SETTOPOLOGY",
                                                   "topology": topo.wire()})
            assert answer.get("ok"), answer
        self.respawn_controller()

    def store(self) -> FileStore:
        return FileStore(str(self.root / "topology.store.json"))

    async def _add_member(self, name: str, shard: str, index: int) -> None:
        ip = member_ip(index)
        port = free_port(ip)
        proxy = await Proxy(name, ip, (ip, port)).start()
        self.members[name] = Member(name, shard, ip, port, self.root / name / "data",
                                    self.root / f"{name}.log", proxy)

    async def stop(self) -> None:
        """Kill every process this cluster started (stopped ones too) and close the proxies."""
        procs = [p for p in [self.gateway, self.controller, *self.others,
                             *(m.proc for m in self.members.values())] if p is not None]
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGKILL)  # works on a SIGSTOPped process too
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(proc.wait, 10)
        for member in self.members.values():
            member.paused = False
            await member.proxy.close()

    # -- processes ------------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "shardq.cli", *args]
        with open(self.root / f"{name}.log", "ab") as log:
            return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=_die_with_parent)

    def respawn(self, name: str) -> None:
        """Start member ``name`` (again) on its address and data directory; returns at once
        (``wait_member`` waits until it listens)."""
        m = self.members[name]
        assert m.proc is None or m.proc.poll() is not None, f"{name} is running"
        m.data_dir.mkdir(parents=True, exist_ok=True)
        m.proc = self._spawn(name, [
            "node", "--name", name, "--host", m.ip, "--port", str(m.port), "--http-port", "0",
            "--data-dir", str(m.data_dir), "--fsync", "always", "--cluster-token", self.token,
            "--token", self.client_token, *STORAGE_FLAGS,
        ])
        m.paused = False

    async def wait_member(self, name: str) -> None:
        m = self.members[name]
        await self._wait_listening(m.ip, m.port, m.proc, name)

    async def _wait_listening(self, host: str, port: int,
                              proc: subprocess.Popen[bytes] | None, what: str) -> None:
        async def listening() -> bool:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}")
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            return True

        await eventually(listening, timeout=START_TIMEOUT, ignore=(OSError,),
                         what=f"{what} listening on {host}:{port} (log in {self.root})")

    async def kill(self, name: str) -> None:
        """SIGKILL member ``name`` and reap it."""
        m = self.members[name]
        assert m.proc is not None
        m.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(m.proc.wait, 10)
        m.paused = False

    def pause(self, name: str) -> None:
        m = self.members[name]
        assert m.proc is not None
        m.proc.send_signal(signal.SIGSTOP)
        m.paused = True

    def resume(self, name: str) -> None:
        m = self.members[name]
        assert m.proc is not None
        m.proc.send_signal(signal.SIGCONT)
        m.paused = False

    async def wipe(self, name: str) -> None:
        """Kill member ``name`` and remove its data directory (it comes back empty)."""
        await self.kill(name)
        shutil.rmtree(self.members[name].data_dir, ignore_errors=True)

    async def save_data(self, name: str) -> Path:
        """Kill member ``name`` and copy its data directory aside (it stays down)."""
        await self.kill(name)
        m = self.members[name]
        copy = m.data_dir.with_name("data.saved")
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(m.data_dir, copy)
        return copy

    async def restore_data(self, name: str, copy: Path) -> None:
        """Kill member ``name`` and put an older copy of its data directory back (it stays
        down): a disk rolled back, which no acknowledged write survives."""
        await self.kill(name)
        m = self.members[name]
        shutil.rmtree(m.data_dir, ignore_errors=True)
        shutil.copytree(copy, m.data_dir)

    def respawn_controller(self) -> None:
        """The failover controller over the topology store (R > 1 only); it dials the
        members unbound, so its connections come from UNBOUND_SOURCE, like the gateway's."""
        assert self.controller is None or self.controller.poll() is not None
        self.controller = self._spawn("controller", [
            "controller", "--store", self.store().path, "--cluster-token", self.token,
            "--failure-timeout-ms", str(FAILURE_TIMEOUT_MS),
        ])

    async def kill_controller(self) -> None:
        assert self.controller is not None
        self.controller.send_signal(signal.SIGKILL)
        await asyncio.to_thread(self.controller.wait, 10)

    def start_rebalance(self, shards: list[str]) -> subprocess.Popen[bytes]:
        """A coordinator process moving slots until ``shards`` own the ring; it dials the
        proxies, like the gateway. R = 1: ``shardq rebalance`` over the nodes; R > 1: the
        shard rebalancer over the topology store (rebalance_shards.py)."""
        if self.replicas == 1:
            members = ",".join(f"{s}={self.members[s].proxy.address}" for s in shards)
            seeds = ",".join(m.proxy.address for m in self.members.values())
            args = ["rebalance", "--nodes", members, "--seed", seeds,
                    "--cluster-token", self.token, "--batch", "4"]
            argv = [sys.executable, "-m", "shardq.cli", *args]
        else:
            argv = [sys.executable, "-m", "tests.faults.rebalance_shards", "--store",
                    self.store().path, "--shards", ",".join(shards), "--cluster-token",
                    self.token]
        with open(self.root / "rebalance.log", "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=_die_with_parent, cwd=REPO)
        self.others.append(proc)
        return proc

    # -- reading the cluster --------------------------------------------------------------------

    @property
    def address(self) -> str:
        """Where clients connect: the gateway."""
        return f"{GATEWAY_IP}:{self.gateway_port}"

    def source_of(self, name: str) -> str:
        """The source IP a member's connections come from."""
        return self.members[name].ip

    async def call(self, name: str, req: dict[str, Any]) -> dict[str, Any]:
        """One request to member ``name``'s real address (past its proxy), as the cluster."""
        conn = Connection(self.members[name].address, self.token)
        try:
            await asyncio.wait_for(conn.open(ADMIN_TIMEOUT), ADMIN_TIMEOUT)
            return await asyncio.wait_for(conn.call(req), ADMIN_TIMEOUT)
        finally:
            await conn.close()

    async def topology(self) -> dict[str, Any]:
        """The topology now (wire form): R > 1 the store's (the truth the controller and
        the rebalancer write); R = 1 the newest any running member holds."""
        if self.replicas > 1:
            _, topo = await self.store().read()
            if topo is None:
                raise RuntimeError("the topology store is empty")
            return topo.wire()
        best: dict[str, Any] | None = None
        for m in self.members.values():
            if m.proc is None or m.proc.poll() is not None or m.paused:
                continue
            with contextlib.suppress(ShardqError, OSError, TimeoutError):
                topo = (await self.call(m.name, {"cmd": "TOPOLOGY"})).get("topology")
                if topo and (best is None or topo["epoch"] > best["epoch"]):
                    best = topo
        if best is None:
            raise RuntimeError("no member answered TOPOLOGY")
        return best

    def shard_of(self, topo: dict[str, Any], queue: str) -> str:
        owner: str = topo["owners"][slot_of(queue)]
        return owner

    def primary(self, topo: dict[str, Any], shard: str) -> str:
        """The shard's primary; raises while it has none (a failover in progress)."""
        if self.replicas == 1:
            return shard
        primary: str = topo["shards"][shard]["primary"]
        if not primary:
            raise RuntimeError(f"shard {shard} has no primary (term "
                               f"{topo['shards'][shard]['term']})")
        return primary

    def followers(self, topo: dict[str, Any], shard: str) -> list[str]:
        if self.replicas == 1:
            return []
        info = topo["shards"][shard]
        return [m for m in info["members"] if m != info["primary"]]

    def queues_per_shard(self, per_shard: int, prefix: str = "fq-") -> list[str]:
        """``per_shard`` queue names for each shard, by the ring over every shard."""
        owners = ring_owners(self.shard_names)
        picked: dict[str, list[str]] = {s: [] for s in self.shard_names}
        for i in range(100_000):
            queue = f"{prefix}{i}"
            mine = picked[owners[slot_of(queue)]]
            if len(mine) < per_shard:
                mine.append(queue)
            if all(len(q) == per_shard for q in picked.values()):
                break
        return sorted(q for qs in picked.values() for q in qs)

    async def live_jobs(self, queues: list[str]) -> int:
        """Jobs of ``queues`` not finished yet (waiting, delayed, active or dead), read from
        each shard's primary directly; raises if one does not answer."""
        topo = await self.topology()
        wanted = set(queues)
        total = 0
        by_shard: dict[str, list[str]] = {}
        for q in queues:
            by_shard.setdefault(self.shard_of(topo, q), []).append(q)
        for shard, mine in by_shard.items():
            answer = await self.call(self.primary(topo, shard), {"cmd": "LISTQUEUES"})
            for row in answer["queues"]:
                if row["name"] in wanted and row["name"] in mine:
                    total += (row["waiting"] + row["delayed"] + row["waiting_children"]
                              + row["processing"] + row["dlq"])
        return total

    def logs(self) -> list[Path]:
        return sorted(self.root.glob("*.log"))
