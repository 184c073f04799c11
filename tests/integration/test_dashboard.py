"""The web dashboard in a real browser: Debian's headless Chromium, driven by playwright,
against a real local cluster (``LocalCluster``: node processes and a gateway on loopback;
also a replicated one, ``shardq up --replicas 3``, whose shards the Nodes panel shows).

The page is checked through what a person sees and does (rows, buttons by their names,
keys), and every effect of a click is checked again through the API. A screenshot of
each run goes to ``test-output/``. No browser is downloaded: playwright launches
``/usr/bin/chromium``; without it (or without playwright) the tests skip on a laptop
and fail in CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shardq.client import AsyncClient
from shardq.wire.slots import slot_of
from shardq.wire.topology import Topology
from shardq_operator.local import LocalCluster

from ..helpers import eventually, free_port, missing, needs_binary

try:
    from playwright.async_api import BrowserContext, Page, async_playwright, expect

    HAVE_PLAYWRIGHT = True
except ImportError:  # the test extra is not installed
    HAVE_PLAYWRIGHT = False

OUT = Path(__file__).resolve().parents[2] / "test-output"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
WAIT_MS = 15_000  # the longest any one thing may take to show on the page
TOKEN = "dash-secret"


async def wait_http_ready(port: int) -> None:
    """The gateway starts its HTTP server just after its TCP one: wait for /ready."""
    async with aiohttp.ClientSession() as http:

        async def ready() -> bool:
            async with http.get(f"http://127.0.0.1:{port}/ready") as res:
                return res.status == 200

        await eventually(ready, 20, 0.1, what=f"the gateway's HTTP /ready on port {port}",
                         ignore=(aiohttp.ClientError,))


async def start_cluster(tmp_path: Path, nodes: int, tokens: tuple[str, ...] = (),
                        replicas: int = 1) -> LocalCluster:
    cluster = LocalCluster("127.0.0.1", free_port(), free_port(), str(tmp_path / "cluster"),
                           tokens=tokens, replicas=replicas, failure_timeout=1.0)
    try:
        await cluster.start(nodes)
        await wait_http_ready(cluster.http_port)
    except BaseException:
        await cluster.stop()
        raise
    return cluster


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[BrowserContext]:
    """Headless Chromium with a fresh profile; closed (its processes ended) afterwards."""
    if not HAVE_PLAYWRIGHT:
        missing("playwright is not installed (pip install -e '.[test]')")
    executable = needs_binary("chromium", "chromium-browser", install="apt-get install chromium")
    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=executable, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1440, "height": 900}, color_scheme="light",
            timeout=30_000)
        context.set_default_timeout(WAIT_MS)
        try:
            yield context
        finally:
            await context.close()


async def open_dashboard(context: BrowserContext, http_port: int) -> tuple[Page, list[str]]:
    """The page, and a list that collects its uncaught errors and console errors."""
    page = context.pages[0] if context.pages else await context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console",
            lambda msg: problems.append(f"console: {msg.text}") if msg.type == "error" else None)
    await page.goto(f"http://127.0.0.1:{http_port}/")
    return page, problems


async def queue_row(client: AsyncClient, name: str) -> dict[str, Any]:
    return next(q for q in await client.list_queues() if q["name"] == name)


async def screenshot(page: Page, name: str) -> None:
    OUT.mkdir(exist_ok=True)
    await page.screenshot(path=str(OUT / name), full_page=True)


async def pictured(page: Page, name: str, steps: Callable[[], Awaitable[None]]) -> None:
    """Run ``steps``; the page is saved as ``name`` either way (``failed-name`` on failure)."""
    try:
        await steps()
    except BaseException:
        with contextlib.suppress(Exception):
            await screenshot(page, f"failed-{name}")
        raise
    await screenshot(page, name)


async def test_dashboard_shows_queues_retries_dead_jobs_pauses_and_streams_events(
    tmp_path: Path, browser: BrowserContext
) -> None:
    cluster = await start_cluster(tmp_path, 2)
    try:
        page, problems = await open_dashboard(browser, cluster.http_port)

        async def steps() -> None:
            await expect(page.locator("#events-state")).to_have_text("live")
            async with AsyncClient(f"127.0.0.1:{cluster.port}") as client:
                await see_queue_appear_and_filter_it(page, client)
                await retry_a_dead_job_from_the_page(page, client)
                await pause_and_resume_from_the_page(page, client)
                await see_nodes_chart_and_crons(page, client)

        await pictured(page, "dashboard.png", steps)
        assert problems == []
    finally:
        await cluster.stop()


async def see_queue_appear_and_filter_it(page: Page, client: AsyncClient) -> None:
    for i in range(3):
        await client.push("dash-mail", {"to": f"user{i}@example.org"})
    row = page.locator('#queues-body tr[data-key="dash-mail"]')
    await expect(row).to_be_visible()
    await expect(row.locator(".c-waiting")).to_have_text("3")
    await expect(row.locator(".c-pending")).to_have_text("3")
    await page.keyboard.press("/")  # the shortcut that focuses the filter
    await expect(page.locator("#queue-filter")).to_be_focused()
    await page.keyboard.type("no-such-queue")
    await expect(row).to_be_hidden()
    await expect(page.locator("#queues-meta")).to_have_text("0 of 1 queues match")
    await page.keyboard.press("Escape")
    await expect(row).to_be_visible()


async def retry_a_dead_job_from_the_page(page: Page, client: AsyncClient) -> None:
    job_id = await client.push("dash-reports", {"report": "q3"}, max_attempts=1)
    job = await client.pull("dash-reports", timeout=5000)
    assert job is not None and job.id == job_id
    await client.fail(job, "boom: disk full")
    dead_event = page.locator("#events-list li.ev-dead", has_text=f"#{job_id}")
    await expect(dead_event).to_be_visible()
    await expect(dead_event).to_contain_text("dash-reports")
    await expect(dead_event).to_contain_text("boom: disk full")

    await page.get_by_role("button", name="Dead letters of queue dash-reports").click()
    await expect(page.locator("#dlq-queue")).to_be_focused()
    retry = page.get_by_role("button", name=f"Retry job {job_id}", exact=True)
    await expect(retry).to_be_visible()
    await expect(page.locator("#dlq-body")).to_contain_text("boom: disk full")
    await retry.click()
    await expect(page.locator("#notice")).to_contain_text(f"Job #{job_id} of dash-reports is "
                                                          "waiting again")
    got = await client.get_job(job_id)
    assert got is not None and got["state"] == "waiting", got
    assert await client.dlq("dash-reports") == []
    await expect(retry).to_be_hidden()
    await expect(page.locator('#queues-body tr[data-key="dash-reports"] .c-waiting')) \
        .to_have_text("1")


async def pause_and_resume_from_the_page(page: Page, client: AsyncClient) -> None:
    await page.get_by_role("button", name="Pause queue dash-mail").click()
    resume = page.get_by_role("button", name="Resume queue dash-mail")
    await expect(resume).to_be_visible()
    await expect(page.locator('#queues-body tr[data-key="dash-mail"]')).to_contain_text("paused")
    assert (await queue_row(client, "dash-mail"))["paused"] is True
    assert await client.pull("dash-mail", timeout=0) is None  # a paused queue hands out nothing

    await resume.click()
    await expect(page.get_by_role("button", name="Pause queue dash-mail")).to_be_visible()
    assert (await queue_row(client, "dash-mail"))["paused"] is False
    job = await client.pull("dash-mail", timeout=5000)
    assert job is not None
    await client.ack(job)


async def see_nodes_chart_and_crons(page: Page, client: AsyncClient) -> None:
    await expect(page.locator("#nodes-body tr")).to_have_count(2)
    await expect(page.locator("#slotmap rect")).to_have_count(1024)
    await expect(page.locator("#sum-epoch")).not_to_have_text("–")
    # Rates need two polls of /metrics.json; the chart then has a point per series.
    await expect(page.locator("#rate-pushed")).not_to_have_text("–")
    line = page.locator("#chart polyline.s-pushed")
    await expect(line).to_have_attribute("points", re.compile(r"\d,\d"))

    await client.add_cron("dash-nightly", "dash-reports", "0 3 * * *", {"kind": "daily"})
    await page.locator("body").press("r")  # refresh now, crons included
    cron = page.locator('#crons-body tr[data-key="dash-nightly"]')
    await expect(cron).to_be_visible()
    await expect(cron).to_contain_text("0 3 * * *")
    next_run = next(c for c in await client.list_crons() if c["name"] == "dash-nightly")["next_run"]
    iso = dt.datetime.fromtimestamp(next_run / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
    await expect(cron.locator("time")).to_have_attribute("datetime", iso[:-3] + "Z")
    await expect(cron).to_contain_text(re.compile(r"in \d+ (s|min|h)"))


async def test_dashboard_asks_for_a_token_and_then_sends_it(
    tmp_path: Path, browser: BrowserContext
) -> None:
    cluster = await start_cluster(tmp_path, 1, tokens=(TOKEN,))
    try:
        page, problems = await open_dashboard(browser, cluster.http_port)
        await pictured(page, "dashboard-token.png", lambda: enter_the_token(page, cluster.port))
        # Before the token, the browser logs the refused requests; nothing else may fail.
        assert [p for p in problems if "401" not in p] == []
    finally:
        await cluster.stop()


async def enter_the_token(page: Page, port: int) -> None:
    form = page.locator("#token-form")
    await expect(form).to_be_visible()
    await expect(form).to_contain_text("Authentication required")
    await expect(page.locator("#queues-error")).to_contain_text("401")
    await expect(page.locator("#token-input")).to_be_focused()

    await page.locator("#token-input").fill(TOKEN)
    await page.locator("#token-input").press("Enter")
    await expect(form).to_be_hidden()
    assert await page.evaluate("localStorage.getItem('shardq.token')") == TOKEN
    await expect(page.locator("#events-state")).to_have_text("live")  # SSE with ?token=

    async with AsyncClient(f"127.0.0.1:{port}", token=TOKEN) as client:
        job_id = await client.push("dash-secure", {"n": 1}, max_attempts=1)
        row = page.locator('#queues-body tr[data-key="dash-secure"]')
        await expect(row).to_be_visible()
        await expect(page.locator("#queues-error")).to_be_hidden()
        job = await client.pull("dash-secure", timeout=5000)
        assert job is not None
        await client.fail(job, "denied")
        await expect(page.locator("#events-list li.ev-dead", has_text=f"#{job_id}")) \
            .to_be_visible()
        await expect(row.locator(".c-dlq")).to_have_text("1")


async def test_dashboard_shows_each_shard_with_its_members_roles_and_lag(
    tmp_path: Path, browser: BrowserContext
) -> None:
    """``shardq up --replicas 3`` with two shards: the Nodes panel lists each shard (term, slots,
    members in sync) and each member's role and lag; a follower killed with SIGKILL shows as
    unreachable and not in sync, its lag growing with pushes, as the primary's /metrics says."""
    cluster = await start_cluster(tmp_path, 2, replicas=3)
    try:
        topo = await cluster.current()
        assert topo is not None and sorted(topo.shards) == ["shard-0", "shard-1"]
        page, problems = await open_dashboard(browser, cluster.http_port)
        await pictured(page, "dashboard-replicated.png",
                       lambda: see_shards_and_a_follower_fall_behind(page, cluster, topo))
        assert problems == []
    finally:
        await cluster.stop()


