"""Cron, rate and concurrency limits, dependencies and events, on a fake clock."""

from __future__ import annotations

import datetime as dt

import orjson
import pytest

from shardq.errors import InvalidRequest
from shardq.wire.job import State
from shardq.wire.protocol import JobSpec
from shardq_node import dependencies as deps
from shardq_node import records as R
from shardq_node.engine import Engine
from shardq_node.engine_config import EngineConfig
from shardq_node.snapshot import dump
from shardq_node.wal import decode, frame

from ..helpers import FakeClock

OWNER = 1


def push(engine: Engine, queue: str = "q", data: object = None, **opts: object) -> int:
    spec = JobSpec(data, **opts)  # type: ignore[arg-type]
    return engine.push(queue, [spec], [orjson.dumps(data)])[0]


def pull(engine: Engine, queue: str = "q", count: int = 1, owner: int = OWNER) -> list[int]:
    return [j.id for j in engine.pull(queue, owner, count)]


def restarted(engine: Engine, journal: list[R.Record]) -> Engine:
    """A new engine rebuilt from ``journal`` as recovery would (same clock)."""
    fresh = Engine(engine.clock, engine.config)
    fresh.emitting = False
    for rec in journal:
        fresh.apply(decode(frame(rec)[8:]))
    fresh.timers.compact()
    fresh.emitting = True
    return fresh


def settle(engine: Engine) -> None:
    """Carry the watch messages between slots (one node serves them all here)."""
    deps.settle(engine, lambda slot: True)


def drain(engine: Engine, journal: list[R.Record]) -> None:
    journal.extend(engine.journal)
    engine.journal.clear()


@pytest.fixture
def engine(clock: FakeClock) -> Engine:
    return Engine(clock)


# -- cron ---------------------------------------------------------------------------------------


def queued(engine: Engine, queue: str) -> int:
    q = engine.queues.get(queue)
    return q.n_waiting if q else 0


def test_interval_cron_fires_once_per_tick(engine: Engine, clock: FakeClock) -> None:
    engine.crons.add("every10", "c", b'{"n":1}', "*/10", 3)
    for _ in range(5):
        clock.advance(10_000)
        engine.tick()
        engine.tick()  # a second tick at the same instant fires nothing more
    assert queued(engine, "c") == 5
    job = engine.pull("c", OWNER, 1)[0]
    assert job.priority == 3 and job.data == b'{"n":1}'


def test_cron_fires_once_across_a_restart(clock: FakeClock) -> None:
    engine = Engine(clock)
    journal: list[R.Record] = []
    engine.crons.add("c", "cq", b"1", "*/60", 0)
    clock.advance(60_000)
    engine.tick()
    drain(engine, journal)
    assert queued(engine, "cq") == 1
    again = restarted(engine, journal)  # crash right after the fire, restart at once
    again.tick()
    assert queued(again, "cq") == 1, "the tick fired again after the restart"
    clock.advance(60_000)
    again.tick()
    assert queued(again, "cq") == 2


def test_cron_after_downtime_fires_once_then_resumes(clock: FakeClock) -> None:
    engine = Engine(clock)
    engine.crons.add("c", "cq", b"1", "*/10", 0)
    clock.advance(95_000)  # nine ticks missed
    engine.tick()
    assert queued(engine, "cq") == 1
    assert engine.crons.entries["c"]["next_run"] == clock.now + 10_000
    clock.advance(10_000)
    engine.tick()
    assert queued(engine, "cq") == 2


def test_five_and_six_field_expressions(clock: FakeClock) -> None:
    clock.now = int(dt.datetime(2026, 1, 1, 2, 59, 30, tzinfo=dt.UTC).timestamp() * 1000)
    engine = Engine(clock)
    engine.crons.add("nightly", "n", b"1", "0 3 * * *", 0)
    engine.crons.add("tensec", "t", b"1", "*/10 * * * * *", 0)
    at3 = int(dt.datetime(2026, 1, 1, 3, 0, tzinfo=dt.UTC).timestamp() * 1000)
    assert engine.crons.entries["nightly"]["next_run"] == at3
    assert engine.crons.entries["tensec"]["next_run"] == clock.now + 10_000
    clock.now = at3
    engine.tick()
    assert queued(engine, "n") == 1
    assert queued(engine, "t") == 1


