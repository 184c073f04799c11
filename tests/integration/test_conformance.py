"""MagicQueue's TCP protocol, checked over a real socket against a real node.

Every command of PROTOCOL.md gets its success shape checked (exact keys and
JSON types), every single-node error text gets a test that provokes it, and
the framing rules (order, pipelining, blocked PULLs, long lines, reqId) are
exercised byte for byte. No mocks: ``RawClient`` writes JSON lines to a node
listening on loopback.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest

from shardq_node.runtime import Node
from shardq_node.settings import NodeSettings, StorageSettings

from ..cluster import blocked_pulls
from ..helpers import RawClient, eventually

MakeNode = Callable[..., Awaitable[Node]]
Connect = Callable[[Node], Awaitable[RawClient]]
OK = {"ok": True}

#: The JOB object of DESIGN §2, in MagicQueue's field order, with each field's JSON type.
JOB_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (int,), "queue": (str,), "data": (object,), "priority": (int,),
    "created_at": (int,), "run_at": (int,), "started_at": (int,), "attempts": (int,),
    "max_attempts": (int,), "backoff": (int,), "ttl": (int,), "timeout": (int,),
    "unique_key": (str, type(None)), "depends_on": (list,), "progress": (int,),
    "progress_msg": (str, type(None)),
}

#: The commands of PROTOCOL.md (and shardq's additions) with a request that is valid as is.
VALID_REQUESTS: dict[str, dict[str, Any]] = {
    "PUSH": {"queue": "q", "data": 1},
    "PUSHB": {"queue": "q", "jobs": [{"data": 1}]},
    "PULL": {"queue": "q", "timeout": 0},
    "PULLB": {"queue": "q", "count": 1, "timeout": 0},
    "ACK": {"id": 1},
    "ACKB": {"ids": [1]},
    "FAIL": {"id": 1},
    "GETRESULT": {"id": 1},
    "CANCEL": {"id": 1},
    "PROGRESS": {"id": 1, "progress": 1},
    "GETPROGRESS": {"id": 1},
    "DLQ": {"queue": "q"},
    "RETRYDLQ": {"queue": "q"},
    "SUBSCRIBE": {"queue": "q", "events": ["completed"]},
    "UNSUBSCRIBE": {"queue": "q"},
    "METRICS": {},
    "STATS": {},
    "CRON": {"name": "c", "queue": "q", "data": 1, "schedule": "*/60"},
    "CRONDELETE": {"name": "c"},
    "CRONLIST": {},
    "RATELIMIT": {"queue": "q", "limit": 5},
    "RATELIMITCLEAR": {"queue": "q"},
    "PAUSE": {"queue": "q"},
    "RESUME": {"queue": "q"},
    "SETCONCURRENCY": {"queue": "q", "limit": 5},
    "CLEARCONCURRENCY": {"queue": "q"},
    "LISTQUEUES": {},
    "GETJOB": {"id": 1},
    "TOUCH": {"id": 1},
    "TOPOLOGY": {},
}


# -- helpers ------------------------------------------------------------------------------------


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Open more raw connections to a node; all are closed after the test."""
    opened: list[RawClient] = []

    async def open_(node: Node) -> RawClient:
        client = await RawClient.connect(node.tcp_port)
        opened.append(client)
        return client

    yield open_
    for client in opened:
        await client.close()


async def read_line(client: RawClient, timeout: float = 5.0) -> bytes:
    line = await asyncio.wait_for(client.reader.readline(), timeout)
    assert line, "the server closed the connection"
    return line


async def nothing_arrives(client: RawClient, within: float = 0.2) -> bool:
    try:
        await asyncio.wait_for(client.reader.readline(), within)
    except TimeoutError:
        return True
    return False


async def push(client: RawClient, queue: str = "q", data: Any = None, **opts: Any) -> int:
    answer = await client.call({"cmd": "PUSH", "queue": queue, "data": data, **opts})
    assert answer["ok"] is True, answer
    job_id: int = answer["id"]
    return job_id


async def pull(client: RawClient, queue: str = "q", timeout: int = 2000) -> dict[str, Any]:
    answer = await client.call({"cmd": "PULL", "queue": queue, "timeout": timeout})
    assert answer["ok"] is True and answer["job"] is not None, answer
    job: dict[str, Any] = answer["job"]
    return job


async def refused(client: RawClient, request: dict[str, Any] | bytes) -> str:
    """Send one request; assert the answer is exactly an error envelope; return its text."""
    answer = await client.call(request)
    assert list(answer) == ["ok", "error"], answer
    assert answer["ok"] is False
    assert type(answer["error"]) is str
    text: str = answer["error"]
    return text


def assert_job_shape(job: dict[str, Any]) -> None:
    assert list(job)[: len(JOB_FIELDS)] == list(JOB_FIELDS), "JOB fields missing or reordered"
    for name, types in JOB_FIELDS.items():
        value = job[name]
        if name != "data":  # any JSON value
            assert type(value) is not bool, f"{name} is a boolean"
            assert isinstance(value, types), f"{name}={value!r} is not {types}"
    assert all(type(parent) is int for parent in job["depends_on"])


def assert_ints(obj: dict[str, Any], *names: str) -> None:
    for name in names:
        assert type(obj[name]) is int, f"{name}={obj[name]!r} is not an integer"


async def stats(client: RawClient) -> dict[str, Any]:
    answer: dict[str, Any] = await client.call({"cmd": "STATS"})
    return answer


# -- success shapes: jobs in -------------------------------------------------------------------


async def test_push_answers_ok_and_an_integer_id(raw: RawClient) -> None:
    await raw.send({"cmd": "PUSH", "queue": "q", "data": {"to": "a@b.c"}})
    line = await read_line(raw)
    assert re.fullmatch(rb'\{"ok":true,"id":\d+\}\n', line), line


async def test_push_with_every_option_is_accepted_and_shows_in_the_job(raw: RawClient) -> None:
    parent = await push(raw, "opts-parent")
    await raw.call({"cmd": "ACK", "id": (await pull(raw, "opts-parent"))["id"]})
    options = {
        "priority": 7, "delay": 0, "ttl": 60_000, "timeout": 30_000, "max_attempts": 3,
        "backoff": 250, "unique_key": "k-1", "depends_on": [parent],
    }
    job_id = await push(raw, "opts", {"n": 1}, **options)
    job = await pull(raw, "opts")
    assert_job_shape(job)
    assert job["id"] == job_id
    assert job["data"] == {"n": 1}
    for name, value in options.items():
        if name != "delay":
            assert job[name] == value, name
    assert job["run_at"] == job["created_at"]


async def test_optional_fields_may_be_null(raw: RawClient) -> None:
    nulls = dict.fromkeys(
        ("delay", "ttl", "timeout", "max_attempts", "backoff", "unique_key", "depends_on"), None
    )
    answer = await raw.call({"cmd": "PUSH", "queue": "q", "data": None, **nulls})
    assert answer["ok"] is True
    job = await pull(raw)
    assert job["data"] is None
    assert job["max_attempts"] == 0 and job["unique_key"] is None and job["depends_on"] == []


