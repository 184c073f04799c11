"""Fault rounds: a fresh cluster, a steady load, one fault (maybe during a slot move), heal,
drain, check. ``run_round`` runs one; ``main`` runs many and prints the table.

A round, all bounded in time:
 1. start a cluster (cluster.py) in a fresh directory; with ``moves``, its ring covers one
    shard less (grow) or all shards (shrink);
 2. start the load (load.py) and wait until pushes succeed;
 3. with ``moves``: start a rebalance to all shards (grow) or to all but the last
    (shrink) and wait until it has moved something;
 4. after a seeded instant, inject the fault (``KINDS``), hold it a seeded time, heal it;
 5. wait until operations on the fault's queues succeed again, stop the producers, wait
    for the rebalance to finish, wait until every queue is drained, stop the workers;
 6. check the history (checker.py). A round fails on any anomaly or on any step that did
    not happen in time; its history is then written to ``<out>/<seed>-<kind>.jsonl`` and
    the cluster's logs to ``<out>/<seed>-<kind>.logs/``.

``python -m tests.faults.runner --rounds 200`` (``make faults ROUNDS=200``) spreads rounds
over every fault kind that applies at the given R (with and without a slot move), and
writes the table to ``<out>/summary.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from shardq.errors import ShardqError

from ..helpers import eventually
from .checker import Report, check
from .cluster import FAILURE_TIMEOUT_MS, REPLICATION_READY, UNBOUND_SOURCE, FaultCluster
from .history import OK, History
from .load import Load, LoadConfig

OUT = Path(__file__).resolve().parents[2] / "build" / "faults"
SHARDS = 3
QUEUES_PER_SHARD = 4
#: Successful operations on the fault's queues after the heal before the load stops.
RECOVERED_OPS = 20
RECOVERY_TIMEOUT = 30.0
DRAIN_TIMEOUT = 60.0
REBALANCE_TIMEOUT = 120.0


@dataclass
class Round:
    """What a fault needs while it runs."""

    seed: int
    rnd: random.Random
    cluster: FaultCluster
    history: History
    queues: list[str]
    healed_at: float = 0.0
    affected: list[str] = field(default_factory=list)
    rebalance: subprocess.Popen[bytes] | None = None
    overlapped_move: bool = False  # the rebalance was running when the fault started
    move_held: bool = False  # the rebalance is SIGSTOPped until the fault starts

    def hold_move(self) -> None:
        """Stop the rebalance (SIGSTOP) so it is still moving slots when the fault lands: on
        an idle machine a rebalance of this size can be over within the fault's seeded delay.
        A stopped coordinator is one that is slow between two steps, which any may be."""
        if self.rebalance is not None and self.rebalance.poll() is None:
            self.rebalance.send_signal(signal.SIGSTOP)
            self.move_held = True

    def release_move(self) -> None:
        if self.move_held and self.rebalance is not None:
            self.rebalance.send_signal(signal.SIGCONT)
            self.move_held = False

    async def pick_shard(self) -> tuple[dict[str, object], str]:
        """The topology now and a seeded shard among those serving load queues."""
        topo = await self.cluster.topology()
        shards = sorted({self.cluster.shard_of(topo, q) for q in self.queues})
        return topo, self.rnd.choice(shards)

    async def queues_of(self, shard: str) -> list[str]:
        topo = await self.cluster.topology()
        return [q for q in self.queues if self.cluster.shard_of(topo, q) == shard]

    @contextlib.asynccontextmanager
    async def fault(self, kind: str, target: str, queues: list[str],
                    **detail: object) -> AsyncIterator[None]:
        """Records the fault's start and end (its heal) in the history."""
        self.affected = queues
        self.release_move()
        moving = self.rebalance is not None and self.rebalance.poll() is None
        self.overlapped_move = moving
        self.history.fault("start", kind, target, queues, during_move=moving, **detail)
        try:
            yield
        finally:
            self.history.fault("end", kind, target, queues)
            self.healed_at = self.history.now()


# -- the fault kinds --------------------------------------------------------------------------
# Each holds its fault for a seeded time: those sleeps ARE the fault's duration.


