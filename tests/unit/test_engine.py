"""The engine alone, driven by a fake clock: ordering, delays, leases, retries, DLQ."""

from __future__ import annotations

import orjson
import pytest

from shardq.errors import DuplicateJob, InvalidRequest, JobNotActive, JobNotFound, LeaseExpired
from shardq.wire.job import State
from shardq.wire.protocol import JobSpec
from shardq.wire.slots import SLOTS, slot_of
from shardq_node.engine import Engine
from shardq_node.engine_config import EngineConfig

from ..helpers import FakeClock

OWNER = 1


def push(engine: Engine, queue: str = "q", data: object = None, **opts: object) -> int:
    spec = JobSpec(data, **opts)  # type: ignore[arg-type]
    return engine.push(queue, [spec], [orjson.dumps(data)])[0]


def pull_ids(engine: Engine, queue: str = "q", count: int = 100) -> list[int]:
    return [j.id for j in engine.pull(queue, OWNER, count)]


@pytest.fixture
def engine(clock: FakeClock) -> Engine:
    return Engine(clock)


def test_job_ids_are_seq_times_1024_plus_the_queue_slot(engine: Engine) -> None:
    ids = [push(engine, "emails") for _ in range(3)]
    slot = slot_of("emails")
    assert ids == [1 * SLOTS + slot, 2 * SLOTS + slot, 3 * SLOTS + slot]


def test_higher_priority_first_then_run_at_then_fifo(engine: Engine, clock: FakeClock) -> None:
    low1 = push(engine, priority=0)
    high = push(engine, priority=10)
    low2 = push(engine, priority=0)
    mid = push(engine, priority=5)
    assert pull_ids(engine) == [high, mid, low1, low2]


def test_fifo_within_a_priority(engine: Engine) -> None:
    ids = [push(engine, data=i) for i in range(50)]
    assert pull_ids(engine) == ids


def test_earlier_run_at_beats_lower_id_within_a_priority(engine: Engine, clock: FakeClock) -> None:
    delayed = push(engine, delay=100)  # run_at = t0 + 100, lower id
    clock.advance(50)
    plain = push(engine)  # run_at = t0 + 50
    clock.advance(100)
    engine.tick()
    assert pull_ids(engine) == [plain, delayed]


def test_delayed_job_never_blocks_ready_jobs(engine: Engine, clock: FakeClock) -> None:
    delayed = push(engine, priority=100, delay=10_000)
    ready = push(engine)
    assert pull_ids(engine) == [ready]
    clock.advance(9_999)
    engine.tick()
    assert pull_ids(engine) == []
    clock.advance(1)
    engine.tick()
    assert pull_ids(engine) == [delayed]


def test_ttl_expires_an_unpulled_job_and_releases_its_unique_key(
    engine: Engine, clock: FakeClock
) -> None:
    job_id = push(engine, ttl=1000, unique_key="k")
    with pytest.raises(DuplicateJob):
        push(engine, unique_key="k")
    clock.advance(1000)
    engine.tick()
    assert engine.get_job(job_id).state is State.EXPIRED  # type: ignore[union-attr]
    assert pull_ids(engine) == []
    assert push(engine, unique_key="k") > job_id


def test_ttl_does_not_expire_a_job_already_pulled(engine: Engine, clock: FakeClock) -> None:
    job_id = push(engine, ttl=1000)
    assert pull_ids(engine) == [job_id]
    clock.advance(5000)
    engine.tick()
    engine.ack(job_id)
    assert engine.get_job(job_id).state is State.COMPLETED  # type: ignore[union-attr]


def test_timeout_counts_as_failed_attempt_with_backoff(engine: Engine, clock: FakeClock) -> None:
    job_id = push(engine, timeout=500, max_attempts=3, backoff=100)
    assert pull_ids(engine) == [job_id]
    clock.advance(500)
    engine.tick()
    job = engine.jobs[job_id]
    assert job.state is State.DELAYED
    assert job.attempts == 1
    assert "timed out" in (job.opts.error or "")
    clock.advance(100)
    engine.tick()
    assert pull_ids(engine) == [job_id]


