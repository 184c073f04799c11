"""Test helpers for monitoring: a real Prometheus scraping real in-process nodes, and a load
that gives every node metric data.

``Prometheus`` runs the ``prometheus`` binary (Debian's package) on a free loopback port with
its own config and TSDB in a temporary directory, and is stopped by its PID. ``start_nodes``
starts nodes with an HTTP port (``/metrics``) and a data dir (WAL, fsync, blob metrics) and
publishes a topology that splits the slots between them; ``start_shard`` starts the members
of one replicated shard (DESIGN §9) the same way, so the replication series exist. ``Load``
pushes, pulls, acks and
fails jobs through the SDK's direct mode. Used by tests/integration/test_observability.py and by
charts/shardq/dashboards/render.py (the PNG in docs/).
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import yaml

from shardq.client import AsyncClient
from shardq.errors import ShardqError
from shardq.wire.slots import SLOTS
from shardq.wire.topology import NodeInfo, Shard, Topology
from shardq_node.runtime import Node
from shardq_node.settings import NodeSettings, StorageSettings

from .cluster import Cluster
from .helpers import eventually, free_port

ROOT = Path(__file__).resolve().parent.parent
CHARTS = ROOT / "charts" / "shardq"
RULES = CHARTS / "alerts" / "shardq-rules.yaml"
RULE_TESTS = CHARTS / "alerts" / "shardq-rules.test.yaml"
DASHBOARDS = CHARTS / "dashboards"

#: What the gateway exposes on its HTTP /metrics (the names its dashboard and alerts use).
GATEWAY_METRICS = {
    "shardq_gateway_requests_total": "counter",
    "shardq_gateway_request_duration_seconds": "histogram",
    "shardq_gateway_upstream_errors_total": "counter",
    "shardq_gateway_retries_total": "counter",
    "shardq_gateway_topology_refreshes_total": "counter",
    "shardq_gateway_topology_epoch": "gauge",
    "shardq_gateway_connections": "gauge",
}


def load_generator() -> ModuleType:
    """charts/shardq/dashboards/generate.py as a module (it is a script, not a package; its
    folder goes on ``sys.path`` for the modules beside it, as when it runs as a script)."""
    name = "shardq_dashboards_generate"
    if name in sys.modules:
        return sys.modules[name]
    if str(DASHBOARDS) not in sys.path:
        sys.path.append(str(DASHBOARDS))
    spec = importlib.util.spec_from_file_location(name, DASHBOARDS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class Prometheus:
    """One ``prometheus`` process on 127.0.0.1, scraping ``jobs`` (job name → host:ports)."""

    def __init__(self, workdir: Path, jobs: dict[str, list[str]], rule_files: list[Path],
                 binary: str = "prometheus", interval: str = "1s") -> None:
        self.workdir = workdir
        self.jobs = jobs
        self.rule_files = rule_files
        self.binary = binary
        self.interval = interval
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.session: aiohttp.ClientSession | None = None
        self.log_path = workdir / "prometheus.log"

    def config(self) -> dict[str, Any]:
        return {
            "global": {"scrape_interval": self.interval, "scrape_timeout": self.interval,
                       "evaluation_interval": self.interval},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": targets}]}
                for job, targets in self.jobs.items()
            ],
        }

    async def start(self, timeout: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config()), encoding="utf-8")
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={config}",
                 f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        await eventually(self.ready, timeout, 0.1, what="prometheus to be ready",
                         ignore=(aiohttp.ClientError,), hint=self.log)

    async def ready(self) -> bool:
        """Whether /-/ready answers 200; RuntimeError if the process has exited."""
        assert self.proc is not None and self.session is not None, "not started"
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
        async with self.session.get(f"{self.url}/-/ready") as resp:
            return resp.status == 200

    def log(self, tail: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-tail:])

    async def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; its ``data``, or RuntimeError with Prometheus's error."""
        assert self.session is not None, "not started"
        async with self.session.get(f"{self.url}/api/v1/{path}", params=params) as resp:
            body = await resp.json()
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result (a vector; a scalar as a one-sample list)."""
        data = await self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    async def query_range(self, expr: str, start: float, end: float,
                          step: float) -> list[dict[str, Any]]:
        data = await self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}",
                              step=f"{step}")
        result: list[dict[str, Any]] = data["result"]
        return result

    async def stop(self) -> None:
        """Stop the process this object started (by its PID), then close the HTTP session."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, 15)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait, 5)
        if self.session is not None:
            await self.session.close()
            self.session = None