async def test_pushb_answers_one_id_per_job_in_order(raw: RawClient) -> None:
    jobs = [{"data": i, "priority": i % 2} for i in range(5)]
    answer = await raw.call({"cmd": "PUSHB", "queue": "q", "jobs": jobs})
    assert list(answer) == ["ok", "ids"] and answer["ok"] is True
    ids = answer["ids"]
    assert len(ids) == 5 and all(type(i) is int for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == 5
    pulled = await raw.call({"cmd": "PULLB", "queue": "q", "count": 10, "timeout": 0})
    assert {j["id"]: j["data"] for j in pulled["jobs"]} == dict(zip(ids, range(5), strict=True))


# -- success shapes: jobs out ------------------------------------------------------------------


async def test_pull_answers_the_job_in_the_design_shape(raw: RawClient) -> None:
    job_id = await push(raw, "q", {"x": [1, 2]}, priority=3)
    answer = await raw.call({"cmd": "PULL", "queue": "q"})
    assert list(answer) == ["ok", "job"] and answer["ok"] is True
    job = answer["job"]
    assert_job_shape(job)
    assert job["id"] == job_id and job["queue"] == "q" and job["priority"] == 3
    assert job["data"] == {"x": [1, 2]}
    assert job["started_at"] >= job["created_at"] > 0
    assert job["attempts"] == 0


async def test_pull_with_timeout_answers_job_null_when_nothing_comes(raw: RawClient) -> None:
    await raw.send({"cmd": "PULL", "queue": "empty", "timeout": 50})
    assert await read_line(raw) == b'{"ok":true,"job":null}\n'


async def test_pullb_answers_at_most_count_jobs(raw: RawClient) -> None:
    ids = [await push(raw, "q", i) for i in range(3)]
    answer = await raw.call({"cmd": "PULLB", "queue": "q", "count": 2})
    assert list(answer) == ["ok", "jobs"] and answer["ok"] is True
    assert [j["id"] for j in answer["jobs"]] == ids[:2]
    for job in answer["jobs"]:
        assert_job_shape(job)
    rest = await raw.call({"cmd": "PULLB", "queue": "q", "count": 5, "timeout": 0})
    assert [j["id"] for j in rest["jobs"]] == ids[2:]


async def test_pullb_with_timeout_answers_an_empty_list(raw: RawClient) -> None:
    await raw.send({"cmd": "PULLB", "queue": "empty", "count": 3, "timeout": 50})
    assert await read_line(raw) == b'{"ok":true,"jobs":[]}\n'


async def test_ack_answers_exactly_ok_true(raw: RawClient) -> None:
    await push(raw)
    job = await pull(raw)
    await raw.send({"cmd": "ACK", "id": job["id"]})
    assert await read_line(raw) == b'{"ok":true}\n'


async def test_ackb_answers_the_number_acked_inside_ids(raw: RawClient) -> None:
    for i in range(3):
        await push(raw, "q", i)
    jobs = (await raw.call({"cmd": "PULLB", "queue": "q", "count": 2}))["jobs"]
    ids = [j["id"] for j in jobs] + [999_999_999]
    await raw.send({"cmd": "ACKB", "ids": ids})
    assert await read_line(raw) == b'{"ok":true,"ids":[2]}\n'


async def test_fail_answers_ok_and_the_job_comes_back_with_one_attempt(raw: RawClient) -> None:
    job_id = await push(raw)
    await pull(raw)
    await raw.send({"cmd": "FAIL", "id": job_id, "error": "boom"})
    assert await read_line(raw) == b'{"ok":true}\n'
    again = await pull(raw)
    assert again["id"] == job_id and again["attempts"] == 1


async def test_getresult_answers_id_and_the_acked_result(raw: RawClient) -> None:
    job_id = await push(raw)
    await pull(raw)
    await raw.call({"cmd": "ACK", "id": job_id, "result": {"sent": True, "n": 2.5}})
    answer = await raw.call({"cmd": "GETRESULT", "id": job_id})
    assert answer == {"ok": True, "id": job_id, "result": {"sent": True, "n": 2.5}}
    assert list(answer) == ["ok", "id", "result"]


async def test_getresult_of_an_unknown_id_is_null_not_an_error(raw: RawClient) -> None:
    await raw.send({"cmd": "GETRESULT", "id": 123456789})
    assert await read_line(raw) == b'{"ok":true,"id":123456789,"result":null}\n'


async def test_cancel_answers_ok_and_the_job_is_gone(raw: RawClient) -> None:
    job_id = await push(raw)
    await raw.send({"cmd": "CANCEL", "id": job_id})
    assert await read_line(raw) == b'{"ok":true}\n'
    assert (await raw.call({"cmd": "PULL", "queue": "q", "timeout": 0}))["job"] is None


async def test_progress_answers_ok_and_getprogress_shows_it(raw: RawClient) -> None:
    job_id = await push(raw)
    await pull(raw)
    await raw.send({"cmd": "PROGRESS", "id": job_id, "progress": 40, "message": "half"})
    assert await read_line(raw) == b'{"ok":true}\n'
    answer = await raw.call({"cmd": "GETPROGRESS", "id": job_id})
    assert answer == {"ok": True, "progress": {"id": job_id, "progress": 40, "message": "half"}}
    assert list(answer["progress"]) == ["id", "progress", "message"]


async def test_getprogress_of_a_job_without_progress_is_zero_and_null(raw: RawClient) -> None:
    job_id = await push(raw)
    answer = await raw.call({"cmd": "GETPROGRESS", "id": job_id})
    assert answer == {"ok": True, "progress": {"id": job_id, "progress": 0, "message": None}}


@pytest.mark.parametrize("value", [101, 200, 255])
async def test_progress_from_101_to_255_is_clamped_to_100(raw: RawClient, value: int) -> None:
    job_id = await push(raw)
    await pull(raw)
    assert await raw.call({"cmd": "PROGRESS", "id": job_id, "progress": value}) == {"ok": True}
    answer = await raw.call({"cmd": "GETPROGRESS", "id": job_id})
    assert answer["progress"]["progress"] == 100


async def test_touch_answers_ok_and_the_new_deadline(raw: RawClient) -> None:
    job_id = await push(raw)
    job = await pull(raw)
    answer = await raw.call({"cmd": "TOUCH", "id": job_id, "lease": job["started_at"]})
    assert list(answer) == ["ok", "deadline"] and answer["ok"] is True
    assert type(answer["deadline"]) is int and answer["deadline"] > job["started_at"]


# -- DLQ --------------------------------------------------------------------------------------


async def kill(client: RawClient, queue: str, data: Any) -> int:
    """Push a job with max_attempts 1 and fail it: it lands in the DLQ."""
    job_id = await push(client, queue, data, max_attempts=1)
    assert (await pull(client, queue))["id"] == job_id
    assert await client.call({"cmd": "FAIL", "id": job_id, "error": f"bad {data}"}) == {"ok": True}
    return job_id


async def test_dlq_lists_dead_jobs_oldest_first_without_removing_them(raw: RawClient) -> None:
    ids = [await kill(raw, "d", i) for i in range(3)]
    first = await raw.call({"cmd": "DLQ", "queue": "d"})
    assert list(first) == ["ok", "jobs"] and first["ok"] is True
    assert [j["id"] for j in first["jobs"]] == ids
    for job in first["jobs"]:
        assert_job_shape(job)
        assert job["attempts"] == 1
    again = await raw.call({"cmd": "DLQ", "queue": "d", "count": 2})
    assert [j["id"] for j in again["jobs"]] == ids[:2]
    assert (await stats(raw))["dlq"] == 3


async def test_dlq_answers_at_most_100_jobs_by_default(raw: RawClient) -> None:
    jobs = [{"data": i, "max_attempts": 1} for i in range(101)]
    ids = (await raw.call({"cmd": "PUSHB", "queue": "d", "jobs": jobs}))["ids"]
    pulled = await raw.call({"cmd": "PULLB", "queue": "d", "count": 101})
    assert len(pulled["jobs"]) == 101
    await raw.send(*({"cmd": "FAIL", "id": job_id} for job_id in ids))
    assert [await raw.recv() for _ in ids] == [{"ok": True}] * 101
    listed = await raw.call({"cmd": "DLQ", "queue": "d"})
    assert [j["id"] for j in listed["jobs"]] == ids[:100]
    assert len((await raw.call({"cmd": "DLQ", "queue": "d", "count": 200}))["jobs"]) == 101


async def test_dlq_of_an_unknown_queue_is_empty(raw: RawClient) -> None:
    assert await raw.call({"cmd": "DLQ", "queue": "nobody"}) == {"ok": True, "jobs": []}


async def test_retrydlq_without_id_retries_every_dead_job_with_attempts_reset(
    raw: RawClient,
) -> None:
    ids = [await kill(raw, "d", i) for i in range(2)]
    await raw.send({"cmd": "RETRYDLQ", "queue": "d"})
    assert await read_line(raw) == b'{"ok":true,"ids":[2]}\n'
    assert (await raw.call({"cmd": "DLQ", "queue": "d"}))["jobs"] == []
    pulled = await raw.call({"cmd": "PULLB", "queue": "d", "count": 5, "timeout": 0})
    assert sorted(j["id"] for j in pulled["jobs"]) == ids
    assert all(j["attempts"] == 0 for j in pulled["jobs"])


async def test_retrydlq_with_id_retries_only_that_job(raw: RawClient) -> None:
    first, second = [await kill(raw, "d", i) for i in range(2)]
    await raw.send({"cmd": "RETRYDLQ", "queue": "d", "id": second})
    assert await read_line(raw) == b'{"ok":true,"ids":[1]}\n'
    assert [j["id"] for j in (await raw.call({"cmd": "DLQ", "queue": "d"}))["jobs"]] == [first]
    job = await pull(raw, "d")
    assert job["id"] == second and job["attempts"] == 0
    unknown = await raw.call({"cmd": "RETRYDLQ", "queue": "d", "id": 999_999})
    assert unknown == {"ok": True, "ids": [0]}


# -- events -------------------------------------------------------------------------------------


async def test_subscribe_delivers_event_lines_with_event_queue_and_job(
    node: Node, raw: RawClient, connect: Connect
) -> None:
    watcher = await connect(node)
    await watcher.send({"cmd": "SUBSCRIBE", "queue": "ev", "events": ["completed", "dead"]})
    assert await read_line(watcher) == b'{"ok":true}\n'
    done = await push(raw, "ev", {"n": 1})
    await pull(raw, "ev")
    await raw.call({"cmd": "ACK", "id": done, "result": 1})
    event = await watcher.recv()
    assert list(event) == ["event", "queue", "job"]
    assert event["event"] == "completed" and event["queue"] == "ev"
    assert_job_shape(event["job"])
    assert event["job"]["id"] == done
    dead = await kill(raw, "ev", 2)  # emits "failed" too, which this watcher did not ask for
    event = await watcher.recv()
    assert (event["event"], event["queue"], event["job"]["id"]) == ("dead", "ev", dead)


async def test_subscribe_without_events_delivers_every_kind(
    node: Node, raw: RawClient, connect: Connect
) -> None:
    watcher = await connect(node)
    assert await watcher.call({"cmd": "SUBSCRIBE", "queue": "ev"}) == {"ok": True}
    job_id = await push(raw, "ev", max_attempts=1)
    await pull(raw, "ev")
    await raw.call({"cmd": "PROGRESS", "id": job_id, "progress": 5})
    await raw.call({"cmd": "FAIL", "id": job_id})
    kinds = [(await watcher.recv())["event"] for _ in range(3)]
    assert kinds == ["progress", "failed", "dead"]


async def test_subscribe_delivers_timeout_retrying_and_expired_events(
    node: Node, raw: RawClient, connect: Connect
) -> None:
    watcher = await connect(node)
    events = ["timeout", "retrying", "expired"]
    assert await watcher.call({"cmd": "SUBSCRIBE", "queue": "ev", "events": events}) == OK
    slow = await push(raw, "ev", timeout=50)
    assert (await pull(raw, "ev"))["id"] == slow  # never acked: times out after 50 ms
    stale = await push(raw, "ev", ttl=50)  # never pulled: expires after 50 ms
    seen = {((e := await watcher.recv())["event"], e["job"]["id"]) for _ in range(3)}
    assert seen == {("timeout", slow), ("retrying", slow), ("expired", stale)}


async def test_unsubscribe_answers_ok_and_stops_event_lines(
    node: Node, raw: RawClient, connect: Connect
) -> None:
    watcher = await connect(node)
    await watcher.call({"cmd": "SUBSCRIBE", "queue": "ev", "events": ["completed"]})
    await watcher.send({"cmd": "UNSUBSCRIBE", "queue": "ev"})
    assert await read_line(watcher) == b'{"ok":true}\n'
    job_id = await push(raw, "ev")
    await pull(raw, "ev")
    await raw.call({"cmd": "ACK", "id": job_id})
    assert await watcher.call({"cmd": "STATS"}) == await stats(raw)  # next line is no event


async def test_subscribe_to_an_unknown_event_is_invalid(raw: RawClient) -> None:
    text = await refused(raw, {"cmd": "SUBSCRIBE", "queue": "q", "events": ["exploded"]})
    assert text.startswith("Invalid: ") and "exploded" in text


# -- introspection --------------------------------------------------------------------------


async def test_metrics_shape_with_floats_written_with_a_decimal_point(raw: RawClient) -> None:
    await raw.send({"cmd": "METRICS"})
    empty = await read_line(raw)
    assert b'"jobs_per_second":0.0' in empty and b'"avg_latency_ms":0.0' in empty
    job_id = await push(raw, "m")
    await push(raw, "m")
    await pull(raw, "m")
    await raw.call({"cmd": "ACK", "id": job_id})
    await raw.send({"cmd": "METRICS"})
    line = await read_line(raw)
    for name in (b"jobs_per_second", b"avg_latency_ms"):
        assert re.search(rb'"' + name + rb'":\d+\.\d+(e[+-]?\d+)?[,}]', line), line
    answer = orjson.loads(line)
    assert list(answer) == ["ok", "metrics"] and answer["ok"] is True
    metrics = answer["metrics"]
    assert list(metrics) == [
        "total_pushed", "total_completed", "total_failed", "jobs_per_second", "avg_latency_ms",
        "queues",
    ]
    assert_ints(metrics, "total_pushed", "total_completed", "total_failed")
    assert (metrics["total_pushed"], metrics["total_completed"]) == (2, 1)
    assert type(metrics["jobs_per_second"]) is float and type(metrics["avg_latency_ms"]) is float
    (queue,) = metrics["queues"]
    assert list(queue) == ["name", "pending", "processing", "dlq", "rate_limit"]
    assert queue == {"name": "m", "pending": 1, "processing": 0, "dlq": 0, "rate_limit": None}


async def test_stats_shape_counts_queued_processing_delayed_and_dlq(raw: RawClient) -> None:
    await push(raw, "s")
    await push(raw, "s")
    await push(raw, "s", delay=60_000)
    await pull(raw, "s")
    await kill(raw, "s2", 0)
    answer = await stats(raw)
    assert answer["ok"] is True
    assert list(answer)[:5] == ["ok", "queued", "processing", "delayed", "dlq"]
    assert_ints(answer, "queued", "processing", "delayed", "dlq")
    assert (answer["queued"], answer["processing"], answer["delayed"], answer["dlq"]) == (
        1, 1, 1, 1,
    )


async def test_listqueues_shape(raw: RawClient) -> None:
    await push(raw, "lq-b")
    await push(raw, "lq-a")
    await pull(raw, "lq-a")
    await raw.call({"cmd": "PAUSE", "queue": "lq-b"})
    answer = await raw.call({"cmd": "LISTQUEUES"})
    assert list(answer) == ["ok", "queues"] and answer["ok"] is True
    by_name = {q["name"]: q for q in answer["queues"]}
    keys = ["name", "pending", "processing", "dlq", "paused", "rate_limit", "concurrency_limit"]
    for q in answer["queues"]:
        assert list(q)[: len(keys)] == keys
        assert_ints(q, "pending", "processing", "dlq")
        assert type(q["paused"]) is bool
    assert by_name["lq-a"]["processing"] == 1 and by_name["lq-a"]["paused"] is False
    assert by_name["lq-b"]["pending"] == 1 and by_name["lq-b"]["paused"] is True
    assert by_name["lq-b"]["rate_limit"] is None and by_name["lq-b"]["concurrency_limit"] is None


# -- queue control --------------------------------------------------------------------------


async def queue_row(client: RawClient, name: str) -> dict[str, Any]:
    for q in (await client.call({"cmd": "LISTQUEUES"}))["queues"]:
        if q["name"] == name:
            row: dict[str, Any] = q
            return row
    raise AssertionError(f"queue {name} not listed")


async def test_ratelimit_and_ratelimitclear_answer_ok(raw: RawClient) -> None:
    await raw.send({"cmd": "RATELIMIT", "queue": "rl", "limit": 10})
    assert await read_line(raw) == b'{"ok":true}\n'
    assert (await queue_row(raw, "rl"))["rate_limit"] == 10
    metrics = (await raw.call({"cmd": "METRICS"}))["metrics"]
    assert {q["name"]: q["rate_limit"] for q in metrics["queues"]}["rl"] == 10
    await raw.send({"cmd": "RATELIMITCLEAR", "queue": "rl"})
    assert await read_line(raw) == b'{"ok":true}\n'
    assert (await queue_row(raw, "rl"))["rate_limit"] is None


async def test_setconcurrency_and_clearconcurrency_answer_ok(raw: RawClient) -> None:
    await raw.send({"cmd": "SETCONCURRENCY", "queue": "cc", "limit": 1})
    assert await read_line(raw) == b'{"ok":true}\n'
    assert (await queue_row(raw, "cc"))["concurrency_limit"] == 1
    await push(raw, "cc")
    await push(raw, "cc")
    first = await raw.call({"cmd": "PULLB", "queue": "cc", "count": 2, "timeout": 0})
    assert len(first["jobs"]) == 1
    await raw.send({"cmd": "CLEARCONCURRENCY", "queue": "cc"})
    assert await read_line(raw) == b'{"ok":true}\n'
    assert (await queue_row(raw, "cc"))["concurrency_limit"] is None
    assert (await pull(raw, "cc"))["id"] != first["jobs"][0]["id"]


@pytest.mark.parametrize("cmd", ["RATELIMIT", "SETCONCURRENCY"])
@pytest.mark.parametrize("limit", [None, 0, -1, "5", 1.5])
async def test_limits_must_be_positive_integers(raw: RawClient, cmd: str, limit: Any) -> None:
    req: dict[str, Any] = {"cmd": cmd, "queue": "q"}
    if limit is not None:
        req["limit"] = limit
    assert (await refused(raw, req)).startswith("Invalid: ")


async def test_pause_makes_pull_wait_until_resume(
    node: Node, raw: RawClient, connect: Connect
) -> None:
    await raw.send({"cmd": "PAUSE", "queue": "p"})
    assert await read_line(raw) == b'{"ok":true}\n'
    job_id = await push(raw, "p")  # pushes are accepted while paused
    assert (await raw.call({"cmd": "PULL", "queue": "p", "timeout": 50}))["job"] is None
    worker = await connect(node)
    await worker.send({"cmd": "PULL", "queue": "p"})
    assert await nothing_arrives(worker)
    await raw.send({"cmd": "RESUME", "queue": "p"})
    assert await read_line(raw) == b'{"ok":true}\n'
    answer = await worker.recv()
    assert answer["job"]["id"] == job_id


# -- cron -------------------------------------------------------------------------------------


async def test_cron_cronlist_and_crondelete_shapes(raw: RawClient) -> None:
    await raw.send({
        "cmd": "CRON", "name": "nightly", "queue": "c", "data": {"k": 1}, "schedule": "*/3600",
        "priority": 4,
    })
    assert await read_line(raw) == b'{"ok":true}\n'
    answer = await raw.call({"cmd": "CRONLIST"})
    assert list(answer) == ["ok", "crons"] and answer["ok"] is True
    (cron,) = answer["crons"]
    assert list(cron) == ["name", "queue", "data", "schedule", "priority", "next_run"]
    assert {k: v for k, v in cron.items() if k != "next_run"} == {
        "name": "nightly", "queue": "c", "data": {"k": 1}, "schedule": "*/3600", "priority": 4,
    }
    assert type(cron["next_run"]) is int and cron["next_run"] > 0
    await raw.send({"cmd": "CRONDELETE", "name": "nightly"})
    assert await read_line(raw) == b'{"ok":true}\n'
    assert await raw.call({"cmd": "CRONLIST"}) == {"ok": True, "crons": []}


async def test_cron_with_the_same_name_replaces_the_old_one(raw: RawClient) -> None:
    base = {"cmd": "CRON", "name": "r", "queue": "c", "data": 1}
    assert await raw.call({**base, "schedule": "*/60"}) == {"ok": True}
    assert await raw.call({**base, "schedule": "0 * * * *", "data": 2}) == {"ok": True}
    crons = (await raw.call({"cmd": "CRONLIST"}))["crons"]
    assert [(c["name"], c["schedule"], c["data"], c["priority"]) for c in crons] == [
        ("r", "0 * * * *", 2, 0)
    ]


@pytest.mark.parametrize("schedule", ["*/0", "every minute", "* * *", "61 * * * *"])
async def test_cron_with_a_bad_schedule_is_invalid(raw: RawClient, schedule: str) -> None:
    req = {"cmd": "CRON", "name": "x", "queue": "c", "data": 1, "schedule": schedule}
    assert (await refused(raw, req)).startswith("Invalid: ")


@pytest.mark.parametrize("schedule", ["*/²", "*/¹⁰", "0 0 31 2 *", "0 0 30 2 *"])
async def test_cron_schedule_that_cannot_run_is_invalid_and_keeps_the_connection(
    raw: RawClient, schedule: str
) -> None:
    req = {"cmd": "CRON", "name": "x", "queue": "c", "data": 1, "schedule": schedule}
    assert (await refused(raw, req)).startswith("Invalid: ")
    assert (await stats(raw))["ok"] is True


# -- auth ---------------------------------------------------------------------------------------


async def test_auth_with_any_token_succeeds_when_no_tokens_are_configured(
    raw: RawClient,
) -> None:
    await raw.send({"cmd": "AUTH", "token": "anything"})
    assert await read_line(raw) == b'{"ok":true}\n'


@pytest.fixture
async def guarded(make_node: MakeNode) -> Node:
    return await make_node(NodeSettings(port=0, http_port=0, tokens=("secret",)))


@pytest.mark.parametrize("cmd", sorted(VALID_REQUESTS))
async def test_every_command_but_auth_needs_authentication_first(
    guarded: Node, connect: Connect, cmd: str
) -> None:
    client = await connect(guarded)
    request = {"cmd": cmd, **VALID_REQUESTS[cmd]}
    assert await refused(client, request) == "Authentication required"
    assert await client.call({"cmd": "AUTH", "token": "secret"}) == {"ok": True}
    answer = await client.call(request)
    assert answer.get("error") != "Authentication required"


async def test_a_line_that_does_not_parse_is_invalid_before_authentication(
    guarded: Node, connect: Connect
) -> None:
    client = await connect(guarded)
    assert (await refused(client, b"{nope\n")).startswith("Invalid: ")
    assert (await refused(client, b"[1,2]\n")).startswith("Invalid: ")
    assert (await refused(client, {"queue": "q"})).startswith("Invalid: ")
    assert await refused(client, {"cmd": "STATS"}) == "Authentication required"


async def test_wrong_token_is_invalid_token_and_leaves_the_connection_unauthenticated(
    guarded: Node, connect: Connect
) -> None:
    client = await connect(guarded)
    assert await refused(client, {"cmd": "AUTH", "token": "guess"}) == "Invalid token"
    assert await refused(client, {"cmd": "STATS"}) == "Authentication required"
    assert await client.call({"cmd": "AUTH", "token": "secret"}) == {"ok": True}
    assert (await stats(client))["ok"] is True


async def test_authentication_is_per_connection(guarded: Node, connect: Connect) -> None:
    first = await connect(guarded)
    second = await connect(guarded)
    assert await first.call({"cmd": "AUTH", "token": "secret"}) == {"ok": True}
    assert (await stats(first))["ok"] is True
    assert await refused(second, {"cmd": "STATS"}) == "Authentication required"


# -- Invalid: ... -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "what"),
    [
        ({"cmd": "PUSH", "data": 1}, "queue"),
        ({"cmd": "PUSH", "queue": "q"}, "data"),
        ({"cmd": "PUSHB", "queue": "q"}, "jobs"),
        ({"cmd": "PUSHB", "queue": "q", "jobs": [{"priority": 1}]}, "data"),
        ({"cmd": "ACK"}, "id"),
        ({"cmd": "ACKB"}, "ids"),
        ({"cmd": "PROGRESS", "id": 1}, "progress"),
        ({"cmd": "CRON", "name": "n", "queue": "q", "data": 1}, "schedule"),
        ({"cmd": "AUTH"}, "token"),
        ({"queue": "q"}, "cmd"),
    ],
)
async def test_a_missing_field_is_invalid_and_named(
    raw: RawClient, request_: dict[str, Any], what: str
) -> None:
    text = await refused(raw, request_)
    assert text.startswith("Invalid: ") and what in text