def test_job_without_timeout_still_has_a_lease(clock: FakeClock) -> None:
    engine = Engine(clock, EngineConfig(default_lease_ms=2000))
    job_id = push(engine)
    assert pull_ids(engine) == [job_id]
    clock.advance(1999)
    engine.tick()
    assert engine.jobs[job_id].state is State.ACTIVE
    clock.advance(1)
    engine.tick()
    assert engine.jobs[job_id].state is State.WAITING
    assert engine.jobs[job_id].attempts == 1


def test_touch_extends_the_lease(clock: FakeClock) -> None:
    engine = Engine(clock, EngineConfig(default_lease_ms=1000))
    job_id = push(engine)
    pull_ids(engine)
    clock.advance(900)
    assert engine.touch(job_id) == clock.now + 1000
    clock.advance(900)
    engine.tick()
    assert engine.jobs[job_id].state is State.ACTIVE
    clock.advance(100)
    engine.tick()
    assert engine.jobs[job_id].state is State.WAITING


def test_progress_extends_the_lease(clock: FakeClock) -> None:
    engine = Engine(clock, EngineConfig(default_lease_ms=1000))
    job_id = push(engine)
    pull_ids(engine)
    clock.advance(900)
    engine.progress(job_id, 50, "half")
    clock.advance(900)
    engine.tick()
    assert engine.jobs[job_id].state is State.ACTIVE
    assert engine.get_progress(job_id) == (50, "half")


def test_stale_lease_token_is_refused(clock: FakeClock) -> None:
    engine = Engine(clock, EngineConfig(default_lease_ms=1000))
    job_id = push(engine)
    first = engine.pull("q", OWNER, 1)[0].started_at
    clock.advance(1000)
    engine.tick()  # lease expired: back to waiting
    second = engine.pull("q", 2, 1)[0].started_at
    assert second != first
    for call in (
        lambda: engine.ack(job_id, lease=first),
        lambda: engine.fail(job_id, lease=first),
        lambda: engine.progress(job_id, 5, None, lease=first),
        lambda: engine.touch(job_id, lease=first),
    ):
        with pytest.raises(LeaseExpired, match=f"Lease expired for job {job_id}"):
            call()
    engine.ack(job_id, lease=second)
    assert engine.get_job(job_id).state is State.COMPLETED  # type: ignore[union-attr]


def test_lease_tokens_differ_even_within_one_millisecond(engine: Engine) -> None:
    job_id = push(engine)
    tokens = set()
    for owner in range(2, 7):
        job = engine.pull("q", owner, 1)[0]
        tokens.add(job.started_at)
        engine.release_owner(owner)
    assert len(tokens) == 5
    assert engine.jobs[job_id].attempts == 5


@pytest.mark.parametrize("backoff", [1, 100, 1000])
def test_backoff_is_exactly_backoff_times_two_to_the_n_minus_one(
    engine: Engine, clock: FakeClock, backoff: int
) -> None:
    job_id = push(engine, max_attempts=6, backoff=backoff)
    for n in range(1, 6):
        assert pull_ids(engine) == [job_id]
        engine.fail(job_id, f"boom {n}")
        wait = backoff * 2 ** (n - 1)
        assert engine.jobs[job_id].run_at == clock.now + wait
        clock.advance(wait - 1)
        engine.tick()
        assert pull_ids(engine) == [], f"retry {n} came early"
        clock.advance(1)
        engine.tick()
    assert pull_ids(engine) == [job_id]


def test_backoff_is_capped(clock: FakeClock) -> None:
    engine = Engine(clock, EngineConfig(max_backoff_ms=5000))
    assert [engine.backoff_delay(1000, n) for n in range(1, 6)] == [1000, 2000, 4000, 5000, 5000]
    assert engine.backoff_delay(1000, 10_000) == 5000
    assert engine.backoff_delay(60_000, 3) == 60_000  # a backoff above the cap is its own cap


