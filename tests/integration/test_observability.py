"""Monitoring against the real tools: promtool on the alert rules and on a live node's /metrics,
and a real Prometheus scraping real nodes, asked through its HTTP API whether every PromQL
expression of the dashboards and of the alert rules returns data.

The binaries come from Debian's ``prometheus`` package (CI installs it: .ci/run →
scripts/ci_packages.sh); without them these tests skip on a laptop and fail in CI.

The integration test scrapes nodes and a gateway, so the gateway's expressions must return
data like the nodes'; ``shardq_gateway_upstream_errors_total`` has series only once an error
happened, so those expressions are checked after a node has been stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from shardq.client import AsyncClient
from shardq.errors import ShardqError
from shardq_gateway.main import Gateway
from shardq_gateway.settings import GatewaySettings
from shardq_node.runtime import Node
from shardq_node.settings import NodeSettings, StorageSettings

from ..helpers import eventually, free_port, needs_binary
from ..observe import (
    RULE_TESTS,
    RULES,
    Load,
    Prometheus,
    as_bool,
    load_generator,
    metrics_targets,
    start_nodes,
    start_shard,
)

gen = load_generator()

QUEUES = ["emails", "reports", "thumbnails"]


def promtool(*args: str, stdin: bytes | None = None, cwd: Path | None = None
             ) -> subprocess.CompletedProcess[str]:
    tool = needs_binary("promtool")
    return subprocess.run([tool, *args], input=stdin.decode() if stdin else None, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


# -- promtool ------------------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    out = promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(gen.rules())} rules found" in out.stdout


def test_promtool_test_rules() -> None:
    out = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_has_unit_tests_that_fire_and_do_not_fire() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired: set[str] = set()
    quiet: set[str] = set()
    for test in tests:
        for case in test["alert_rule_test"]:
            (fired if case["exp_alerts"] else quiet).add(case["alertname"])
    names = {r["alert"] for r in gen.rules()}
    assert names <= fired, f"no firing case for {names - fired}"
    assert names <= quiet, f"no quiet case for {names - quiet}"


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Every panel query, variables filled in, is valid PromQL (as recording rules)."""
    exprs = [gen.concrete(e.expr, {"queue": "q"}) for e in gen.dashboard_exprs()]
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"shardq:panel_{i}", "expr": expr} for i, expr in enumerate(exprs)
    ]}]}
    path = tmp_path / "panels.yaml"
    path.write_text(yaml.safe_dump(rules))
    out = promtool("check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr


async def test_promtool_check_metrics_on_a_live_node(tmp_path: Path) -> None:
    needs_binary("promtool")
    node = Node(NodeSettings(port=0, http_port=free_port(), storage=StorageSettings(
        data_dir=str(tmp_path / "data"), blob_threshold=1024)))
    await node.start()
    try:
        async with AsyncClient(f"127.0.0.1:{node.tcp_port}") as client:
            for i in range(6):
                await client.push("work", {"i": i})
            await client.push("work", "x" * 5000)  # a blob
            await client.push("doomed", 1, max_attempts=1)
            await client.push("later", 1, delay=60_000)
            job = await client.pull("work", timeout=0)
            assert job is not None
            await client.ack(job, "done")
            job = await client.pull("work", timeout=0)
            assert job is not None
            await client.fail(job, "retry me")
            job = await client.pull("doomed", timeout=0)
            assert job is not None
            await client.fail(job, "dead")
        async with aiohttp.ClientSession() as session, \
                session.get(f"http://127.0.0.1:{node.http_port}/metrics") as resp:
            assert resp.status == 200
            body = await resp.read()
    finally:
        await node.stop()
    text = body.decode()
    for needle in ('shardq_jobs_dead_total{queue="doomed"} 1.0', "shardq_blobs 1.0",
                   'shardq_queue_jobs{queue="later",state="delayed"} 1.0'):
        assert needle in text
    assert re.search(r"^shardq_wal_fsync_seconds_count [1-9]", text, re.M)
    out = await asyncio.to_thread(promtool, "check", "metrics", stdin=body)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "" and out.stderr.strip() == "", out.stdout + out.stderr


# -- a real Prometheus ---------------------------------------------------------------------------


def needs_upstream_error(expr: str) -> bool:
    """Series that exist only once a gateway lost or could not reach a node."""
    return "shardq_gateway_upstream_errors_total" in expr


def queries_of(exprs: list[Any]) -> dict[str, str]:
    """Label → PromQL to run: panel queries with their variables filled in; alert rules in
    their ``bool`` form (data whether or not they fire)."""
    return {f"{e.source} {e.name}": as_bool(e.expr) if e.is_rule
            else gen.concrete(e.expr, {"queue": QUEUES[0]}) for e in exprs}


async def query_all(prom: Prometheus, queries: dict[str, str]) -> dict[str, int | str]:
    """Label → number of series its query returns, or the error Prometheus gave."""

    async def one(expr: str) -> int | str:
        try:
            return len(await prom.query(expr))
        except RuntimeError as exc:
            return str(exc)

    counts = await asyncio.gather(*(one(e) for e in queries.values()))
    return dict(zip(queries, counts, strict=True))


async def wait_for_data(prom: Prometheus, queries: dict[str, str], timeout: float) -> None:
    """Query until every expression returns data (bounded); else fail naming those that do not."""
    missing: dict[str, int | str] = {}

    async def every_one_has_data() -> bool:
        nonlocal missing
        results = await query_all(prom, queries)
        missing = {k: v for k, v in results.items() if v == 0 or isinstance(v, str)}
        return not missing

    await eventually(every_one_has_data, timeout, 0.5,
                     what=f"all {len(queries)} expressions to return data",
                     hint=lambda: report(missing, queries, prom))


def report(missing: dict[str, int | str], queries: dict[str, str], prom: Prometheus) -> str:
    return (f"{len(missing)} of {len(queries)} expressions return no data or an error:\n"
            + "\n".join(f"  {k}: {v}\n    {queries[k]}" for k, v in sorted(missing.items()))
            + f"\nprometheus log:\n{prom.log()}")


async def through_gateway(gateway: Gateway, queue: str) -> None:
    """Requests through the gateway: a push, a pull, an ack, and one a node refuses (the
    gateway counts only requests it forwarded: one it refuses itself is not in the metrics)."""
    async with AsyncClient(f"127.0.0.1:{gateway.port}") as client:
        await client.push(queue, "through the gateway")
        job = await client.pull(queue, timeout=0)
        if job is not None:
            await client.ack(job)
        with contextlib.suppress(ShardqError):
            await client.call({"cmd": "ACK", "id": 987_654_321})


async def test_every_expression_returns_data_from_a_real_prometheus(tmp_path: Path) -> None:
    """Nodes and a gateway under load, and a replicated shard of three members, scraped every
    second by a real Prometheus that also evaluates the alert rules: every dashboard query and
    every alert expression returns data. Then a node stops: ShardqNodeDown goes pending for it,
    and the gateway's upstream-error series (which exist only after an error) return data too;
    a follower of the shard stops: ShardqShardUnderReplicated goes pending for the shard."""
    binary = needs_binary("prometheus")
    started = time.monotonic()
    cluster = await start_nodes(tmp_path / "nodes", 3)
    replicated = await start_shard(tmp_path / "shard", "s0")
    gateway = Gateway(GatewaySettings(port=0, http_port=free_port(), seeds=cluster.seeds()))
    await gateway.start()
    prom = Prometheus(tmp_path / "prometheus", {
        "shardq-node": metrics_targets(cluster),
        "shardq-replica": metrics_targets(replicated),
        "shardq-gateway": [f"127.0.0.1:{gateway.http_port}"],
    }, [RULES], binary=binary)
    exprs = gen.all_exprs()
    first = queries_of([e for e in exprs if not needs_upstream_error(e.expr)])
    after_errors = queries_of([e for e in exprs if needs_upstream_error(e.expr)])
    down = cluster.nodes[2]
    down_queue = cluster.queues_on(down.settings.name, "gw-")[0]
    try:
        await prom.start()
        stop = asyncio.Event()
        async with Load(cluster.seeds()[0], QUEUES) as load, \
                Load(replicated.seeds()[0], QUEUES) as on_shard:
            await load.round(push=40, work=30)
            await on_shard.round(push=20, work=10)
            tasks = [asyncio.create_task(load.run(stop, pause=0.2, push=5, work=5)),
                     asyncio.create_task(on_shard.run(stop, pause=0.2, push=2, work=2))]
            try:
                for queue in [*QUEUES, down_queue]:
                    await through_gateway(gateway, queue)
                await wait_for_data(prom, first, 40.0)
            finally:
                stop.set()
                await asyncio.gather(*tasks)

        # every rule loaded and evaluates without error
        groups = (await prom.api("rules"))["groups"]
        evaluated = {r["name"]: r for g in groups for r in g["rules"]}
        assert set(evaluated) == {r["alert"] for r in gen.rules()}
        bad = {n: r.get("lastError") for n, r in evaluated.items() if r["health"] != "ok"}
        assert not bad, bad

        # a node stops: the gateway loses it (closed) and cannot reach it (unreachable)
        instance = f"127.0.0.1:{down.http_port}"
        await cluster.stop_node(down.settings.name)
        with contextlib.suppress(ShardqError, ConnectionError):
            await through_gateway(gateway, down_queue)
        await wait_for_data(prom, after_errors, 20.0)

        async def node_down_alert() -> bool:
            alerts = (await prom.api("alerts"))["alerts"]
            return any(a["labels"]["alertname"] == "ShardqNodeDown"
                       and a["labels"]["instance"] == instance for a in alerts)

        await eventually(node_down_alert, 15, 0.5, what=f"ShardqNodeDown pending for {instance}",
                         hint=prom.log)

        # a follower of the replicated shard stops: the shard is under-replicated
        assert not await alerts_of(prom, "ShardqShardUnderReplicated")
        primary = replicated.seeds()[0]
        await replicated.stop_node("s0-2")
        async with AsyncClient(primary) as client:
            await client.push(QUEUES[0], "while s0-2 is down")  # s0-0 and s0-1: a majority
        pending = await eventually(lambda: alerts_of(prom, "ShardqShardUnderReplicated"), 15,
                                   0.5, what="ShardqShardUnderReplicated pending for s0",
                                   hint=prom.log)
        assert [(a["labels"]["shard"], a["labels"]["job"], a["state"]) for a in pending] \
            == [("s0", "shardq-replica", "pending")]
        print(f"{len(first) + len(after_errors)} expressions returned data "
              f"({len(after_errors)} after a node stopped); {time.monotonic() - started:.1f}s")
    finally:
        await prom.stop()
        await gateway.stop()
        await cluster.stop()
        await replicated.stop()


async def alerts_of(prom: Prometheus, name: str) -> list[dict[str, Any]]:
    """The alerts (pending or firing) of rule ``name`` Prometheus has now."""
    alerts: list[dict[str, Any]] = (await prom.api("alerts"))["alerts"]
    return [a for a in alerts if a["labels"]["alertname"] == name]