async def test_pullb_without_count_is_invalid(raw: RawClient) -> None:
    text = await refused(raw, {"cmd": "PULLB", "queue": "q", "timeout": 0})
    assert text.startswith("Invalid: ") and "count" in text


@pytest.mark.parametrize("cmd", ["NOPE", "push", "Stats", ""])
async def test_an_unknown_command_is_invalid(raw: RawClient, cmd: str) -> None:
    text = await refused(raw, {"cmd": cmd})
    assert text.startswith("Invalid: ")


@pytest.mark.parametrize(
    "request_",
    [
        {"cmd": 5},
        {"cmd": "PUSH", "queue": 5, "data": 1},
        {"cmd": "PUSH", "queue": "q", "data": 1, "delay": "10"},
        {"cmd": "PUSH", "queue": "q", "data": 1, "ttl": 1.5},
        {"cmd": "PUSH", "queue": "q", "data": 1, "max_attempts": True},
        {"cmd": "PUSH", "queue": "q", "data": 1, "unique_key": 7},
        {"cmd": "PUSH", "queue": "q", "data": 1, "depends_on": 3},
        {"cmd": "PUSH", "queue": "q", "data": 1, "priority": "high"},
        {"cmd": "PUSHB", "queue": "q", "jobs": {"data": 1}},
        {"cmd": "PUSHB", "queue": "q", "jobs": [1]},
        {"cmd": "PULL", "queue": "q", "timeout": "soon"},
        {"cmd": "PULLB", "queue": "q", "count": "3"},
        {"cmd": "PULLB", "queue": "q", "count": 0},
        {"cmd": "ACKB", "ids": "1,2"},
        {"cmd": "FAIL", "id": 1, "error": 5},
        {"cmd": "PROGRESS", "id": 1, "progress": 1, "message": 5},
        {"cmd": "DLQ", "queue": "q", "count": "all"},
        {"cmd": "SUBSCRIBE", "queue": "q", "events": "completed"},
        {"cmd": "STATS", "reqId": [1]},
    ],
)
async def test_a_field_of_the_wrong_type_is_invalid(
    raw: RawClient, request_: dict[str, Any]
) -> None:
    assert (await refused(raw, request_)).startswith("Invalid: ")


