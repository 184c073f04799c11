"""The fault tier's bounded set (in ``make test``; ``-m faults`` selects it), each round with
a fixed seed: at R = 1 every fault kind with and without a slot move (about 5 s a round),
at R = 3 every fault kind once, every other one during a slot move (about 13 s a round).
``make faults`` runs every kind both ways at either R.

A round fails on any lost, resurrected, duplicate-id or unexpected job, or on a step
that did not happen in time (no recovery after the heal, no drain, a failed rebalance);
its history is then in ``build/faults/<seed>-<kind>.jsonl`` (runner.py). The long run is
``make faults ROUNDS=200``. R = 3 rounds skip until ``cluster.REPLICATION_READY``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .cluster import REPLICATION_READY, REPLICATION_SKIP
from .runner import label, run_round, variants


def _bounded(replicas: int) -> list[tuple[str, bool]]:
    every = variants(replicas)
    if replicas == 1:
        return every
    kinds = list(dict.fromkeys(kind for kind, _ in every))
    return [(kind, i % 2 == 1) for i, kind in enumerate(kinds)]


CASES = [
    pytest.param(
        replicas, kind, moves, 1000 + 100 * replicas + i, id=f"R{replicas}-{label(kind, moves)}",
        marks=[] if replicas == 1 or REPLICATION_READY else [
            pytest.mark.skip(reason=REPLICATION_SKIP)])
    for replicas in (1, 3)
    for i, (kind, moves) in enumerate(_bounded(replicas))
]


@pytest.mark.faults
@pytest.mark.parametrize(("replicas", "kind", "moves", "seed"), CASES)
async def test_fault_round_loses_nothing(replicas: int, kind: str, moves: bool, seed: int,
                                         tmp_path: Path) -> None:
    result = await run_round(seed, kind, moves, replicas, workdir=tmp_path)
    report = result.report
    print(f"\n{result.message()}")
    assert result.ok, result.message()
    # the round measured something: a load, deliveries of all of it, one healed fault
    assert report.pushes["ok"] >= 100, result.message()
    assert report.delivered >= report.pushes["ok"], result.message()
    [window] = report.windows
    assert window.recovered and window.queues, result.message()


@pytest.mark.faults
async def test_the_tier_catches_loss_resurrection_and_duplicate_ids_on_a_real_cluster(
        tmp_path: Path) -> None:
    """The canary: a primary's disk rolled back to a copy taken a moment earlier must show
    up as lost jobs, acked jobs handed out again, ids issued twice; and the round's history
    must be written and named."""
    result = await run_round(7, "rollback-primary", False, 1, out=tmp_path / "out",
                             workdir=tmp_path)
    counts = result.report.counts()
    print(f"\n{result.message()}")
    assert not result.ok and not result.errors, result.message()
    assert counts["lost"] > 0 and counts["resurrected"] > 0 and counts["duplicate_ids"] > 0, (
        result.message())
    assert counts["unexpected"] == 0, result.message()
    path = tmp_path / "out" / "7-rollback-primary.jsonl"
    assert result.history_path == path and path.exists() and str(path) in result.message()
    assert any((tmp_path / "out" / "7-rollback-primary.logs").glob("node-*.log"))