def test_max_attempts_sends_the_job_to_its_queue_dlq(engine: Engine) -> None:
    job_id = push(engine, max_attempts=2)
    other = push(engine, "other", max_attempts=1)
    for _ in range(2):
        assert pull_ids(engine) == [job_id]
        engine.fail(job_id, "nope")
    assert [j.id for j in engine.dlq("q")] == [job_id]
    assert engine.dlq("other") == []
    engine.fail(pull_ids(engine, "other")[0])
    assert [j.id for j in engine.dlq("other")] == [other]
    dead = engine.dlq("q")[0]
    assert dead.state is State.DEAD
    assert dead.attempts == 2
    assert dead.opts.error == "nope"


def test_zero_max_attempts_retries_forever(engine: Engine) -> None:
    job_id = push(engine)
    for _ in range(20):
        assert pull_ids(engine) == [job_id]
        engine.fail(job_id)
    assert engine.dlq("q") == []
    assert engine.jobs[job_id].attempts == 20


def test_retry_dlq_resets_attempts_and_runs_now(engine: Engine, clock: FakeClock) -> None:
    ids = [push(engine, max_attempts=1, backoff=10_000) for _ in range(3)]
    for job_id in ids:
        pull_ids(engine, count=1)
        engine.fail(job_id)
    assert [j.id for j in engine.dlq("q")] == ids
    assert engine.retry_dlq("q", ids[1]) == 1
    assert pull_ids(engine) == [ids[1]]
    assert engine.jobs[ids[1]].attempts == 0
    assert engine.retry_dlq("q") == 2
    assert pull_ids(engine) == [ids[0], ids[2]]
    assert engine.retry_dlq("q") == 0
    assert engine.retry_dlq("q", 999_999) == 0


def test_unique_key_is_per_queue_and_held_while_dead(engine: Engine) -> None:
    job_id = push(engine, unique_key="k", max_attempts=1)
    push(engine, "other", unique_key="k")  # another queue: fine
    pull_ids(engine)
    engine.fail(job_id)
    with pytest.raises(DuplicateJob, match="Duplicate job with key: k"):
        push(engine, unique_key="k")
    engine.cancel(job_id)  # leaves the DLQ: key released
    push(engine, unique_key="k")


def test_unique_key_inside_a_batch_refuses_the_whole_batch(engine: Engine) -> None:
    push(engine, unique_key="a")
    specs = [JobSpec(1, unique_key="b"), JobSpec(2, unique_key="a")]
    with pytest.raises(DuplicateJob, match="Duplicate job with key: a"):
        engine.push("q", specs, [b"1", b"2"])
    specs = [JobSpec(1, unique_key="c"), JobSpec(2, unique_key="c")]
    with pytest.raises(DuplicateJob, match="Duplicate job with key: c"):
        engine.push("q", specs, [b"1", b"2"])
    assert engine.queues["q"].n_waiting == 1  # nothing of the refused batches was pushed


def test_unique_key_released_on_ack(engine: Engine) -> None:
    job_id = push(engine, unique_key="k")
    pull_ids(engine)
    engine.ack(job_id)
    push(engine, unique_key="k")


def test_cancel_works_in_every_live_state(engine: Engine, clock: FakeClock) -> None:
    waiting = push(engine)
    delayed = push(engine, delay=1000)
    active = push(engine, "active")
    pull_ids(engine, "active")
    for job_id in (waiting, delayed, active):
        engine.cancel(job_id)
        assert engine.get_job(job_id).state is State.CANCELLED  # type: ignore[union-attr]
    with pytest.raises(JobNotFound, match=f"Job {waiting} not found"):
        engine.cancel(waiting)
    with pytest.raises(JobNotFound):
        engine.ack(active)  # the worker's ack after a cancel
    clock.advance(2000)
    engine.tick()
    assert pull_ids(engine) == []
    assert engine.queues["q"].pending == 0