def test_same_cron_name_replaces(engine: Engine) -> None:
    engine.crons.add("c", "a", b"1", "*/10", 0)
    engine.crons.add("c", "b", b"2", "*/20", 5)
    assert list(engine.crons.entries) == ["c"]
    assert engine.crons.entries["c"]["queue"] == "b"


@pytest.mark.parametrize("schedule", ["*/0", "every minute", "* * *", "61 * * * *",
                                      "0 0 31 2 *", "*/x"])
def test_bad_schedules_are_invalid(engine: Engine, schedule: str) -> None:
    with pytest.raises(InvalidRequest, match=r"schedule"):
        engine.crons.add("c", "q", b"1", schedule, 0)


# -- rate limit -----------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 7, 50])
def test_rate_limit_over_ten_seconds_gives_limit_times_ten(
    engine: Engine, clock: FakeClock, limit: int
) -> None:
    for i in range(limit * 20):
        push(engine, data=i)
    engine.set_queue("q", rate_limit=limit)
    burst = len(pull(engine, count=10_000))  # the full bucket at the start
    assert burst == limit
    got = 0
    for _ in range(10_000):  # pull every millisecond for ten seconds
        clock.advance(1)
        got += len(pull(engine, count=10_000))
    assert abs(got - limit * 10) <= 1


def test_no_tokens_are_spent_while_the_queue_is_empty(engine: Engine, clock: FakeClock) -> None:
    engine.set_queue("q", rate_limit=5)
    for _ in range(100):
        assert pull(engine) == []
    for i in range(10):
        push(engine, data=i)
    assert len(pull(engine, count=100)) == 5


def test_pullb_respects_rate_and_concurrency_together(engine: Engine, clock: FakeClock) -> None:
    for i in range(100):
        push(engine, data=i)
    engine.set_queue("q", rate_limit=10, concurrency_limit=4)
    first = pull(engine, count=100)
    assert len(first) == 4  # concurrency is the tighter limit
    for job_id in first:
        engine.ack(job_id)
    assert len(pull(engine, count=100)) == 4
    engine.set_queue("q", rate_limit=10, concurrency_limit=50)
    assert len(pull(engine, count=100)) == 2  # 10 tokens, 8 spent: rate is tighter now


def test_rate_limited_queue_says_when_the_next_token_comes(
    engine: Engine, clock: FakeClock
) -> None:
    push(engine)
    push(engine)
    engine.set_queue("q", rate_limit=2)
    assert len(pull(engine, count=2)) == 2
    push(engine)
    assert pull(engine) == []
    assert engine.blocked_until("q") == clock.now + 500


# -- concurrency ----------------------------------------------------------------------------------


def test_concurrency_slot_frees_on_ack_fail_timeout_cancel_and_disconnect(
    clock: FakeClock,
) -> None:
    engine = Engine(clock, EngineConfig(default_lease_ms=1000))
    for i in range(10):
        push(engine, data=i)
    engine.set_queue("q", concurrency_limit=1)
    frees = {
        "ack": lambda j: engine.ack(j),
        "fail": lambda j: engine.fail(j),
        "cancel": lambda j: engine.cancel(j),
        "disconnect": lambda j: engine.release_owner(OWNER),
        "timeout": lambda j: (clock.advance(1100), engine.tick()),
    }
    for how, free in frees.items():
        taken = pull(engine)
        assert len(taken) == 1
        assert pull(engine, owner=2) == [], f"second job started before {how}"
        free(taken[0])
        assert engine.queues["q"].n_active == 0, how


# -- dependencies ---------------------------------------------------------------------------------


def test_chain_of_three_runs_in_order(engine: Engine) -> None:
    a = push(engine, "q", "a")
    b = push(engine, "q", "b", depends_on=[a])
    c = push(engine, "q", "c", depends_on=[b])
    assert engine.jobs[b].state is State.WAITING_CHILDREN
    for expected in (a, b, c):
        assert pull(engine, count=10) == [expected]
        engine.ack(expected)
    assert pull(engine) == []