async def kill_primary(r: Round) -> None:
    topo, shard = await r.pick_shard()
    victim = r.cluster.primary(topo, shard)
    # on both sides of the failure timeout: at R = 3 some rounds fail over, in others the
    # primary is back first
    down = r.rnd.uniform(0.3, FAILURE_TIMEOUT_MS / 1000 + 1.5)
    async with r.fault("kill-primary", victim, await r.queues_of(shard), down=down):
        await r.cluster.kill(victim)
        await asyncio.sleep(down)  # the fault's duration: the primary stays dead this long
        r.cluster.respawn(victim)
    await r.cluster.wait_member(victim)


async def pause_primary(r: Round) -> None:
    """SIGSTOP past the failure timeout, then SIGCONT: at R = 3 a zombie primary."""
    topo, shard = await r.pick_shard()
    victim = r.cluster.primary(topo, shard)
    held = FAILURE_TIMEOUT_MS / 1000 + r.rnd.uniform(0.3, 1.3)
    async with r.fault("pause-primary", victim, await r.queues_of(shard), held=held):
        r.cluster.pause(victim)
        await asyncio.sleep(held)  # the fault's duration: stopped past the failure timeout
        r.cluster.resume(victim)


async def _client_partition(r: Round, kind: str, how: str) -> None:
    topo, shard = await r.pick_shard()
    victim = r.cluster.primary(topo, shard)
    proxy = r.cluster.members[victim].proxy
    held = r.rnd.uniform(0.5, 2.5)
    delay = r.rnd.uniform(0.05, 0.3)
    async with r.fault(kind, victim, await r.queues_of(shard), held=held):
        if how == "cut":
            proxy.cut(UNBOUND_SOURCE)
        elif how == "blackhole":
            proxy.blackhole(UNBOUND_SOURCE)
        else:
            proxy.delay(delay, UNBOUND_SOURCE)
        await asyncio.sleep(held)  # the fault's duration: the link stays broken this long
        proxy.heal(UNBOUND_SOURCE)


# The "clients" of a primary here are the processes that dial it unbound (cluster.py): the
# gateway, and at R = 3 also the controller (which then fails the shard over) and a
# rebalancer; only its followers still reach it.


async def cut_clients(r: Round) -> None:
    """The clients' links to a primary cut (reset)."""
    await _client_partition(r, "cut-clients", "cut")


async def blackhole_clients(r: Round) -> None:
    """The clients' links to a primary silent: their requests hang until the heal."""
    await _client_partition(r, "blackhole-clients", "blackhole")


async def delay_clients(r: Round) -> None:
    """50-300 ms added to the clients' links to a primary."""
    await _client_partition(r, "delay-clients", "delay")


async def kill_follower(r: Round) -> None:
    topo, shard = await r.pick_shard()
    victim = r.rnd.choice(r.cluster.followers(topo, shard))
    down = r.rnd.uniform(0.3, 2.0)
    async with r.fault("kill-follower", victim, await r.queues_of(shard), down=down):
        await r.cluster.kill(victim)
        await asyncio.sleep(down)  # the fault's duration: the follower stays dead this long
        r.cluster.respawn(victim)
    await r.cluster.wait_member(victim)


async def wipe_follower(r: Round) -> None:
    """A follower's data directory lost: it comes back empty (a learner)."""
    topo, shard = await r.pick_shard()
    victim = r.rnd.choice(r.cluster.followers(topo, shard))
    down = r.rnd.uniform(0.3, 1.5)
    async with r.fault("wipe-follower", victim, await r.queues_of(shard), down=down):
        await r.cluster.wipe(victim)
        await asyncio.sleep(down)  # the fault's duration: the follower stays dead this long
        r.cluster.respawn(victim)
    await r.cluster.wait_member(victim)


async def kill_controller(r: Round) -> None:
    down = r.rnd.uniform(0.5, 3.0)
    async with r.fault("kill-controller", "controller", list(r.queues), down=down):
        await r.cluster.kill_controller()
        await asyncio.sleep(down)  # the fault's duration: no controller for this long
        r.cluster.respawn_controller()


