"""Write what the image's wheels are built from: shardq's server requirements, pinned.

    python scripts/k8s/image_requirements.py OUTDIR

writes ``OUTDIR/requirements.txt`` (the third-party dependencies of shardq's five
distributions, read from their pyproject.toml files, so a dependency added there counts before
the venv is reinstalled) and
``OUTDIR/constraints.txt`` (``name==version`` of every distribution in their dependency closure
that the running interpreter has installed). Run with the project's .venv, the image gets the
versions the tests ran against; a requirement the venv lacks is left to pip to resolve.

Used by scripts/k8s/build_image.sh, which hashes both files to decide whether the dependency
wheels must be built again. Must not: touch the network or install anything.
"""

from __future__ import annotations

import importlib.metadata as md
import sys
import tomllib
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # pragma: no cover - a bare interpreter: pip vendors packaging
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parents[2]
#: the distributions the image installs (DESIGN §1), as folders of the repository
DISTRIBUTIONS = ("sdk", "server", "node", "gateway", "operator")


def top_level() -> list[str]:
    """Every third-party requirement of the image's distributions (theirs on each other left
    out: their wheels are built from the sources)."""
    ours = set()
    specs: list[str] = []
    for folder in DISTRIBUTIONS:
        project = tomllib.loads((ROOT / folder / "pyproject.toml").read_text())["project"]
        ours.add(project["name"])
        specs.extend(project["dependencies"])
    out: list[str] = []
    for spec in specs:
        if Requirement(spec).name not in ours and spec not in out:
            out.append(spec)
    return out


def _applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": e}) for e in (extras or {""}))


def closure(specs: list[str]) -> dict[str, str]:
    """Installed ``name -> version`` of ``specs`` and everything they need, markers applied."""
    pins: dict[str, str] = {}
    todo = [Requirement(s) for s in specs]
    while todo:
        req = todo.pop()
        if not _applies(req, set()):
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            print(f"image_requirements: {req.name} is not installed here; pip resolves it",
                  file=sys.stderr)
            continue
        name = dist.metadata["Name"].lower().replace("_", "-")
        if name in pins:
            continue
        pins[name] = dist.version
        for raw in dist.requires or []:
            sub = Requirement(raw)
            if _applies(sub, set(req.extras)):
                todo.append(sub)
    return pins


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    specs = top_level()
    (out / "requirements.txt").write_text("".join(f"{s}\n" for s in specs))
    pins = closure(specs)
    (out / "constraints.txt").write_text(
        "".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