@pytest.mark.parametrize("line", [b"\n", b"   \n", b"\r\n"])
async def test_an_empty_line_is_invalid(raw: RawClient, line: bytes) -> None:
    assert (await refused(raw, line)).startswith("Invalid: ")


@pytest.mark.parametrize("line", [b"{\n", b"PUSH q 1\n", b'{"cmd":"STATS",}\n', b"\xff\xfe\n"])
async def test_a_line_that_is_not_json_is_invalid(raw: RawClient, line: bytes) -> None:
    assert (await refused(raw, line)).startswith("Invalid: ")


@pytest.mark.parametrize("line", [b"[]\n", b'["STATS"]\n', b"5\n", b'"STATS"\n', b"null\n"])
async def test_json_that_is_not_an_object_is_invalid(raw: RawClient, line: bytes) -> None:
    assert (await refused(raw, line)).startswith("Invalid: ")


@pytest.mark.parametrize("cmd", ["ACK", "FAIL", "CANCEL", "GETRESULT", "GETPROGRESS", "PROGRESS"])
@pytest.mark.parametrize("bad_id", ["5", -1, 1.5, True, None, [5]])
async def test_an_id_that_is_not_a_non_negative_integer_is_invalid(
    raw: RawClient, cmd: str, bad_id: Any
) -> None:
    req: dict[str, Any] = {"cmd": cmd, "id": bad_id, "progress": 1}
    text = await refused(raw, req)
    assert text.startswith("Invalid: ") and "'id'" in text