async def _primary_from_followers(r: Round, kind: str, how: str) -> None:
    """Links between the primary and its followers broken both ways (each side's proxy
    refuses the other's source IP); clients and the controller still reach everyone."""
    topo, shard = await r.pick_shard()
    primary = r.cluster.primary(topo, shard)
    followers = r.cluster.followers(topo, shard)
    held = r.rnd.uniform(1.0, 3.5)
    pairs = [(r.cluster.members[f].proxy, r.cluster.source_of(primary)) for f in followers]
    pairs += [(r.cluster.members[primary].proxy, r.cluster.source_of(f)) for f in followers]
    async with r.fault(kind, primary, await r.queues_of(shard), held=held):
        for proxy, source in pairs:
            if how == "cut":
                proxy.cut(source)
            else:
                proxy.blackhole(source)
        await asyncio.sleep(held)  # the fault's duration: the partition lasts this long
        for proxy, source in pairs:
            proxy.heal(source)


async def cut_primary_from_followers(r: Round) -> None:
    await _primary_from_followers(r, "cut-primary-from-followers", "cut")


async def blackhole_primary_from_followers(r: Round) -> None:
    await _primary_from_followers(r, "blackhole-primary-from-followers", "blackhole")


async def rollback_primary(r: Round) -> None:
    """A CANARY, never scheduled: the primary's disk rolled back to a copy taken a moment
    earlier. Jobs pushed after the copy are lost, jobs acked after it come back, ids are
    issued again: the tier must report all three (test_faults.py checks that it does)."""
    topo, shard = await r.pick_shard()
    victim = r.cluster.primary(topo, shard)
    held = r.rnd.uniform(1.0, 2.0)
    async with r.fault("rollback-primary", victim, await r.queues_of(shard), held=held):
        copy = await r.cluster.save_data(victim)
        r.cluster.respawn(victim)
        await r.cluster.wait_member(victim)
        await asyncio.sleep(held)  # the fault's duration: the load runs on what is undone
        await r.cluster.restore_data(victim, copy)
        r.cluster.respawn(victim)
    await r.cluster.wait_member(victim)


@dataclass(frozen=True)
class Kind:
    name: str
    run: Callable[[Round], Awaitable[None]]
    min_replicas: int  # 1: runs on today's single copies; 3: needs replicated shards
    scheduled: bool = True  # False: a canary, run only by the test that expects it to fail


KINDS = [
    Kind("kill-primary", kill_primary, 1),
    Kind("pause-primary", pause_primary, 1),
    Kind("cut-clients", cut_clients, 1),
    Kind("blackhole-clients", blackhole_clients, 1),
    Kind("delay-clients", delay_clients, 1),
    Kind("kill-follower", kill_follower, 3),
    Kind("wipe-follower", wipe_follower, 3),
    Kind("kill-controller", kill_controller, 3),
    Kind("cut-primary-from-followers", cut_primary_from_followers, 3),
    Kind("blackhole-primary-from-followers", blackhole_primary_from_followers, 3),
    Kind("rollback-primary", rollback_primary, 1, scheduled=False),
]
BY_NAME = {k.name: k for k in KINDS}


def variants(replicas: int) -> list[tuple[str, bool]]:
    """(kind, during a slot move) for every kind that applies at ``replicas``."""
    return [(k.name, moves) for k in KINDS if k.scheduled and k.min_replicas <= replicas
            for moves in (False, True)]


def label(kind: str, moves: bool) -> str:
    return f"{kind}+moves" if moves else kind


# -- one round --------------------------------------------------------------------------------


@dataclass
class RoundResult:
    seed: int
    kind: str
    moves: bool
    replicas: int
    report: Report
    errors: list[str]
    seconds: float
    history_path: Path | None = None

    @property
    def label(self) -> str:
        return label(self.kind, self.moves)

    @property
    def ok(self) -> bool:
        return self.report.ok and not self.errors

    def message(self) -> str:
        head = f"round seed={self.seed} {self.label} R={self.replicas}"
        parts = [head, self.report.summary()]
        if self.errors:
            parts.append("errors: " + "; ".join(self.errors))
        if not self.report.ok:
            parts.append(self.report.examples())
        if self.history_path is not None:
            parts.append(f"history: {self.history_path}")
        return "\n  ".join(parts)