def test_fan_in_of_one_hundred_parents(engine: Engine) -> None:
    parents = [push(engine, "p", i) for i in range(100)]
    child = push(engine, "c", "child", depends_on=parents)
    settle(engine)
    assert len(engine.deps.watchers) == 100  # "p" and "c" are different slots: watches
    taken = pull(engine, "p", count=100)
    for job_id in taken[:-1]:
        engine.ack(job_id)
    settle(engine)
    assert engine.jobs[child].state is State.WAITING_CHILDREN
    assert pull(engine, "c") == []
    engine.ack(taken[-1])
    settle(engine)
    assert pull(engine, "c") == [child]
    assert not engine.deps.watchers and not engine.deps.outbox


def test_parent_death_sends_the_chain_to_the_dlq_naming_the_parent(engine: Engine) -> None:
    a = push(engine, "q", "a", max_attempts=1)
    b = push(engine, "q", "b", depends_on=[a])
    c = push(engine, "q", "c", depends_on=[b])
    pull(engine)
    engine.fail(a, "boom")
    dead = {j.id: j.opts.error for j in engine.dlq("q")}
    assert dead == {a: "boom", b: f"Parent job {a} failed", c: f"Parent job {b} failed"}


def test_cancelled_or_expired_parent_fails_the_child(engine: Engine, clock: FakeClock) -> None:
    a = push(engine, "q", "a")
    child = push(engine, "k", "x", depends_on=[a])
    settle(engine)
    engine.cancel(a)
    settle(engine)
    assert engine.dlq("k")[0].id == child
    assert engine.dlq("k")[0].opts.error == f"Parent job {a} was cancelled"
    e = push(engine, "q", "e", ttl=100)
    child2 = push(engine, "k", "y", depends_on=[e])
    settle(engine)
    clock.advance(100)
    engine.tick()
    settle(engine)
    assert engine.jobs[child2].opts.error == f"Parent job {e} expired"


def test_child_of_an_already_dead_parent_goes_straight_to_the_dlq(engine: Engine) -> None:
    a = push(engine, "q", "a", max_attempts=1)
    pull(engine)
    engine.fail(a)
    child = push(engine, "q", "c", depends_on=[a])
    assert engine.jobs[child].state is State.DEAD


def test_dependencies_survive_a_restart(clock: FakeClock) -> None:
    engine = Engine(clock)
    journal: list[R.Record] = []
    a = push(engine, "q", "a")
    b = push(engine, "q", "b")
    child = push(engine, "c", "child", depends_on=[a, b])
    settle(engine)
    pull(engine, count=2)
    engine.ack(a)
    settle(engine)
    drain(engine, journal)
    again = restarted(engine, journal)
    again.deps.rebuild()
    assert again.jobs[child].state is State.WAITING_CHILDREN
    assert again.deps.children[child] == {b}
    assert again.deps.watchers == {b: {child}}
    snap = Engine(clock)  # and through a snapshot of that state
    for rec in dump(again):
        snap.apply(decode(frame(rec)[8:]))
    snap.deps.rebuild()
    assert snap.deps.children[child] == {b}
    snap.release([b], "node restarted")
    assert pull(snap, count=5) == [b]
    snap.ack(b)
    settle(snap)
    assert pull(snap, "c") == [child]


# -- events ------------------------------------------------------------------------------


def test_a_jobs_life_emits_its_events_in_order(clock: FakeClock) -> None:
    engine = Engine(clock, EngineConfig(default_lease_ms=1000))
    engine.watch["q"] = 1
    job = push(engine, max_attempts=3)
    pull(engine)
    engine.progress(job, 50, "half")
    engine.fail(job, "once")
    pull(engine)
    clock.advance(1100)
    engine.tick()  # lease passes: timeout
    pull(engine)
    engine.ack(job, b'"ok"')
    ttl_job = push(engine, ttl=10)
    clock.advance(10)
    engine.tick()
    got = [(name, j["id"]) for name, _, j in engine.events]
    assert got == [
        ("progress", job), ("failed", job), ("retrying", job), ("timeout", job),
        ("failed", job), ("retrying", job), ("completed", job), ("expired", ttl_job),
    ]


def test_no_events_are_collected_without_subscribers(engine: Engine) -> None:
    job = push(engine)
    pull(engine)
    engine.ack(job)
    assert engine.events == []
