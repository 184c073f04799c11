"""Render the cluster overview dashboard as a PNG, without Grafana.

No Grafana server can be installed here, so this draws the dashboard itself: it starts three
real nodes and a gateway on 127.0.0.1, a real Prometheus (Debian's package) scraping them every
second, runs a load that changes over time (producers speed up and slow down, workers fail some
jobs), then asks Prometheus (``/api/v1/query_range``) for every query of the overview dashboard
— the very expressions in cluster-overview.json, ``$__rate_interval`` set to 10s — and plots
each panel at its place on Grafana's 24-column grid with matplotlib.

    python charts/shardq/dashboards/render.py [--seconds 90] [--out docs/dashboard-overview.png]

(``make dashboard-png``; needs the ``prometheus`` binary and matplotlib, in the test extra.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository: tests.observe

from shardq.client import AsyncClient
from shardq.errors import ShardqError
from shardq_gateway.main import Gateway
from shardq_gateway.settings import GatewaySettings
from tests.helpers import free_port
from tests.observe import ROOT, Load, Prometheus, load_generator, metrics_targets, start_nodes

gen = load_generator()

QUEUES = ["emails", "reports", "thumbnails", "webhooks"]
RATE_INTERVAL = "10s"
BG, PANEL, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"
COLORS = ["#73bf69", "#f2cc0c", "#5794f2", "#ff9830", "#f2495c", "#b877d9", "#8ab8ff",
          "#ff7383", "#96d98d", "#fade2a"]


# -- the load -------------------------------------------------------------------------------------


async def drive(load: Load, gateway: Gateway, seconds: float) -> None:
    """Producers follow a slow wave (a burst in the middle); workers keep a steady pace, so
    queues fill up and drain; every fourth job pulled is failed."""
    started = time.monotonic()
    async with AsyncClient(f"127.0.0.1:{gateway.port}") as via_gateway:
        while (elapsed := time.monotonic() - started) < seconds:
            phase = elapsed / seconds
            wave = 0.5 + 0.5 * math.sin(phase * 2 * math.pi - math.pi / 2)
            burst = 3.0 if 0.45 < phase < 0.6 else 1.0
            push = max(1, int(10 * wave * burst))
            await load.round(push=push, work=10, fail_every=4, big_every=40,
                             run_seconds=0.001 + 0.004 * wave)
            queue = QUEUES[int(elapsed) % len(QUEUES)]
            await via_gateway.push(queue, {"via": "gateway"})
            with contextlib.suppress(ShardqError):
                await via_gateway.call({"cmd": "ACK", "id": 987_654_321})  # an error outcome
            await asyncio.sleep(0.2)


# -- plotting -------------------------------------------------------------------------------------


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or "value"


def formatted(value: float, unit: str) -> str:
    if math.isnan(value):
        return "NaN"
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.1f} s"
    if abs(value) >= 1000:
        return f"{value / 1000:.1f}K"
    return f"{value:.0f}" if value == int(value) else f"{value:.2f}"


def style(ax: Any, title: str) -> None:
    ax.set_facecolor(PANEL)
    ax.set_title(title, color=TEXT, fontsize=10, loc="left", pad=6)
    ax.tick_params(colors=TEXT, labelsize=7)
    for spine in ax.spines.values():
        spine.set_color(GRID)
    ax.grid(True, color=GRID, linewidth=0.5)


def draw_timeseries(ax: Any, panel: dict[str, Any], series: list[tuple[str, list[float],
                    list[float]]], t0: float) -> None:
    unit = panel["fieldConfig"]["defaults"].get("unit", "")
    stacked = panel["fieldConfig"]["defaults"].get("custom", {}).get("stacking")
    style(ax, panel["title"])
    scale, suffix = (1000.0, " (ms)") if unit == "s" else (1.0, "")
    if unit.startswith("suffix:"):
        suffix = f" ({unit.split(':', 1)[1].strip()})"
    ax.set_title(panel["title"] + suffix, color=TEXT, fontsize=10, loc="left", pad=6)
    if stacked and series:
        times = sorted({x for _, xs, _ in series for x in xs})
        layers = []
        for _, xs, ys in series:
            at = dict(zip(xs, ys, strict=True))
            layers.append([at.get(x, 0.0) * scale for x in times])
        ax.stackplot([x - t0 for x in times], layers, labels=[name for name, _, _ in series],
                     colors=COLORS[:len(layers)], alpha=0.6)
    else:
        for i, (name, xs, ys) in enumerate(series):
            ax.plot([x - t0 for x in xs], [y * scale for y in ys], label=name,
                    color=COLORS[i % len(COLORS)], linewidth=1.2)
    if panel["fieldConfig"]["defaults"].get("min") == 0:
        ax.set_ylim(bottom=0)
    if series:
        ax.legend(fontsize=7, loc="upper left", facecolor=PANEL, edgecolor=GRID,
                  labelcolor=TEXT, ncol=min(4, len(series)))


def draw_stat(ax: Any, panel: dict[str, Any],
              series: list[tuple[str, list[float], list[float]]], t0: float) -> None:
    unit = panel["fieldConfig"]["defaults"].get("unit", "")
    style(ax, panel["title"])
    ax.grid(False)
    ax.set_xticks([])
    ax.set_yticks([])
    last = [formatted(ys[-1], unit) for _, _, ys in series if ys]
    if series and series[0][2]:
        xs, ys = series[0][1], series[0][2]
        ax.fill_between([x - t0 for x in xs], ys, color=COLORS[0], alpha=0.15)
        ax.plot([x - t0 for x in xs], ys, color=COLORS[0], linewidth=1)
    ax.text(0.5, 0.45, " / ".join(last) or "No data", transform=ax.transAxes, ha="center",
            va="center", fontsize=22, color=COLORS[0], fontweight="bold")


async def fetch(prom: Prometheus, panel: dict[str, Any], start: float, end: float,
                queue: str) -> list[tuple[str, list[float], list[float]]]:
    out = []
    for target in panel.get("targets", []):
        expr = gen.concrete(target["expr"], {"queue": queue}, rate_interval=RATE_INTERVAL)
        for result in await prom.query_range(expr, start, end, 1.0):
            xs = [float(t) for t, _ in result["values"]]
            ys = [float(v) for _, v in result["values"]]
            out.append((legend(target.get("legendFormat", ""), result["metric"]), xs, ys))
    return out


async def draw(prom: Prometheus, dashboard: dict[str, Any], start: float, end: float,
               out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec

    panels = gen.panels_of(dashboard)
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(16, height * 0.42), facecolor=BG)
    grid = GridSpec(height, 24, figure=fig, hspace=2.2, wspace=1.2,
                    left=0.03, right=0.99, top=0.95, bottom=0.03)
    fig.suptitle(f"{dashboard['title']}  (rendered by render.py from a real Prometheus: "
                 f"3 nodes and a gateway under load; not Grafana; x: seconds)", color=TEXT,
                 fontsize=12, x=0.03, ha="left")
    for panel in panels:
        pos = panel["gridPos"]
        if panel["type"] == "row":
            ax = fig.add_subplot(grid[pos["y"], :])
            ax.axis("off")
            ax.text(0, 0.2, panel["title"], color=TEXT, fontsize=11, fontweight="bold",
                    transform=ax.transAxes)
            continue
        ax = fig.add_subplot(grid[pos["y"]:pos["y"] + pos["h"], pos["x"]:pos["x"] + pos["w"]])
        series = await fetch(prom, panel, start, end, QUEUES[0])
        if panel["type"] == "stat":
            draw_stat(ax, panel, series, start)
        else:
            draw_timeseries(ax, panel, series, start)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, facecolor=BG)
    plt.close(fig)


async def main_async(seconds: float, out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="shardq-render-") as tmp:
        root = Path(tmp)
        cluster = await start_nodes(root / "nodes", 3)
        gateway = Gateway(GatewaySettings(port=0, http_port=free_port(), seeds=cluster.seeds()))
        await gateway.start()
        prom = Prometheus(root / "prometheus", {
            "shardq-node": metrics_targets(cluster),
            "shardq-gateway": [f"127.0.0.1:{gateway.http_port}"],
        }, [])
        try:
            await prom.start()
            await asyncio.sleep(6)  # Prometheus adds static targets after ~5 s
            start = time.time()
            async with Load(cluster.seeds()[0], QUEUES) as load:
                await drive(load, gateway, seconds)
            await asyncio.sleep(3)
            end = time.time()
            dashboard = gen.dashboards()["cluster-overview.json"]
            await draw(prom, dashboard, start + 10, end, out)
        finally:
            await prom.stop()
            await gateway.stop()
            await cluster.stop()
    print(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=90.0, help="how long the load runs")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard-overview.png")
    args = parser.parse_args()
    asyncio.run(main_async(args.seconds, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