@pytest.mark.parametrize("bad_id", ["5", -1, 1.5])
async def test_a_bad_id_inside_ids_or_depends_on_is_invalid(raw: RawClient, bad_id: Any) -> None:
    assert (await refused(raw, {"cmd": "ACKB", "ids": [1, bad_id]})).startswith("Invalid: ")
    req = {"cmd": "PUSH", "queue": "q", "data": 1, "depends_on": [bad_id]}
    assert (await refused(raw, req)).startswith("Invalid: ")


async def test_priority_null_is_invalid(raw: RawClient) -> None:
    text = await refused(raw, {"cmd": "PUSH", "queue": "q", "data": 1, "priority": None})
    assert text.startswith("Invalid: ") and "priority" in text
    batch = {"cmd": "PUSHB", "queue": "q", "jobs": [{"data": 1, "priority": None}]}
    assert (await refused(raw, batch)).startswith("Invalid: ")


@pytest.mark.parametrize("value", [256, 1000, -1, 50.5, "50", None])
async def test_progress_outside_0_to_255_or_not_an_integer_is_invalid(
    raw: RawClient, value: Any
) -> None:
    job_id = await push(raw)
    await pull(raw)
    text = await refused(raw, {"cmd": "PROGRESS", "id": job_id, "progress": value})
    assert text.startswith("Invalid: ") and "progress" in text
    assert (await raw.call({"cmd": "GETPROGRESS", "id": job_id}))["progress"]["progress"] == 0