def test_second_ack_is_job_not_found(engine: Engine) -> None:
    job_id = push(engine)
    pull_ids(engine)
    engine.ack(job_id)
    with pytest.raises(JobNotFound, match=f"Job {job_id} not found"):
        engine.ack(job_id)


def test_progress_of_a_waiting_job_is_not_found_in_processing(engine: Engine) -> None:
    job_id = push(engine)
    with pytest.raises(JobNotActive, match=f"Job {job_id} not found in processing"):
        engine.progress(job_id, 10, None)


def test_results_are_kept_within_count_retention(clock: FakeClock) -> None:
    engine = Engine(clock, EngineConfig(results_max=3))
    ids = [push(engine) for _ in range(5)]
    pull_ids(engine)
    for job_id in ids:
        engine.ack(job_id, orjson.dumps({"n": job_id}))
    assert engine.get_result(ids[0]) is None
    assert engine.get_result(ids[1]) is None
    assert [orjson.loads(engine.get_result(i) or b"null") for i in ids[2:]] == [
        {"n": i} for i in ids[2:]
    ]


def test_results_are_dropped_after_their_age_retention(clock: FakeClock) -> None:
    engine = Engine(clock, EngineConfig(results_ttl_ms=1000))
    job_id = push(engine)
    pull_ids(engine)
    engine.ack(job_id, b'"done"')
    clock.advance(999)
    engine.tick()
    assert engine.get_result(job_id) == b'"done"'
    clock.advance(1)
    engine.tick()
    assert engine.get_result(job_id) is None


def test_paused_queue_accepts_pushes_but_gives_nothing(engine: Engine) -> None:
    engine.set_queue("q", paused=True)
    job_id = push(engine)
    assert pull_ids(engine) == []
    engine.set_queue("q", paused=False)
    assert pull_ids(engine) == [job_id]


def test_closing_a_connection_returns_its_leases_at_once(engine: Engine) -> None:
    a = push(engine)
    b = push(engine)
    assert [j.id for j in engine.pull("q", 7, 2)] == [a, b]
    assert engine.release_owner(7) == 2
    assert pull_ids(engine) == [a, b]
    assert engine.jobs[a].attempts == 1


def test_released_job_with_exhausted_attempts_goes_to_dlq(engine: Engine) -> None:
    job_id = push(engine, max_attempts=1)
    engine.pull("q", 7, 1)
    engine.release_owner(7)
    assert [j.id for j in engine.dlq("q")] == [job_id]
    assert "lease lost" in (engine.dlq("q")[0].opts.error or "")


def test_ids_are_never_reused_after_jobs_finish(engine: Engine) -> None:
    seen = set()
    for _ in range(100):
        job_id = push(engine)
        assert job_id not in seen
        seen.add(job_id)
        pull_ids(engine)
        engine.ack(job_id)


def test_unknown_parent_in_the_same_slot_is_invalid(engine: Engine) -> None:
    unknown = 999 * SLOTS + slot_of("q")
    with pytest.raises(InvalidRequest, match=f"depends_on: job {unknown} not found"):
        push(engine, depends_on=[unknown])


def test_stats_counters_follow_every_state(engine: Engine, clock: FakeClock) -> None:
    push(engine, max_attempts=1)
    push(engine, delay=1000)
    push(engine)
    active = pull_ids(engine, count=1)
    q = engine.queues["q"]
    assert (q.n_waiting, q.n_delayed, q.n_active, len(q.dlq)) == (1, 1, 1, 0)
    engine.fail(active[0])
    assert (q.n_waiting, q.n_delayed, q.n_active, len(q.dlq)) == (1, 1, 0, 1)
    clock.advance(1000)
    engine.tick()
    assert (q.n_waiting, q.n_delayed, q.n_active, len(q.dlq)) == (2, 0, 0, 1)


def test_pull_batch_takes_at_most_count(engine: Engine) -> None:
    ids = [push(engine) for _ in range(10)]
    assert pull_ids(engine, count=4) == ids[:4]
    assert pull_ids(engine, count=100) == ids[4:]
