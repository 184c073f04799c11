"""Where the truth about the topology lives: a store with compare-and-swap (DESIGN §9).

Only the coordinator (the failover controller and the rebalancer) writes the topology, and
every write is a compare-and-swap on the version it read, so two coordinators that race
can never both win: the loser reads again and redoes its change on the winner's topology.
Nodes and gateways never read the store; the coordinator publishes each version to them
(``SETTOPOLOGY``).

``FileStore`` is the store of ``shardq up``: one JSON file, written whole (temp file,
fsync, rename) under an exclusive ``flock``. ``MemoryStore`` serves one process (tests,
and the operator until its Kubernetes store). The operator's store keeps the same
interface on a Kubernetes object written with its ``resourceVersion``.

Must not: talk to nodes.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import Callable
from typing import Protocol, TypeVar

import orjson

from shardq.wire.topology import Topology

T = TypeVar("T")


class Conflict(Exception):
    """The store changed since it was read."""


class TopologyStore(Protocol):
    async def read(self) -> tuple[int, Topology | None]:
        """The current version (0: empty) and topology."""

    async def cas(self, version: int, topo: Topology) -> int:
        """Write ``topo`` if the store is still at ``version``; the new version, or raise
        ``Conflict``."""


class MemoryStore:
    def __init__(self, topo: Topology | None = None) -> None:
        self.version = 1 if topo is not None else 0
        self.topology = topo.copy() if topo is not None else None

    async def read(self) -> tuple[int, Topology | None]:
        return self.version, self.topology.copy() if self.topology is not None else None

    async def cas(self, version: int, topo: Topology) -> int:
        if version != self.version:
            raise Conflict(f"store at version {self.version}, not {version}")
        self.version += 1
        self.topology = topo.copy()
        return self.version


class FileStore:
    """A locked JSON file: ``{"version": N, "topology": {...}}``."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def read(self) -> tuple[int, Topology | None]:
        return await asyncio.to_thread(self._locked, self._read)

    async def cas(self, version: int, topo: Topology) -> int:
        raw = topo.wire()
        return await asyncio.to_thread(self._locked, lambda: self._cas(version, raw))

    def _locked(self, fn: Callable[[], T]) -> T:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path + ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                return fn()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> tuple[int, Topology | None]:
        try:
            with open(self.path, "rb") as f:
                raw = orjson.loads(f.read())
        except FileNotFoundError:
            return 0, None
        return int(raw["version"]), Topology.from_wire(raw["topology"])

    def _cas(self, version: int, raw: dict[str, object]) -> int:
        current, _ = self._read()
        if current != version:
            raise Conflict(f"store at version {current}, not {version}")
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(orjson.dumps({"version": version + 1, "topology": raw},
                                 option=orjson.OPT_INDENT_2))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return version + 1


async def update(store: TopologyStore, change: Callable[[Topology], bool]) -> Topology | None:
    """Read, ``change`` a copy (False: nothing to do), bump the epoch, compare-and-swap;
    again on a conflict. The topology written (None when ``change`` declined)."""
    for _ in range(100):
        version, topo = await store.read()
        if topo is None:
            raise LookupError("the store holds no topology yet")
        if not change(topo):
            return None
        topo.epoch += 1
        try:
            await store.cas(version, topo)
        except Conflict:
            continue
        return topo
    raise Conflict("the topology kept changing under 100 attempts")