async def test_an_invalid_pushb_pushes_nothing(raw: RawClient) -> None:
    jobs = [{"data": 1}, {"data": 2, "delay": -5}]
    assert (await refused(raw, {"cmd": "PUSHB", "queue": "q", "jobs": jobs})).startswith(
        "Invalid: "
    )
    assert (await stats(raw))["queued"] == 0


async def test_unknown_extra_fields_are_ignored_and_a_trailing_cr_is_tolerated(
    raw: RawClient,
) -> None:
    answer = await raw.call({"cmd": "PUSH", "queue": "q", "data": 1, "colour": "blue"})
    assert answer["ok"] is True
    await raw.send(b'{"cmd":"STATS","x":[1]}\r\n')
    assert (await raw.recv())["queued"] == 1


# -- Job N not found ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_",
    [
        {"cmd": "ACK", "id": 77777},
        {"cmd": "FAIL", "id": 77777},
        {"cmd": "CANCEL", "id": 77777},
        {"cmd": "GETPROGRESS", "id": 77777},
    ],
)
async def test_a_command_on_an_unknown_id_is_job_not_found(
    raw: RawClient, request_: dict[str, Any]
) -> None:
    assert await refused(raw, request_) == "Job 77777 not found"


async def test_second_ack_of_same_id_is_job_not_found(raw: RawClient) -> None:
    job_id = await push(raw)
    await pull(raw)
    assert await raw.call({"cmd": "ACK", "id": job_id}) == {"ok": True}
    assert await refused(raw, {"cmd": "ACK", "id": job_id}) == f"Job {job_id} not found"


@pytest.mark.parametrize("cmd", ["ACK", "FAIL"])
async def test_ack_or_fail_of_a_job_that_was_not_pulled_is_job_not_found(
    raw: RawClient, cmd: str
) -> None:
    job_id = await push(raw)
    assert await refused(raw, {"cmd": cmd, "id": job_id}) == f"Job {job_id} not found"
    assert (await pull(raw))["id"] == job_id  # still waiting, untouched


async def test_cancel_of_a_finished_job_is_job_not_found(raw: RawClient) -> None:
    job_id = await push(raw)
    assert await raw.call({"cmd": "CANCEL", "id": job_id}) == {"ok": True}
    assert await refused(raw, {"cmd": "CANCEL", "id": job_id}) == f"Job {job_id} not found"


async def test_progress_of_a_waiting_job_is_job_not_found_in_processing(raw: RawClient) -> None:
    job_id = await push(raw)
    text = await refused(raw, {"cmd": "PROGRESS", "id": job_id, "progress": 10})
    assert text == f"Job {job_id} not found in processing"


async def test_progress_of_an_unknown_job_is_job_not_found_in_processing(raw: RawClient) -> None:
    text = await refused(raw, {"cmd": "PROGRESS", "id": 4242, "progress": 10})
    assert text == "Job 4242 not found in processing"


# -- Duplicate job with key ---------------------------------------------------------------------


async def test_push_with_a_unique_key_held_by_a_waiting_job_is_duplicate(raw: RawClient) -> None:
    await push(raw, "u", 1, unique_key="order-1")
    text = await refused(raw, {"cmd": "PUSH", "queue": "u", "data": 2, "unique_key": "order-1"})
    assert text == "Duplicate job with key: order-1"
    await push(raw, "other", 3, unique_key="order-1")  # keys are per queue


async def test_unique_key_held_by_an_active_or_delayed_job_is_duplicate(raw: RawClient) -> None:
    await push(raw, "u", unique_key="active")
    await pull(raw, "u")
    await push(raw, "u", unique_key="later", delay=60_000)
    for key in ("active", "later"):
        text = await refused(raw, {"cmd": "PUSH", "queue": "u", "data": 1, "unique_key": key})
        assert text == f"Duplicate job with key: {key}"


async def test_pushb_with_a_held_key_is_duplicate_and_pushes_nothing(raw: RawClient) -> None:
    await push(raw, "u", unique_key="k")
    jobs = [{"data": 1, "unique_key": "fresh"}, {"data": 2, "unique_key": "k"}]
    assert await refused(raw, {"cmd": "PUSHB", "queue": "u", "jobs": jobs}) == (
        "Duplicate job with key: k"
    )
    assert (await stats(raw))["queued"] == 1
    await push(raw, "u", unique_key="fresh")  # the refused batch did not take "fresh"


async def test_pushb_repeating_a_key_within_the_batch_is_duplicate(raw: RawClient) -> None:
    jobs = [{"data": 1, "unique_key": "twice"}, {"data": 2, "unique_key": "twice"}]
    assert await refused(raw, {"cmd": "PUSHB", "queue": "u", "jobs": jobs}) == (
        "Duplicate job with key: twice"
    )
    assert (await stats(raw))["queued"] == 0