def member_row(page: Page, name: str) -> Any:
    return page.locator(f'#shards-body tr[data-key="node:{name}"]')


async def see_shards_and_a_follower_fall_behind(page: Page, cluster: LocalCluster,
                                                topo: Topology) -> None:
    await expect(page.locator("#shards-table")).to_be_visible()
    await expect(page.locator("#nodes-table")).to_be_hidden()
    await expect(page.locator("#shards-body tr.shard")).to_have_count(2)
    await expect(page.locator("#shards-body tr.member")).to_have_count(6)
    await expect(page.locator("#nodes-meta")).to_contain_text("2 shards")
    await expect(page.locator("#slotmap rect")).to_have_count(1024)
    for name, shard in topo.shards.items():
        heading = page.locator(f'#shards-body tr[data-key="shard:{name}"]')
        await expect(heading).to_contain_text(f"{name} term {shard.term}")
        await expect(heading).to_contain_text(f"{topo.owners.count(name)} slots")
        await expect(heading).to_contain_text("3/3 in sync")
        for member in shard.members:
            row = member_row(page, member)
            if member == shard.primary:
                await expect(row.locator(".c-role")).to_have_text("primary")
                await expect(row.locator(".c-lag")).to_have_text("leads")
            else:
                await expect(row.locator(".c-role")).to_have_text("follower")
                await expect(row.locator(".c-lag")).to_have_text(re.compile(r"^\d[\d,]* rec · "))

    shard = topo.shards["shard-0"]
    victim = next(n for n in cluster.nodes if n.name == shard.members[1])
    primary = next(n for n in cluster.nodes if n.name == shard.primary)
    assert victim.proc is not None and victim.name != shard.primary
    victim.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(victim.proc.wait)
    row = member_row(page, victim.name)
    await expect(row.locator(".c-role")).to_have_text("unreachable")
    await expect(page.locator('#shards-body tr[data-key="shard:shard-0"]')) \
        .to_contain_text("2/3 in sync")
    queue = next(q for q in (f"dash-rep-{i}" for i in range(10_000))
                 if topo.owners[slot_of(q)] == "shard-0")
    async with AsyncClient(f"127.0.0.1:{cluster.port}") as client:
        for i in range(5):
            await client.push(queue, {"i": i})  # two of three members: still a majority
    await expect(row.locator(".c-lag")).to_have_text(
        re.compile(r"^not in sync · [1-9][\d,]* rec · \d"))
    await expect(page.locator('#shards-body tr[data-key="shard:shard-1"]')) \
        .to_contain_text("3/3 in sync")  # the other shard is untouched

    # the same, as the primary's /metrics tells Prometheus
    async def primary_sees_it() -> bool:
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{primary.http_port}/metrics") as res:
            text = await res.text()
        samples = {(s.name, s.labels.get("follower")): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples
                   if s.labels.get("shard") == "shard-0"}
        return (samples[("shardq_replication_follower_in_sync", victim.name)] == 0
                and samples[("shardq_replication_follower_lag_records", victim.name)] >= 5
                and samples[("shardq_replication_members_in_sync", None)] == 2)

    await eventually(primary_sees_it, 10, what="the primary's metrics: the follower is behind")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{primary.http_port}/health") as res:
            health = await res.json()
        assert (health["role"], health["shard"], health["term"], health["queueOk"]) == (
            "primary", "shard-0", shard.term, True)
        async with http.get(f"http://127.0.0.1:{cluster.http_port}/health") as res:
            assert set(await res.json()) == {"status", "memoryOk", "queueOk", "timestamp"}
