"""Take docs/dashboard.png: a small local cluster under some load, seen by headless Chromium.

Starts ``LocalCluster`` (3 nodes and a gateway on free loopback ports, data in a
temporary directory), puts a few queues under steady load (workers that ack, some
failures and retries, a paused queue with a backlog, delayed jobs, crons, dead
jobs), opens the dashboard in Debian's ``chromium`` through playwright, waits for
the throughput chart to fill, and saves a full-page screenshot. Everything it
started is stopped before it exits.

    .venv/bin/python scripts/screenshot_dashboard.py [--seconds 75] [--out docs/dashboard.png]

Needs: ``apt-get install chromium`` and the ``test`` extra (playwright). It never
downloads a browser. Run by hand; CI does not run it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

from playwright.async_api import async_playwright

from shardq.client import AsyncClient
from shardq_operator.local import LocalCluster, free_port

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
#: queue -> (pushes per second on average, share of attempts that fail)
LOAD = {"emails": (40.0, 0.0), "webhooks": (25.0, 0.15), "thumbnails": (12.0, 0.02),
        "reports": (2.0, 0.0)}


async def produce(client: AsyncClient, queue: str, rate: float, stop: asyncio.Event) -> None:
    start = time.monotonic()
    n = 0
    while not stop.is_set():
        t = time.monotonic() - start
        now_rate = rate * (1 + 0.5 * math.sin(t / 9 + len(queue)))  # a little wave
        batch = max(1, round(now_rate / 4))
        await client.push_batch(queue, [{"data": {"n": n + i, "queue": queue}, "max_attempts": 3}
                                        for i in range(batch)])
        n += batch
        await asyncio.sleep(0.25)


async def consume(client: AsyncClient, queue: str, fail_share: float, stop: asyncio.Event) -> None:
    rng = random.Random(queue)
    while not stop.is_set():
        jobs = await client.pull_batch(queue, 20, timeout=200)
        for job in jobs:
            if rng.random() < fail_share:
                await client.fail(job, rng.choice(["HTTP 502 from hooks.example", "read timeout"]))
            else:
                await client.ack(job, {"ok": True})
        await asyncio.sleep(0.05)


async def set_the_scene(client: AsyncClient) -> None:
    """The parts of the picture that are not load: limits, a paused queue, crons, dead jobs."""
    await client.set_rate_limit("emails", 60)
    await client.set_concurrency("thumbnails", 8)
    await client.pause("billing")
    await client.push_batch("billing", [{"data": {"invoice": i}} for i in range(37)])
    await client.push_batch("exports", [{"data": {"export": i}, "delay": 3_600_000}
                                        for i in range(12)])
    await client.add_cron("nightly-report", "reports", "0 3 * * *", {"kind": "daily"})
    await client.add_cron("cleanup", "maintenance", "*/15 * * * *")
    await client.add_cron("heartbeat", "maintenance", "*/30 * * * * *", {"ping": True})
    errors = ["TimeoutError: upstream took more than 30 s",
              "ValueError: template 'welcome_v2' not found",
              "PermissionError: bucket reports-eu is read-only"]
    for i, error in enumerate(errors):
        await client.push("reports", {"report": f"q{i + 1}-summary", "rows": 1200 * (i + 1)},
                          max_attempts=1)
        job = await client.pull("reports", timeout=2000)
        if job is not None:
            await client.fail(job, error)


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise SystemExit("chromium is not installed: apt-get install chromium")
    return path


async def screenshot(url: str, out: Path, profile: str, wait_s: float) -> None:
    async with async_playwright() as pw:
        browser = await pw.chromium.launch_persistent_context(
            profile, executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1440, "height": 900}, color_scheme="light")
        try:
            page = browser.pages[0] if browser.pages else await browser.new_page()
            await page.goto(url)
            await page.wait_for_selector("#queues-body tr", timeout=15_000)
            await asyncio.sleep(wait_s)
            await page.screenshot(path=str(out), full_page=True)
        finally:
            await browser.close()


async def main(seconds: float, out: Path, nodes: int) -> None:
    with tempfile.TemporaryDirectory(prefix="shardq-shot-") as tmp:
        port, http_port = free_port(), free_port()
        cluster = LocalCluster("127.0.0.1", port, http_port, f"{tmp}/cluster", fsync="never")
        await cluster.start(nodes)
        stop = asyncio.Event()
        tasks: list[asyncio.Task[None]] = []
        try:
            async with AsyncClient(f"127.0.0.1:{port}") as client:
                await set_the_scene(client)
                for queue, (rate, fail_share) in LOAD.items():
                    tasks.append(asyncio.create_task(produce(client, queue, rate, stop)))
                    tasks.append(asyncio.create_task(consume(client, queue, fail_share, stop)))
                await screenshot(f"http://127.0.0.1:{http_port}/", out, f"{tmp}/profile", seconds)
                stop.set()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                        await asyncio.wait_for(task, 5)
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            await cluster.stop()
    print(f"wrote {out}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=75.0,
                    help="how long the page watches the load before the picture")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    ap.add_argument("--nodes", type=int, default=3)
    args = ap.parse_args()
    asyncio.run(main(args.seconds, args.out, args.nodes))