async def test_unique_key_stays_held_while_the_job_is_dead_in_the_dlq(raw: RawClient) -> None:
    job_id = await push(raw, "u", unique_key="dead-key", max_attempts=1)
    await pull(raw, "u")
    await raw.call({"cmd": "FAIL", "id": job_id})
    assert [j["id"] for j in (await raw.call({"cmd": "DLQ", "queue": "u"}))["jobs"]] == [job_id]
    text = await refused(raw, {"cmd": "PUSH", "queue": "u", "data": 1, "unique_key": "dead-key"})
    assert text == "Duplicate job with key: dead-key"
    assert await raw.call({"cmd": "CANCEL", "id": job_id}) == {"ok": True}  # leaves the DLQ
    await push(raw, "u", unique_key="dead-key")


@pytest.mark.parametrize("finish", ["ACK", "CANCEL"])
async def test_unique_key_is_released_after_ack_or_cancel(raw: RawClient, finish: str) -> None:
    job_id = await push(raw, "u", unique_key="once")
    await pull(raw, "u")
    assert await raw.call({"cmd": finish, "id": job_id}) == {"ok": True}
    assert await push(raw, "u", unique_key="once") != job_id


# -- Cron job not found -------------------------------------------------------------------------


async def test_crondelete_of_an_unknown_name_is_cron_job_not_found(raw: RawClient) -> None:
    assert await refused(raw, {"cmd": "CRONDELETE", "name": "ghost"}) == "Cron job not found"
    base = {"cmd": "CRON", "name": "once", "queue": "c", "data": 1, "schedule": "*/60"}
    assert await raw.call(base) == {"ok": True}
    assert await raw.call({"cmd": "CRONDELETE", "name": "once"}) == {"ok": True}
    assert await refused(raw, {"cmd": "CRONDELETE", "name": "once"}) == "Cron job not found"


# -- Lease expired for job N --------------------------------------------------------------------


async def stale_lease(node: Node, connect: Connect) -> tuple[RawClient, dict[str, Any], int]:
    """A job pulled twice: returns the second worker, its job and the first (stale) lease."""
    first = await connect(node)
    job_id = await push(first, "lease")
    stale = (await pull(first, "lease"))["started_at"]
    await first.close()  # its lease goes back to the queue at once
    second = await connect(node)
    job = await pull(second, "lease", timeout=3000)
    assert job["id"] == job_id and job["attempts"] == 1
    assert job["started_at"] != stale
    return second, job, stale


@pytest.mark.parametrize(
    "extra",
    [
        {"cmd": "ACK", "result": 1},
        {"cmd": "FAIL", "error": "late"},
        {"cmd": "PROGRESS", "progress": 50},
        {"cmd": "TOUCH"},
    ],
)
async def test_a_stale_lease_is_lease_expired(
    node: Node, connect: Connect, extra: dict[str, Any]
) -> None:
    worker, job, stale = await stale_lease(node, connect)
    request = {**extra, "id": job["id"], "lease": stale}
    assert await refused(worker, request) == f"Lease expired for job {job['id']}"
    assert (await stats(worker))["processing"] == 1  # the current attempt is untouched
    current = {**request, "lease": job["started_at"]}
    assert (await worker.call(current))["ok"] is True


async def test_ack_without_lease_after_a_redelivery_still_acks(
    node: Node, connect: Connect
) -> None:
    worker, job, _stale = await stale_lease(node, connect)
    assert await worker.call({"cmd": "ACK", "id": job["id"]}) == {"ok": True}


# -- Payload too large --------------------------------------------------------------------------


@pytest.fixture
async def small_payloads(make_node: MakeNode) -> Node:
    settings = NodeSettings(port=0, http_port=0, storage=StorageSettings(max_payload=100))
    return await make_node(settings)


def json_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":")).encode())


async def test_a_payload_over_the_maximum_is_payload_too_large(
    small_payloads: Node, connect: Connect
) -> None:
    client = await connect(small_payloads)
    big = {"blob": "x" * 120}
    text = await refused(client, {"cmd": "PUSH", "queue": "q", "data": big})
    assert text == f"Payload too large: {json_size(big)} bytes (max 100)"
    fits = "y" * 98  # 100 bytes with its quotes
    assert json_size(fits) == 100
    assert (await client.call({"cmd": "PUSH", "queue": "q", "data": fits}))["ok"] is True


async def test_a_payload_over_the_maximum_inside_pushb_refuses_the_batch(
    small_payloads: Node, connect: Connect
) -> None:
    client = await connect(small_payloads)
    big = ["z" * 200]
    jobs = [{"data": 1}, {"data": big}]
    text = await refused(client, {"cmd": "PUSHB", "queue": "q", "jobs": jobs})
    assert text == f"Payload too large: {json_size(big)} bytes (max 100)"
    assert (await stats(client))["queued"] == 0


async def test_a_cron_payload_over_the_maximum_is_payload_too_large(
    small_payloads: Node, connect: Connect
) -> None:
    client = await connect(small_payloads)
    big = "c" * 150
    req = {"cmd": "CRON", "name": "n", "queue": "q", "data": big, "schedule": "*/60"}
    assert await refused(client, req) == f"Payload too large: {json_size(big)} bytes (max 100)"


# -- reqId, ordering, pipelining ----------------------------------------------------------------


async def test_reqid_is_echoed_on_success_and_on_errors(raw: RawClient) -> None:
    await raw.send({"cmd": "STATS", "reqId": "s-1"})
    answer = await raw.recv()
    assert answer["ok"] is True and answer["reqId"] == "s-1"
    await raw.send({"cmd": "ACK", "id": 5, "reqId": "a-2"})
    assert await raw.recv() == {"ok": False, "error": "Job 5 not found", "reqId": "a-2"}
    await raw.send({"cmd": "NOPE", "reqId": "n-3"})
    answer = await raw.recv()
    assert answer["ok"] is False and answer["error"].startswith("Invalid: ")
    assert answer["reqId"] == "n-3"
    await raw.send({"cmd": "PUSH", "queue": "q", "data": 1, "reqId": "p-4"})
    answer = await raw.recv()
    assert list(answer) == ["ok", "id", "reqId"] and answer["reqId"] == "p-4"


async def test_reqid_is_echoed_on_a_pull_answered_later(
    node: Node, raw: RawClient, connect: Connect
) -> None:
    await raw.send({"cmd": "PULL", "queue": "later", "timeout": 50, "reqId": "t"})
    assert await raw.recv() == {"ok": True, "job": None, "reqId": "t"}
    await raw.send({"cmd": "PULL", "queue": "later", "reqId": "w"})
    producer = await connect(node)
    job_id = await push(producer, "later")
    answer = await raw.recv()
    assert answer["reqId"] == "w" and answer["job"]["id"] == job_id