async def run_round(seed: int, kind: str, moves: bool, replicas: int = 1,
                    out: Path = OUT, workdir: Path | None = None,
                    config: LoadConfig | None = None, keep: bool = False) -> RoundResult:
    """One round; its history is written to ``out`` when it fails (or with ``keep``)."""
    started = time.monotonic()
    rnd = random.Random(seed)
    history = History()
    errors: list[str] = []
    grow = rnd.random() < 0.5
    history.meta(seed=seed, kind=kind, moves=moves, replicas=replicas,
                 rebalance=("grow" if grow else "shrink") if moves else None)
    with tempfile.TemporaryDirectory(prefix="shardq-faults-", dir=workdir) as tmp:
        cluster = FaultCluster(Path(tmp), shards=SHARDS, replicas=replicas)
        queues = cluster.queues_per_shard(QUEUES_PER_SHARD)
        load = Load("", queues, history, config, seed)
        try:
            await _round(cluster, load, history, Round(seed, rnd, cluster, history, queues),
                         BY_NAME[kind], moves, grow, errors)
        except Exception as exc:  # a step that did not happen: the round fails, with its why
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            await load.stop()
            await cluster.stop()
        report = check(history)
        result = RoundResult(seed, kind, moves, replicas, report, errors,
                             time.monotonic() - started)
        name = f"{seed}-{result.label}"
        if keep or not result.ok:
            result.history_path = history.dump(out / f"{name}.jsonl")
        if not result.ok:
            logs = out / f"{name}.logs"
            logs.mkdir(parents=True, exist_ok=True)
            for log in cluster.logs():
                shutil.copy(log, logs / log.name)
    return result


async def _round(cluster: FaultCluster, load: Load, history: History, r: Round, kind: Kind,
                 moves: bool, grow: bool, errors: list[str]) -> None:
    await cluster.start(owning=SHARDS - 1 if moves and grow else None)
    load.address = cluster.address
    load.token = cluster.client_token
    load.start()
    await eventually(lambda: _oks(history, "push") >= 50, timeout=20,
                     what="50 pushes answered ok before the fault")
    rebalance = None
    if moves:
        epoch = (await cluster.topology())["epoch"]
        wanted = cluster.shard_names if grow else cluster.shard_names[:-1]
        rebalance = r.rebalance = cluster.start_rebalance(wanted)
        await eventually(lambda: _moved(cluster, epoch), timeout=20, ignore=NOT_YET,
                         what="the rebalance published a new topology")
        r.hold_move()  # released as the fault starts (Round.fault)
    await asyncio.sleep(r.rnd.uniform(0.05, 0.6))  # the fault lands at a seeded instant
    try:
        await kind.run(r)
    finally:
        r.release_move()
    if moves and not r.overlapped_move:
        errors.append("the rebalance was over before the fault started")
    healed, affected = r.healed_at, set(r.affected)
    await eventually(lambda: _oks(history, None, affected, after=healed) >= RECOVERED_OPS,
                     timeout=RECOVERY_TIMEOUT,
                     what=f"{RECOVERED_OPS} operations ok on the fault's queues after the heal")
    await load.stop_producers()
    if rebalance is not None:
        try:
            code = await asyncio.wait_for(asyncio.to_thread(rebalance.wait), REBALANCE_TIMEOUT)
        except TimeoutError:
            code = None
        history.meta(event="rebalance ended", code=code)
        if code != 0:
            errors.append(f"the rebalance ended with {code} (see rebalance.log)")
    await eventually(lambda: _drained(cluster, load.queues), timeout=DRAIN_TIMEOUT, ignore=NOT_YET,
                     what="every queue drained")
    await load.stop_workers()


#: What reading the cluster may meet while it recovers: "not yet" for a polling predicate.
NOT_YET = (ShardqError, OSError, TimeoutError, RuntimeError)


async def _moved(cluster: FaultCluster, epoch: int) -> bool:
    return bool((await cluster.topology())["epoch"] > epoch)


async def _drained(cluster: FaultCluster, queues: list[str]) -> bool:
    return await cluster.live_jobs(queues) == 0


def _oks(history: History, f: str | None, queues: set[str] | None = None,
         after: float = 0.0) -> int:
    """Operations answered ok so far (of kind ``f``, on ``queues``, after ``after``)."""
    return sum(1 for e in history.entries
               if e["type"] == OK and (f is None or e["f"] == f) and e["time"] > after
               and (queues is None or e["queue"] in queues))


