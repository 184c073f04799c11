"""Compact waiting jobs (jobs.Lane): every operation answers as it does on full jobs.

The reference is the same engine with ``EngineConfig(compact=False)`` (a ``Job`` for every
job, as before lanes existed): a seeded script of every operation runs on both, and each
answer, the records made and the final state must be the same. Then the compact engine's
state goes through a snapshot, the log, a recovery and a slot move and must come back whole.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from shardq.errors import ShardqError
from shardq.wire.job import State
from shardq.wire.protocol import JobSpec
from shardq.wire.slots import SLOTS, slot_of
from shardq_node import records as R
from shardq_node import slotmove
from shardq_node.engine import Engine
from shardq_node.engine_config import EngineConfig
from shardq_node.jobs import MAX_LANES, Finished, Job
from shardq_node.settings import StorageSettings
from shardq_node.snapshot import dump
from shardq_node.storage import (
    CorruptSnapshot,
    Storage,
    load_snapshot,
    snapshot_name,
    write_snapshot,
)
from shardq_node.wal import decode, frame, frame_packed, segment_name

from ..helpers import FakeClock

QUEUES = ["a", "b"]


def engine(compact: bool = True, clock: FakeClock | None = None) -> Engine:
    return Engine(clock or FakeClock(), EngineConfig(compact=compact))


def push(e: Engine, queue: str = "a", data: object = None, **opts: Any) -> int:
    return e.push(queue, [JobSpec(data, **opts)], [orjson.dumps(data)])[0]


def state_of(e: Engine) -> list[bytes]:
    """The whole state, one record per job whatever its form (dump time zeroed)."""
    return sorted(frame(r if r[0] == R.FINISHED else (r[0], 0, *r[2:]))
                  for r in dump(e, expand=True))


def seen(value: Any) -> Any:
    """An answer as a test compares it (a job by its wire form)."""
    if isinstance(value, Job):
        return orjson.loads(orjson.dumps(value.wire()))
    if isinstance(value, Finished):
        return (value.state.value, value.at, value.result)
    if isinstance(value, list):
        return [seen(v) for v in value]
    return value


def step(e: Engine, rnd: random.Random, i: int) -> Any:
    """One random operation on ``e``; its answer (or the refusal's name)."""
    clock = e.clock
    assert isinstance(clock, FakeClock)
    clock.advance(rnd.choice([0, 0, 1, 7, 40]))
    queue = rnd.choice(QUEUES)
    issued = [(s + 1) * SLOTS + slot_of(q) for q in QUEUES
              for s in range(e.seqs[slot_of(q)])] or [1]
    op = rnd.random()
    try:
        if op < 0.35:
            n = rnd.choice([1, 1, 1, 3])
            specs = [JobSpec({"i": i, "k": k}, priority=rnd.choice([0, 0, 0, 0, 2, -1]),
                             delay=rnd.choice([0] * 6 + [20]), ttl=rnd.choice([0] * 8 + [300]),
                             max_attempts=rnd.choice([0, 0, 0, 1, 2]),
                             backoff=rnd.choice([0, 0, 5]),
                             unique_key=rnd.choice([None] * 8 + [f"u{rnd.randint(0, 5)}"]),
                             depends_on=rnd.choice([None] * 8 + [[rnd.choice(issued)]]))
                     for k in range(n)]
            return e.push(queue, specs, [orjson.dumps(s.data) for s in specs])
        if op < 0.52:
            return seen(e.pull(queue, rnd.randint(1, 3), rnd.randint(1, 4),
                               rnd.choice([0, 0, 30])))
        if op < 0.62 and e.active:
            return e.ack(rnd.choice(sorted(e.active)), b'{"r":%d}' % i)
        if op < 0.67 and e.active:
            return e.fail(rnd.choice(sorted(e.active)), f"e{i}")
        if op < 0.74:
            return e.cancel(rnd.choice(issued))
        if op < 0.8:
            return seen(e.get_job(rnd.choice(issued)))
        if op < 0.83:
            return e.get_progress(rnd.choice(issued))
        if op < 0.86:
            return e.deps.state_of(rnd.choice(issued))
        if op < 0.89:
            return e.set_queue(queue, paused=rnd.random() < 0.2,
                               rate_limit=rnd.choice([None, None, 50]),
                               concurrency_limit=rnd.choice([None, None, 2]))
        if op < 0.91:
            return e.retry_dlq(queue)
        if op < 0.93:
            return seen(e.dlq(queue))
        if op < 0.96:
            return e.release_owner(rnd.randint(1, 4))
        clock.advance(rnd.choice([5, 50, 400]))
        return e.tick()
    except ShardqError as exc:
        return type(exc).__name__


def script(e: Engine, seed: int, steps: int) -> tuple[list[Any], list[R.Record]]:
    rnd = random.Random(seed)
    answers, journal = [], []
    for i in range(steps):
        answers.append(step(e, rnd, i))
        journal.extend(e.journal)
        e.journal.clear()
    return answers, journal


@pytest.mark.parametrize("seed", range(8))
def test_every_operation_answers_as_on_full_jobs(seed: int) -> None:
    compact, full = engine(True), engine(False)
    got, got_log = script(compact, seed, 400)
    want, want_log = script(full, seed, 400)
    assert got == want
    assert [frame(r) for r in got_log] == [frame(r) for r in want_log]
    assert state_of(compact) == state_of(full)
    assert compact.payload_bytes == full.payload_bytes == sum(
        len(j.data) for j in compact.live_jobs())
    assert compact.job_count() == len(full.jobs)
    for q in QUEUES:
        a, b = compact.queues.get(q), full.queues.get(q)
        assert (a and a.n_waiting, a and a.n_active) == (b and b.n_waiting, b and b.n_active)


def test_the_script_keeps_jobs_compact_and_full_at_once() -> None:
    """The comparison above means something: both forms are there, side by side."""
    e = engine()
    script(e, 3, 400)
    assert e.compact_count() > 0
    assert any(j.state is State.WAITING for j in e.jobs.values())


def test_a_plain_waiting_job_has_no_job_object_until_pulled() -> None:
    e = engine()
    ids = [push(e, data=n) for n in range(3)]
    assert not e.jobs and e.compact_count() == 3 and e.queues["a"].n_waiting == 3
    seen_job = e.get_job(ids[1])
    assert isinstance(seen_job, Job) and seen_job.state is State.WAITING
    assert seen_job.data == b"1" and not e.jobs  # inspecting makes no Job in the engine
    pulled = e.pull("a", 1, 1)
    assert [j.id for j in pulled] == ids[:1] and set(e.jobs) == {ids[0]}
    assert e.jobs[ids[0]].state is State.ACTIVE and e.compact_count() == 2


def test_jobs_with_options_or_a_delay_are_full() -> None:
    e = engine()
    first = push(e)
    others = [push(e, ttl=100), push(e, unique_key="k"), push(e, delay=10),
              push(e, depends_on=[first]), push(e, max_attempts=2)]
    assert e.compact_count() == 1 and set(e.jobs) == set(others)


def test_each_priority_has_its_lane_up_to_max_lanes() -> None:
    e = engine()
    ids = {p: push(e, priority=p) for p in range(MAX_LANES + 1)}
    assert e.compact_count() == MAX_LANES and set(e.jobs) == {ids[MAX_LANES]}
    assert [lane.priority for lane in e.queues["a"].lanes] == list(range(MAX_LANES - 1, -1, -1))
    assert [j.id for j in e.pull("a", 1, 100)] == [ids[p] for p in range(MAX_LANES, -1, -1)]
    again = push(e, priority=MAX_LANES)  # the lanes are empty now: one is taken over
    assert e.compact_count() == 1 and again not in e.jobs
    assert e.queues["a"].lanes[0].priority == MAX_LANES


def test_pull_merges_the_lane_and_the_heap_in_ready_order() -> None:
    e = engine()
    clock = e.clock
    assert isinstance(clock, FakeClock)
    low = push(e, priority=0)  # the lane takes priority 0
    high = push(e, priority=5)  # a full job, in the heap
    clock.advance(5)
    later = push(e, priority=0)
    delayed = push(e, delay=1)  # due before ``later2``: after promotion, by run_at
    clock.advance(3)
    e.tick()
    clock.advance(1)
    later2 = push(e, priority=0)
    order = [j.id for j in e.pull("a", 1, 10)]
    assert order == [high, low, later, delayed, later2]


def test_a_lane_starts_again_at_the_priority_of_its_next_job() -> None:
    e = engine()
    push(e, priority=1)
    assert [j.id for j in e.pull("a", 1, 1)]
    second = push(e, priority=7)
    assert e.compact_count() == 1 and [lane.priority for lane in e.queues["a"].lanes] == [7]
    assert [j.id for j in e.pull("a", 1, 1)] == [second]


def test_a_job_taken_from_the_middle_is_skipped_and_ids_are_found_after_the_front_goes() -> None:
    e = engine()
    ids = [push(e, data=n) for n in range(10_000)]
    e.cancel(ids[5])
    assert e.get_job(ids[5]) == e.finished[ids[5]]
    pulled = [j.id for j in e.pull("a", 1, 6000)]
    assert pulled == ids[:5] + ids[6:6001]
    (lane,) = e.queues["a"].lanes
    assert len(lane.data) < 10_000  # the taken front was dropped
    job = e.get_job(ids[9000])
    assert isinstance(job, Job) and job.data == b"9000"
    assert e.payload_bytes == sum(len(j.data) for j in e.live_jobs())


def test_pull_with_max_bytes_counts_compact_payloads() -> None:
    e = engine()
    for _ in range(5):
        push(e, data="x" * 18)  # 20 bytes of JSON each
    assert len(e.pull("a", 1, 5, max_bytes=50)) == 3


def test_a_compact_parent_holds_its_child_until_it_completes() -> None:
    e = engine()
    parent = push(e)
    child = push(e, depends_on=[parent])
    assert e.deps.state_of(parent) == "pending"
    assert e.jobs[child].state is State.WAITING_CHILDREN
    (job,) = e.pull("a", 1, 1)
    assert job.id == parent
    e.ack(parent)
    assert e.jobs[child].state is State.WAITING


def test_cancel_of_a_compact_parent_kills_its_child() -> None:
    e = engine()
    parent = push(e)
    child = push(e, depends_on=[parent])
    e.cancel(parent)
    assert e.jobs[child].state is State.DEAD
    assert e.queues["a"].n_waiting == 0 and e.compact_count() == 0


# -- snapshot, log, recovery, slot moves -------------------------------------------------------


def mixed() -> Engine:
    e = engine()
    _journal_of_mixed(e)
    assert e.compact_count() > 2000 and e.active and len(e.jobs) > len(e.active)
    return e


def test_snapshot_round_trip_keeps_compact_jobs_compact(tmp_path: Path) -> None:
    e = mixed()
    path = tmp_path / snapshot_name(3)
    count = write_snapshot(e, str(path), 3)
    loaded = engine(clock=e.clock)  # type: ignore[arg-type]
    assert load_snapshot(loaded, path.read_bytes()) == count
    assert state_of(loaded) == state_of(e)
    assert loaded.compact_count() == e.compact_count()
    assert loaded.payload_bytes == e.payload_bytes
    for q in QUEUES:
        assert [j.id for j in loaded.pull(q, 1, 10_000)] == [j.id for j in e.pull(q, 1, 10_000)]


def test_a_snapshot_of_full_jobs_only_loads_and_compacts(tmp_path: Path) -> None:
    """A format 2 snapshot (a JOB record per job) loads; its plain waiting jobs go compact."""
    e = mixed()
    path = tmp_path / "old.snap"
    recs = [(R.SNAP_BEGIN, 0, 2, 3, 0), *dump(e, expand=True)]
    path.write_bytes(b"".join(frame(r) for r in recs)
                     + frame((R.SNAP_END, 0, len(recs) - 1)))
    assert not any(r[0] == R.CJOBS for r in recs)
    loaded = engine(clock=e.clock)  # type: ignore[arg-type]
    load_snapshot(loaded, path.read_bytes())
    assert state_of(loaded) == state_of(e)
    assert loaded.compact_count() > 2000


def test_a_packed_record_that_does_not_add_up_is_a_corrupt_snapshot(tmp_path: Path) -> None:
    e = engine()
    for n in range(10):
        push(e, data=n)
    (rec,) = [r for r in dump(e) if r[0] == R.CJOBS]
    bad = (*rec[:-1], rec[-1][:-1])  # one payload byte short
    data = b"".join((frame((R.SNAP_BEGIN, 0, 3, 1, 0)), frame_packed(bad),
                     frame((R.SNAP_END, 0, 1))))
    with pytest.raises(CorruptSnapshot):
        load_snapshot(engine(), data)
    good = b"".join((frame((R.SNAP_BEGIN, 0, 3, 1, 0)), frame_packed(rec),
                     frame((R.SNAP_END, 0, 1))))
    assert decode(frame_packed(rec)[8:]) == list(rec)
    assert load_snapshot(engine(), good) == 1


def test_replay_unpacks_what_the_primary_pulled() -> None:
    """A follower (or a replay) gets START for jobs it holds compact: same state after."""
    source = engine()
    journal = _journal_of_mixed(source) + script(source, 12, 300)[1]
    assert any(r[0] == R.START for r in journal)
    replica = engine(clock=source.clock)  # type: ignore[arg-type]
    replica.emitting = False
    for rec in journal:
        replica.apply(decode(frame(rec)[8:]))
    assert state_of(replica) == state_of(source)
    assert replica.compact_count() == source.compact_count() > 0


def _journal_of_mixed(e: Engine) -> list[R.Record]:
    """Bring ``e`` in every state: compact and full waiting, delayed, active, dead,
    finished; the records it made."""
    script_log = script(e, 11, 500)[1]
    for n in range(3000):
        push(e, "a" if n % 2 else "b", {"n": n})
    e.pull("a", 2, 100)
    rest = e.journal[:]
    e.journal.clear()
    return script_log + rest


def test_recovery_from_a_snapshot_and_the_log_after_it(tmp_path: Path) -> None:
    """Snapshot at segment 2, more records in segment 2's log: recovery is the live state."""
    e = engine()
    first = _journal_of_mixed(e)
    assert first
    write_snapshot(e, str(tmp_path / snapshot_name(2)), 2)
    _, tail = script(e, 13, 300)
    for n in range(500):
        push(e, "b", n)
    tail += e.journal
    e.journal.clear()
    (tmp_path / "wal").mkdir()
    (tmp_path / "wal" / segment_name(2)).write_bytes(b"".join(frame(r) for r in tail))
    recovered = engine(clock=e.clock)  # type: ignore[arg-type]
    Storage(StorageSettings(data_dir=str(tmp_path))).recover(recovered, open_wal=False)
    assert state_of(recovered) == state_of(e)
    assert recovered.compact_count() == e.compact_count()


def test_a_slot_move_carries_compact_jobs_and_the_drop_forgets_them() -> None:
    source = mixed()
    slot = slot_of("b")
    moved = sorted(j.id for j in source.live_jobs() if j.queue.name == "b")
    records = slotmove.export(source, [slot])
    assert any(r[0] == R.CJOBS for r in records)
    wire = orjson.loads(orjson.dumps(records, default=_raw))  # as EXPORT answers
    target = engine(clock=source.clock)  # type: ignore[arg-type]
    for rec in wire:
        target.log_apply(tuple(decode(frame(rec)[8:])))
    target.deps.rebuild()
    assert sorted(j.id for j in target.live_jobs()) == moved
    assert target.compact_count() == sum(1 for j in source.live_jobs()
                                         if j.queue.name == "b" and j.id not in source.jobs)
    again = engine(clock=source.clock)  # type: ignore[arg-type]
    for rec in target.journal:  # the import as the target's log holds it
        again.apply(decode(frame(rec)[8:]))
    assert state_of(again) == state_of(target)
    before = source.payload_bytes
    source.drop_slots([slot])
    assert not any(j.queue.name == "b" for j in source.live_jobs())
    assert source.payload_bytes == before - target.payload_bytes


def _raw(value: object) -> object:
    if type(value) is bytes:
        return orjson.Fragment(value)
    raise TypeError(type(value).__name__)