async def test_answers_come_strictly_in_request_order_when_pipelined(raw: RawClient) -> None:
    lines: list[bytes] = []
    expect: list[str] = []
    for i in range(200):
        kind = ("push", "stats", "garbage", "result", "unknown", "ack")[i % 6]
        kinds: dict[str, dict[str, Any] | None] = {
            "push": {"cmd": "PUSH", "queue": "pipe", "data": i},
            "stats": {"cmd": "STATS"},
            "garbage": None,
            "result": {"cmd": "GETRESULT", "id": 10_000 + i},
            "unknown": {"cmd": f"NOPE{i}"},
            "ack": {"cmd": "ACK", "id": 20_000 + i},
        }
        req = kinds[kind]
        if req is None:
            lines.append(b"{not json " + str(i).encode() + b"\n")
        else:
            lines.append(orjson.dumps({**req, "reqId": f"r{i}"}) + b"\n")
        expect.append(kind)
    raw.writer.write(b"".join(lines))
    await raw.writer.drain()
    pushed: list[int] = []
    for i, kind in enumerate(expect):
        answer = await raw.recv()
        if kind == "garbage":
            assert "reqId" not in answer and answer["error"].startswith("Invalid: "), (i, answer)
            continue
        assert answer.get("reqId") == f"r{i}", (i, answer)
        if kind == "push":
            pushed.append(answer["id"])
        elif kind == "stats":
            assert answer["queued"] == len(pushed)
        elif kind == "result":
            assert answer["id"] == 10_000 + i and answer["result"] is None
        elif kind == "unknown":
            assert answer["error"].startswith("Invalid: ") and f"NOPE{i}" in answer["error"]
        else:
            assert answer["error"] == f"Job {20_000 + i} not found"
    assert pushed == sorted(pushed) and len(pushed) == 34


async def test_a_blocked_pull_holds_back_the_answers_behind_it(
    node: Node, raw: RawClient, connect: Connect
) -> None:
    raw.writer.write(
        b'{"cmd":"PULL","queue":"hold"}\n{"cmd":"STATS","reqId":"behind"}\n'
        b'{"cmd":"GETRESULT","id":1}\n'
    )
    await raw.writer.drain()
    assert await nothing_arrives(raw)
    producer = await connect(node)
    job_id = await push(producer, "hold")
    pulled = await raw.recv()
    assert pulled["job"]["id"] == job_id
    behind = await raw.recv()
    assert behind["reqId"] == "behind" and behind["processing"] == 1
    assert await raw.recv() == {"ok": True, "id": 1, "result": None}


async def test_a_blocked_pullb_answers_with_the_jobs_ready_when_it_wakes(
    node: Node, raw: RawClient, connect: Connect
) -> None:
    await raw.send({"cmd": "PULLB", "queue": "hold", "count": 5})
    assert await nothing_arrives(raw)
    producer = await connect(node)
    answer = await producer.call({"cmd": "PUSHB", "queue": "hold", "jobs": [{"data": 1}] * 3})
    pulled = await raw.recv()
    assert 1 <= len(pulled["jobs"]) <= 3
    assert [j["id"] for j in pulled["jobs"]] == answer["ids"][: len(pulled["jobs"])]


# -- long lines -----------------------------------------------------------------------------------


@pytest.fixture
async def short_lines(make_node: MakeNode) -> Node:
    return await make_node(NodeSettings(port=0, http_port=0, max_line=1024))


def padded_stats(size: int) -> bytes:
    """A STATS request line of exactly ``size`` bytes (without its newline)."""
    head = b'{"cmd":"STATS","pad":"'
    return head + b"p" * (size - len(head) - 2) + b'"}'


async def test_a_line_at_the_maximum_is_answered(short_lines: Node, connect: Connect) -> None:
    client = await connect(short_lines)
    line = padded_stats(1024)
    assert len(line) == 1024
    await client.send(line + b"\n")
    assert (await client.recv())["ok"] is True


async def test_a_line_longer_than_the_maximum_gets_an_error_and_the_connection_closes(
    short_lines: Node, connect: Connect
) -> None:
    client = await connect(short_lines)
    await client.send(padded_stats(1025) + b"\n")
    text = await refused(client, b"")
    assert text.startswith("Invalid: ") and "1024" in text
    assert await client.closed_by_server()
    other = await connect(short_lines)
    assert (await stats(other))["ok"] is True  # the node lives on


async def test_the_default_maximum_line_is_16_mib(raw: RawClient) -> None:
    raw.writer.write(b'{"cmd":"STATS","pad":"' + b"p" * (16 * 1024 * 1024))
    try:
        await raw.writer.drain()
    except ConnectionError:
        pass  # the node may close before the last bytes are taken
    text = await refused(raw, b"")
    assert text.startswith("Invalid: ") and str(16 * 1024 * 1024) in text
    assert await raw.closed_by_server()


async def test_a_long_unterminated_line_is_refused_without_waiting_for_its_end(
    short_lines: Node, connect: Connect
) -> None:
    client = await connect(short_lines)
    await client.send(b'{"cmd":"PUSH","queue":"q","data":"' + b"d" * 4000)
    assert (await refused(client, b"")).startswith("Invalid: ")
    assert await client.closed_by_server()


async def test_lines_before_a_too_long_line_in_the_same_write_are_answered_first(
    short_lines: Node, connect: Connect
) -> None:
    client = await connect(short_lines)
    await client.send(b'{"cmd":"STATS","reqId":"first"}\n' + padded_stats(2000) + b"\n")
    first = await client.recv()
    assert first.get("reqId") == "first" and first["ok"] is True, first
    assert (await refused(client, b"")).startswith("Invalid: ")
    assert await client.closed_by_server()


async def test_a_too_long_tail_after_a_complete_line_is_refused_without_waiting(
    short_lines: Node, connect: Connect
) -> None:
    client = await connect(short_lines)
    await client.send(b'{"cmd":"STATS","reqId":"first"}\n' + b"t" * 2000)
    assert (await client.recv())["reqId"] == "first"
    assert (await refused(client, b"")).startswith("Invalid: ")
    assert await client.closed_by_server()


# -- leases of closed connections ---------------------------------------------------------------


async def test_leases_of_a_closed_connection_go_back_to_the_queue_at_once(
    node: Node, raw: RawClient, connect: Connect
) -> None:
    worker = await connect(node)
    ids = [await push(raw, "gone", i) for i in range(2)]
    pulled = await worker.call({"cmd": "PULLB", "queue": "gone", "count": 2})
    assert sorted(j["id"] for j in pulled["jobs"]) == ids
    assert (await stats(raw))["processing"] == 2
    await worker.close()
    again = await raw.call({"cmd": "PULLB", "queue": "gone", "count": 2, "timeout": 3000})
    got = list(again["jobs"])
    if len(got) < 2:
        got.append(await pull(raw, "gone"))
    assert sorted(j["id"] for j in got) == ids
    assert all(j["attempts"] == 1 for j in got)


async def test_a_closed_connection_with_a_blocked_pull_takes_no_job(
    node: Node, raw: RawClient, connect: Connect
) -> None:
    waiting = await connect(node)
    await waiting.send({"cmd": "PULL", "queue": "orphan"})
    await eventually(lambda: blocked_pulls(node, "orphan") == 1, what="the PULL blocked")
    await waiting.close()
    await eventually(lambda: len(node.sessions) == 1 and blocked_pulls(node, "orphan") == 0,
                     what="the connection and its blocked PULL gone")
    job_id = await push(raw, "orphan")
    job = await pull(raw, "orphan")
    assert job["id"] == job_id and job["attempts"] == 0
