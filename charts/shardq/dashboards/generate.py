"""shardq's Grafana dashboards, generated from Python (grafana-foundation-sdk), one function
per panel: the jobs' dashboards in ``dashboards_jobs.py``, the servers' in
``dashboards_servers.py``, their building blocks in ``dashboard_blocks.py``; this script
writes them.

    python charts/shardq/dashboards/generate.py            # (re)write the *.json beside it
    python charts/shardq/dashboards/generate.py --out DIR  # write them somewhere else
    python charts/shardq/dashboards/generate.py --list     # every PromQL expression in use

`make dashboards` runs the first. The JSON is sorted and stable (``sort_keys``, a trailing
newline): tests/unit/test_dashboards.py regenerates it and fails on any difference with the
committed files, so edit these modules, never the JSON.

This module is also **the one list of every PromQL expression** shardq's monitoring uses:
``all_exprs()`` returns the panels' queries and the alert rules' expressions (read from
``../alerts/shardq-rules.yaml``); tests/integration/test_observability.py runs each of them
against a real Prometheus scraping real nodes. ``concrete()`` turns a panel query into plain
PromQL by filling in the Grafana variables.

Every panel and query uses the ``$datasource`` variable, so the dashboards work with any
Prometheus data source. Node metrics have no node label: ``instance`` is the node.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from dashboards_jobs import overview, queue_detail
from dashboards_servers import gateway, node_internals, replication
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.cog.encoder import JSONEncoder

HERE = Path(__file__).resolve().parent
RULES = HERE.parent / "alerts" / "shardq-rules.yaml"



#: File name → dashboard.
DASHBOARDS: dict[str, Callable[[], db.Dashboard]] = {
    "cluster-overview.json": overview,
    "queue-detail.json": queue_detail,
    "node-internals.json": node_internals,
    "gateway.json": gateway,
    "replication.json": replication,
}


def render(dashboard: db.Dashboard) -> str:
    """Sorted, stable JSON with a trailing newline."""
    return json.dumps(dashboard.build(), cls=JSONEncoder, sort_keys=True, indent=2,
                      ensure_ascii=False) + "\n"


def dashboards() -> dict[str, dict[str, Any]]:
    """File name → the dashboard as JSON data."""
    return {name: json.loads(render(make())) for name, make in DASHBOARDS.items()}


def write(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, make in DASHBOARDS.items():
        path = out / name
        path.write_text(render(make()), encoding="utf-8")
        written.append(path)
    return written


# -- every expression -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Expr:
    #: ``dashboard:<uid>`` or ``rule:<group>``.
    source: str
    #: Panel title (with the legend of the target) or alert name.
    name: str
    expr: str

    @property
    def is_rule(self) -> bool:
        return self.source.startswith("rule:")


def panels_of(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, also those nested in collapsed rows."""
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels") or [])
    return out


def dashboard_exprs() -> list[Expr]:
    out = []
    for dashboard in dashboards().values():
        for panel in panels_of(dashboard):
            for target in panel.get("targets") or []:
                label = f"{panel['title']} [{target.get('legendFormat', target['refId'])}]"
                out.append(Expr(f"dashboard:{dashboard['uid']}", label, target["expr"]))
    return out


def rules(path: Path = RULES) -> list[dict[str, Any]]:
    """The alert rules of the rule file, each with its group's name as ``group``."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [{**rule, "group": group["name"]} for group in data["groups"] for rule in group["rules"]]


def rule_exprs(path: Path = RULES) -> list[Expr]:
    return [Expr(f"rule:{r['group']}", r.get("alert") or r["record"], r["expr"].strip())
            for r in rules(path)]


def all_exprs() -> list[Expr]:
    """Every PromQL expression of the dashboards and of the alert rules."""
    return dashboard_exprs() + rule_exprs()


#: Grafana's own variables (not defined in a dashboard's templating).
BUILTIN_VARIABLES = frozenset({"__rate_interval", "__interval", "__range", "datasource"})
VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)\}")


def variables_in(expr: str) -> set[str]:
    return {a or b for a, b in VARIABLE.findall(expr)}


def concrete(expr: str, values: dict[str, str] | None = None, rate_interval: str = "1m") -> str:
    """``expr`` as plain PromQL: Grafana's variables replaced (``$instance`` and ``$shard`` by
    ``.*``)."""
    values = {"instance": ".*", "shard": ".*", "__rate_interval": rate_interval,
              "__interval": rate_interval,
              "__range": rate_interval, **(values or {})}

    def fill(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"no value for ${name} in {expr!r}")
        return values[name]

    return VARIABLE.sub(fill, expr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE, help="where to write the JSON")
    parser.add_argument("--list", action="store_true", help="print every PromQL expression")
    args = parser.parse_args(argv)
    if args.list:
        for e in all_exprs():
            print(f"{e.source}\t{e.name}\t{' '.join(e.expr.split())}")
        return 0
    for path in write(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