# -- many rounds ------------------------------------------------------------------------------


def _percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)  # nearest rank
    return ordered[max(0, min(len(ordered), math.ceil(p / 100 * len(ordered))) - 1)]


def table(results: list[RoundResult]) -> str:
    """Markdown: one row per fault kind (with/without moves) and a total row."""
    head = ("| fault | rounds | failed | pushes ok | lost | resurrected | duplicate ids | "
            "unexpected | redeliveries | indeterminate | unavailable p50 | p99 | max |")
    rows = [head, "|" + "---|" * 13]
    groups: dict[str, list[RoundResult]] = {}
    for result in results:
        groups.setdefault(result.label, []).append(result)
    for name, group in [*sorted(groups.items()), ("all", results)]:
        windows = [w.seconds for r in group for w in r.report.windows]

        def total(attr: str, group: list[RoundResult] = group) -> int:
            return sum(len(getattr(r.report, attr)) for r in group)

        rows.append(
            f"| {name} | {len(group)} | {sum(not r.ok for r in group)} | "
            f"{sum(r.report.pushes[OK] for r in group)} | {total('lost')} | "
            f"{total('resurrected')} | {total('duplicate_ids')} | {total('unexpected')} | "
            f"{sum(r.report.redeliveries for r in group)} | "
            f"{sum(r.report.indeterminate for r in group)} | "
            f"{_percentile(windows, 50):.2f} s | {_percentile(windows, 99):.2f} s | "
            f"{max(windows, default=0.0):.2f} s |")
    return "\n".join(rows)


async def run_many(rounds: int, replicas: int, base_seed: int, kinds: list[str] | None,
                   out: Path, keep: bool = False) -> list[RoundResult]:
    plan = [v for v in variants(replicas) if kinds is None or v[0] in kinds]
    if not plan:
        raise SystemExit(f"no fault kind applies at R = {replicas}: {kinds}")
    results = []
    for i in range(rounds):
        kind, moves = plan[i % len(plan)]
        result = await run_round(base_seed + i, kind, moves, replicas, out, keep=keep)
        results.append(result)
        status = "ok" if result.ok else "FAILED"
        windows = ", ".join(f"{w.seconds:.2f} s" for w in result.report.windows)
        rep = result.report
        print(f"[{i + 1}/{rounds}] seed {result.seed} {result.label}: {status} in "
              f"{result.seconds:.1f} s; pushes ok {rep.pushes[OK]}, redeliveries "
              f"{rep.redeliveries}, indeterminate {rep.indeterminate} (delivered "
              f"{rep.indeterminate_delivered}), acks refused {rep.acks['fail']}, "
              f"unavailable {windows}", flush=True)
        if not result.ok:
            print("  " + result.message(), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.runner",
                                     description="shardq fault rounds")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--replicas", type=int, default=3 if REPLICATION_READY else 1)
    parser.add_argument("--seed", type=int, default=1, help="seed of the first round")
    parser.add_argument("--kinds", default="", help="only these kinds (comma-separated)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--keep", action="store_true",
                        help="write every round's history, not only the failed ones'")
    args = parser.parse_args(argv)
    if args.replicas > 1 and not REPLICATION_READY:
        print("R > 1: replication not built yet (tests/faults/cluster.py REPLICATION_READY)",
              file=sys.stderr)
        return 2
    kinds = [k for k in args.kinds.split(",") if k] or None
    started = time.monotonic()
    results = asyncio.run(run_many(args.rounds, args.replicas, args.seed, kinds, args.out,
                                   args.keep))
    text = table(results)
    failed = [r for r in results if not r.ok]
    summary = (f"# Fault rounds\n\n{len(results)} rounds at R = {args.replicas}, seeds "
               f"{args.seed}..{args.seed + args.rounds - 1}, {time.monotonic() - started:.0f} s"
               f", {len(failed)} failed.\n\n{text}\n")
    if failed:
        summary += "\nFailed rounds:\n\n" + "\n".join(f"- {r.message()}" for r in failed) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.md").write_text(summary)
    print("\n" + text)
    print(f"\n{len(failed)} of {len(results)} rounds failed; table in {args.out / 'summary.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
