"""Render charts/shardq with Helm's engine (helm-python-sdk), as `helm template --include-crds`.

    python scripts/k8s/render_chart.py [--out build/chart]

writes ``default.yaml`` (the chart's default values) and ``full.yaml``
(``charts/shardq/ci/full-values.yaml``: every option on), each the CRDs then every rendered
manifest (test hooks included, NOTES.txt left out) in template order, as release ``shardq`` in
namespace ``queues``. ``make chart-render`` runs it; tests/unit/test_chart.py renders the same way and
requires the same documents.

Must not: contact a cluster (no Helm config, ``lookup`` returns nothing).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "shardq"
RELEASE = "shardq"
NAMESPACE = "queues"
#: output file -> values file (None = the chart's defaults)
RENDERS: dict[str, Path | None] = {
    "default.yaml": None,
    "full.yaml": CHART / "ci" / "full-values.yaml",
}


def values_of(path: Path | None) -> dict[str, Any]:
    return {} if path is None else dict(yaml.safe_load(path.read_text()) or {})


def render(values: dict[str, Any]) -> str:
    """The CRDs and the manifests as one multi-document YAML stream."""
    with helm.Chart.load(CHART) as chart:
        crds = sorted(chart.crds, key=lambda c: c["filename"])
        rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    parts = [f"# Source: {c['filename']}\n{c['data'].strip()}\n" for c in crds]
    for name, text in sorted(rendered.items()):
        if name.endswith("NOTES.txt"):
            continue
        for doc in re.split(r"^---[ \t]*$", text, flags=re.MULTILINE):
            body = doc.strip()
            if body and any(line and not line.lstrip().startswith("#")
                            for line in body.splitlines()):
                parts.append(f"# Source: {name}\n{body}\n")
    return "---\n" + "---\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "chart")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for filename, values_file in RENDERS.items():
        (args.out / filename).write_text(render(values_of(values_file)))
        print(args.out / filename)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