async def start_nodes(root: Path, count: int = 3, **storage: Any) -> Cluster:
    """``count`` nodes with /metrics and a data dir each, the slots split between them."""
    nodes = []
    for i in range(count):
        settings = NodeSettings(
            name=f"node-{i}", port=0, http_port=free_port(),
            storage=StorageSettings(data_dir=str(root / f"node-{i}"), **storage),
        )
        node = Node(settings)
        await node.start()
        nodes.append(node)
    cluster = Cluster(nodes, None)
    await cluster.publish(cluster.topology)
    return cluster


async def start_shard(root: Path, shard: str = "s0", members: int = 3,
                      **storage: Any) -> Cluster:
    """The ``members`` nodes of replicated shard ``shard`` (all 1024 slots), each with /metrics
    and a data dir; the first is primary in term 1. No controller: nothing fails over."""
    nodes = []
    for i in range(members):
        name = f"{shard}-{i}"
        node = Node(NodeSettings(name=name, port=0, http_port=free_port(),
                                 storage=StorageSettings(data_dir=str(root / name), **storage)))
        await node.start()
        nodes.append(node)
    names = [n.settings.name for n in nodes]
    cluster = Cluster(nodes, None)
    await cluster.publish(Topology(
        epoch=1, owners=[shard] * SLOTS,
        nodes=[NodeInfo(n.settings.name, f"127.0.0.1:{n.tcp_port}", f"127.0.0.1:{n.http_port}")
               for n in nodes],
        shards={shard: Shard(members=names, primary=names[0], term=1)}))
    return cluster


def metrics_targets(cluster: Cluster) -> list[str]:
    return [f"127.0.0.1:{n.http_port}" for n in cluster.nodes]


class Load:
    """Producers and workers through the SDK's direct mode, so every node metric moves.

    Each ``round`` pushes jobs to every queue (a few with payloads past the blob threshold,
    some with one attempt only, some delayed, some expiring if not pulled within 2 s) and
    works some of them: most are acked after a short run, every ``fail_every``-th is failed
    (one-attempt jobs go to the DLQ, others are retried).
    """

    def __init__(self, address: str, queues: list[str], big: int = 70_000) -> None:
        self.client = AsyncClient(address, direct=True)
        self.queues = queues
        self.big = "x" * big
        self.counter = itertools.count()
        self.refused = 0

    async def __aenter__(self) -> Load:
        await self.client.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()

    async def round(self, push: int = 10, work: int = 10, fail_every: int = 4,
                    big_every: int = 25, run_seconds: float = 0.002) -> None:
        for queue in self.queues:
            for _ in range(push):
                n = next(self.counter)
                data: Any = self.big if n % big_every == 0 else {"n": n}
                try:
                    await self.client.push(queue, data, max_attempts=1 if n % 2 else 3,
                                           delay=60_000 if n % 50 == 7 else None,
                                           ttl=2_000 if n % 30 == 11 else None)
                except ShardqError:  # a budget spent: Queue full
                    self.refused += 1
            for i in range(work):
                job = await self.client.pull(queue, timeout=0)
                if job is None:
                    break
                await asyncio.sleep(run_seconds)  # the job's run time: load, not a wait for a state
                if i % fail_every == fail_every - 1:
                    await self.client.fail(job, "boom")
                else:
                    await self.client.ack(job, {"ok": True})

    async def run(self, stop: asyncio.Event, pause: float = 0.1, **kw: Any) -> None:
        """Rounds until ``stop`` is set."""
        while not stop.is_set():
            await self.round(**kw)
            try:
                await asyncio.wait_for(stop.wait(), pause)
            except TimeoutError:
                pass


def as_bool(expr: str) -> str:
    """``expr`` with each comparison made a ``bool`` comparison (outside selectors and strings).

    An alert's expression returns nothing while it does not fire; its ``bool`` form returns a
    0/1 sample for every series it compares, so "returns data" then means "the series the
    alert watches exist and their labels match", whether or not it fires.
    """
    out: list[str] = []
    i = 0
    depth = 0
    quote = ""
    while i < len(expr):
        c = expr[i]
        if quote:
            out.append(c)
            if c == "\\" and i + 1 < len(expr):
                out.append(expr[i + 1])
                i += 1
            elif c == quote:
                quote = ""
            i += 1
            continue
        if c in "\"'`":
            quote = c
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
        elif depth == 0:
            op = next((o for o in ("==", "!=", ">=", "<=", ">", "<") if expr.startswith(o, i)),
                      None)
            if op is not None:
                out.append(f"{op} bool")
                i += len(op)
                continue
        out.append(c)
        i += 1
    return "".join(out)
