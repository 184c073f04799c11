"""The node's HTTP API over a real server: every route of shardq_server.http_api, its success shape
(PROTOCOL.md "The HTTP API", the Poor Man Queue README) and its refusals with their status
codes, spoken to with aiohttp's client over loopback sockets.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from shardq import native
from shardq.wire.job import EVENTS
from shardq.wire.slots import SLOTS
from shardq.wire.topology import NodeInfo, Topology
from shardq_node.runtime import Node
from shardq_node.settings import NodeSettings, StorageSettings

from ..cluster import blocked_pulls, subscribers
from ..helpers import RawClient, eventually, free_port

JOB_KEYS = {
    "id", "queue", "data", "priority", "created_at", "run_at", "started_at", "attempts",
    "max_attempts", "backoff", "ttl", "timeout", "unique_key", "depends_on", "progress",
    "progress_msg", "state",
}
QUEUE_KEYS = {"name", "pending", "processing", "dlq", "paused", "rate_limit", "concurrency_limit"}
ID_ROUTES = [
    ("POST", "/jobs/{}/ack"), ("POST", "/jobs/{}/fail"), ("POST", "/jobs/{}/cancel"),
    ("POST", "/jobs/{}/progress"), ("GET", "/jobs/{}/progress"), ("GET", "/jobs/{}/result"),
    ("GET", "/jobs/{}"),
]


def settings(**kw: Any) -> NodeSettings:
    return NodeSettings(port=0, http_port=free_port(), **kw)


def size(data: Any) -> int:
    """Bytes a payload takes in the node (its compact JSON)."""
    return len(orjson.dumps(data))


class Api:
    """Real HTTP requests to one node; answers as (status, parsed JSON body)."""

    def __init__(self, session: aiohttp.ClientSession, node: Node, token: str | None = None):
        self.session = session
        self.node = node
        self.base = f"http://127.0.0.1:{node.http_port}"
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def raw(self, method: str, path: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
        headers = {**self.headers, **kw.pop("headers", {})}
        async with self.session.request(method, self.base + path, headers=headers, **kw) as r:
            return r.status, dict(r.headers), await r.read()

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        status, headers, body = await self.raw(method, path, **kw)
        assert headers["Content-Type"].startswith("application/json"), (status, body[:200])
        return status, orjson.loads(body)

    async def ok(self, method: str, path: str, **kw: Any) -> Any:
        """The ``data`` of a 200 ``{"ok":true,"data":T}`` answer."""
        status, body = await self.call(method, path, **kw)
        assert status == 200, body
        assert set(body) == {"ok", "data"} and body["ok"] is True, body
        return body["data"]

    async def refused(self, method: str, path: str, status: int,
                      error: str | re.Pattern[str] | None = None, **kw: Any) -> str:
        """The error text of a ``{"ok":false,"error":TEXT}`` answer with this status."""
        got, body = await self.call(method, path, **kw)
        assert got == status, (got, body)
        assert set(body) == {"ok", "error"} and body["ok"] is False, body
        text: str = body["error"]
        assert isinstance(text, str)
        if isinstance(error, re.Pattern):
            assert error.fullmatch(text), text
        elif error is not None:
            assert text == error
        return text

    async def push(self, queue: str, **job: Any) -> dict[str, Any]:
        pushed: dict[str, Any] = await self.ok("POST", f"/queues/{queue}/jobs", json=job)
        return pushed

    async def pull(self, queue: str, count: int = 1, timeout: int = 0) -> list[dict[str, Any]]:
        jobs: list[dict[str, Any]] = await self.ok(
            "GET", f"/queues/{queue}/jobs", params={"count": count, "timeout": timeout})
        return jobs

    async def queue(self, name: str) -> dict[str, Any]:
        return next(q for q in await self.ok("GET", "/queues") if q["name"] == name)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as s:
        yield s


@pytest.fixture
def api_for(make_node: Any, session: aiohttp.ClientSession) -> Callable[..., Any]:
    async def make(token: str | None = None, **kw: Any) -> Api:
        kw.setdefault("http_max_pull_wait_ms", 5000)
        return Api(session, await make_node(settings(**kw)), token)

    return make


@pytest.fixture
async def api(api_for: Callable[..., Any]) -> Api:
    made: Api = await api_for()
    return made


# -- MagicQueue's queue routes --------------------------------------------------------------------


async def test_list_queues_shows_each_queue_with_its_counts_and_limits(api: Api) -> None:
    assert await api.ok("GET", "/queues") == []
    for n in range(3):
        await api.push("lq", data=n)
    await api.pull("lq")
    await api.ok("POST", "/queues/lq/pause")
    await api.ok("POST", "/queues/lq/rate-limit", json={"limit": 7})
    await api.ok("POST", "/queues/lq/concurrency", json={"limit": 2})
    await api.push("other", data=None)
    queues = await api.ok("GET", "/queues")
    assert [q["name"] for q in queues] == ["lq", "other"]
    assert all(set(q) >= QUEUE_KEYS for q in queues)
    assert {k: queues[0][k] for k in QUEUE_KEYS} == {
        "name": "lq", "pending": 2, "processing": 1, "dlq": 0, "paused": True,
        "rate_limit": 7, "concurrency_limit": 2,
    }
    assert {k: queues[1][k] for k in QUEUE_KEYS} == {
        "name": "other", "pending": 1, "processing": 0, "dlq": 0, "paused": False,
        "rate_limit": None, "concurrency_limit": None,
    }


async def test_push_answers_the_whole_job(api: Api) -> None:
    job = await api.push("p", data={"k": [1, "two"]}, priority=5, max_attempts=4, backoff=250,
                         ttl=60_000, timeout=30_000, unique_key="only-one")
    assert set(job) == JOB_KEYS
    assert job["queue"] == "p" and job["data"] == {"k": [1, "two"]}
    assert (job["priority"], job["max_attempts"], job["backoff"], job["ttl"], job["timeout"]) \
        == (5, 4, 250, 60_000, 30_000)
    assert job["unique_key"] == "only-one" and job["depends_on"] == []
    assert (job["state"], job["attempts"], job["progress"]) == ("waiting", 0, 0)
    assert isinstance(job["id"], int) and job["id"] >= 0
    assert await api.ok("GET", f"/jobs/{job['id']}") == job
    later = await api.push("p", data=None, delay=60_000)
    assert later["state"] == "delayed" and later["run_at"] >= later["created_at"] + 60_000
    child = await api.push("p", data=1, depends_on=[later["id"]])
    assert child["state"] == "waiting-children" and child["depends_on"] == [later["id"]]


async def test_push_refuses_bad_bodies_with_400(api: Api) -> None:
    path = "/queues/p/jobs"
    await api.refused("POST", path, 400, re.compile(r"Invalid: body is not valid JSON \(.*\)"),
                      data=b'{"data": 1')
    await api.refused("POST", path, 400, "Invalid: request body must be a JSON object",
                      data=b"[1, 2]")
    await api.refused("POST", path, 400, "Invalid: request body must be a JSON object")
    await api.refused("POST", path, 400, re.compile(r"Invalid: .*'data'.*"), json={"priority": 1})
    await api.refused("POST", path, 400, re.compile(r"Invalid: .*'priority'.*"),
                      json={"data": 1, "priority": "high"})
    await api.refused("POST", path, 400, re.compile(r"Invalid: .*'delay'.*"),
                      json={"data": 1, "delay": -5})
    await api.refused("POST", path, 400, re.compile(r"Invalid: .*'depends_on'.*"),
                      json={"data": 1, "depends_on": "x"})
    await api.refused("POST", "/queues/" + "q" * 513 + "/jobs", 400,
                      re.compile(r"Invalid: .*'queue'.*"), json={"data": 1})
    assert await api.ok("GET", "/queues") == []


async def test_a_duplicate_unique_key_is_409(api: Api) -> None:
    await api.push("u", data=1, unique_key="k1")
    await api.refused("POST", "/queues/u/jobs", 409, "Duplicate job with key: k1",
                      json={"data": 2, "unique_key": "k1"})
    assert (await api.queue("u"))["pending"] == 1


async def test_pull_takes_count_jobs_in_priority_order(api: Api) -> None:
    ids = [(await api.push("pl", data=n, priority=n))["id"] for n in range(5)]
    one = await api.ok("GET", "/queues/pl/jobs")  # count defaults to 1
    assert [j["id"] for j in one] == [ids[4]]
    assert set(one[0]) == JOB_KEYS and one[0]["state"] == "active" and one[0]["started_at"] > 0
    three = await api.pull("pl", count=3)
    assert [j["id"] for j in three] == [ids[3], ids[2], ids[1]]
    rest = await api.pull("pl", count=10)
    assert [j["id"] for j in rest] == [ids[0]]


async def test_pull_with_timeout_answers_an_empty_list_when_nothing_comes(api: Api) -> None:
    started = time.monotonic()
    assert await api.pull("empty", count=5, timeout=100) == []
    assert 0.09 <= time.monotonic() - started < 3
    assert await api.pull("empty", timeout=0) == []


async def test_pull_waits_for_a_job_pushed_later(api: Api) -> None:
    waiting = asyncio.create_task(api.pull("later", count=2, timeout=5000))
    await eventually(lambda: blocked_pulls(api.node, "later") == 1, 5, 0.005,
                     what="the HTTP pull blocked at the node")
    pushed = await api.push("later", data="late")
    jobs = await asyncio.wait_for(waiting, 5)
    assert [(j["id"], j["data"], j["state"]) for j in jobs] == [(pushed["id"], "late", "active")]


async def test_pull_waits_no_longer_than_the_nodes_limit(api_for: Callable[..., Any]) -> None:
    api: Api = await api_for(http_max_pull_wait_ms=100)
    for params in ({"timeout": "60000"}, {}):
        started = time.monotonic()
        assert await api.ok("GET", "/queues/capped/jobs", params=params) == []
        assert time.monotonic() - started < 3


async def test_pull_refuses_bad_query_parameters_with_400(api: Api) -> None:
    path = "/queues/pq/jobs"
    for params, name in [({"count": "abc"}, "count"), ({"count": "1.5"}, "count"),
                         ({"count": "²"}, "count"), ({"timeout": "soon"}, "timeout")]:
        await api.refused("GET", path, 400, re.compile(
            rf"Invalid: query parameter '{name}' must be an integer, got .*"), params=params)
    for params in ({"count": "0"}, {"count": "100001"}, {"count": "-3"}):
        await api.refused("GET", path, 400, re.compile(r"Invalid: field 'count' .*"),
                          params=params)
    await api.refused("GET", path, 400, re.compile(r"Invalid: field 'timeout' .*"),
                      params={"timeout": "-1"})


async def test_pause_holds_pulls_and_resume_releases_them(api: Api) -> None:
    job = await api.push("pr", data=1)
    assert await api.ok("POST", "/queues/pr/pause") is None
    assert (await api.queue("pr"))["paused"] is True
    assert await api.pull("pr", timeout=0) == []
    assert await api.ok("POST", "/queues/pr/resume") is None
    assert (await api.queue("pr"))["paused"] is False
    assert [j["id"] for j in await api.pull("pr")] == [job["id"]]
    await api.refused("POST", "/queues/" + "x" * 600 + "/pause", 400,
                      re.compile(r"Invalid: .*'queue'.*"))


# -- DLQ ------------------------------------------------------------------------------------------


async def dead_jobs(api: Api, queue: str, n: int) -> list[int]:
    ids = []
    for i in range(n):
        job = await api.push(queue, data=i, max_attempts=1)
        assert [j["id"] for j in await api.pull(queue)] == [job["id"]]
        assert await api.ok("POST", f"/jobs/{job['id']}/fail", json={"error": f"e{i}"}) is None
        ids.append(job["id"])
    return ids


async def test_dlq_lists_dead_jobs_oldest_first_and_count_bounds_it(api: Api) -> None:
    ids = await dead_jobs(api, "d", 3)
    dlq = await api.ok("GET", "/queues/d/dlq")
    assert [j["id"] for j in dlq] == ids
    assert all(set(j) >= JOB_KEYS for j in dlq)
    assert [(j["attempts"], j["error"]) for j in dlq] == [(1, "e0"), (1, "e1"), (1, "e2")]
    assert [j["id"] for j in await api.ok("GET", "/queues/d/dlq", params={"count": 2})] == ids[:2]
    assert await api.ok("GET", "/queues/d/dlq") == dlq  # browsing removes nothing
    assert await api.ok("GET", "/queues/nothing-dead/dlq") == []
    await api.refused("GET", "/queues/d/dlq", 400,
                      re.compile(r"Invalid: query parameter 'count'.*"), params={"count": "many"})
    await api.refused("GET", "/queues/d/dlq", 400, re.compile(r"Invalid: field 'count'.*"),
                      params={"count": "0"})


async def test_dlq_retry_one_then_all(api: Api) -> None:
    ids = await dead_jobs(api, "r", 3)
    assert await api.ok("POST", "/queues/r/dlq/retry", json={"id": ids[1]}) == 1
    assert [j["id"] for j in await api.ok("GET", "/queues/r/dlq")] == [ids[0], ids[2]]
    again = await api.pull("r")
    assert [(j["id"], j["attempts"]) for j in again] == [(ids[1], 0)]
    assert await api.ok("POST", "/queues/r/dlq/retry") == 2  # no body: every dead job
    assert await api.ok("GET", "/queues/r/dlq") == []
    assert (await api.queue("r"))["pending"] == 2
    assert await api.ok("POST", "/queues/r/dlq/retry", json={}) == 0
    await api.refused("POST", "/queues/r/dlq/retry", 400, re.compile(r"Invalid: .*'id'.*"),
                      json={"id": "one"})
    await api.refused("POST", "/queues/r/dlq/retry", 400, re.compile(r"Invalid: body .*"),
                      data=b"{oops")


# -- limits ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("route,key", [("rate-limit", "rate_limit"),
                                       ("concurrency", "concurrency_limit")])
async def test_limits_are_set_and_cleared(api: Api, route: str, key: str) -> None:
    path = f"/queues/lim/{route}"
    assert await api.ok("POST", path, json={"limit": 3}) is None
    assert (await api.queue("lim"))[key] == 3
    assert await api.ok("DELETE", path) is None
    assert (await api.queue("lim"))[key] is None
    for body in ({"limit": 0}, {"limit": "3"}, {"limit": 1.5}, {}):
        await api.refused("POST", path, 400, re.compile(r"Invalid: .*'limit'.*"), json=body)
    await api.refused("POST", path, 400, "Invalid: request body must be a JSON object")
    await api.refused("POST", path, 400, re.compile(r"Invalid: body is not valid JSON .*"),
                      data=b"limit=3")
    assert (await api.queue("lim"))[key] is None


async def test_a_concurrency_limit_bounds_what_a_pull_gets(api: Api) -> None:
    for n in range(4):
        await api.push("cc", data=n)
    await api.ok("POST", "/queues/cc/concurrency", json={"limit": 2})
    assert len(await api.pull("cc", count=4)) == 2
    assert await api.pull("cc", count=4, timeout=0) == []


# -- job routes -----------------------------------------------------------------------------------


async def active_job(api: Api, queue: str, **job: Any) -> dict[str, Any]:
    """Push one job and pull it: the job as pulled (active)."""
    pushed = await api.push(queue, **job)
    (pulled,) = await api.pull(queue)
    assert pulled["id"] == pushed["id"] and pulled["state"] == "active"
    return pulled


async def test_ack_stores_the_result(api: Api) -> None:
    job = await active_job(api, "a", data=1)
    path = f"/jobs/{job['id']}"
    assert await api.ok("POST", path + "/ack", json={"result": {"sum": 3}}) is None
    assert await api.ok("GET", path + "/result") == {"sum": 3}
    done = await api.ok("GET", path)
    assert done["id"] == job["id"] and done["state"] == "completed"
    assert done["result"] == {"sum": 3}
    await api.refused("POST", path + "/ack", 404, f"Job {job['id']} not found")  # second ack


async def test_ack_without_a_body_stores_a_null_result(api: Api) -> None:
    job = await active_job(api, "a0", data=1)
    assert await api.ok("POST", f"/jobs/{job['id']}/ack") is None
    assert await api.ok("GET", f"/jobs/{job['id']}/result") is None


async def test_result_of_an_unknown_job_is_null_not_an_error(api: Api) -> None:
    assert await api.ok("GET", "/jobs/123456789/result") is None


async def test_fail_records_the_error_and_retries(api: Api) -> None:
    job = await active_job(api, "f", data=1, max_attempts=3)
    assert await api.ok("POST", f"/jobs/{job['id']}/fail", json={"error": "boom"}) is None
    back = await api.ok("GET", f"/jobs/{job['id']}")
    assert (back["state"], back["attempts"], back["error"]) == ("waiting", 1, "boom")
    await api.refused("POST", f"/jobs/{job['id']}/fail", 404, f"Job {job['id']} not found")
    await api.pull("f")
    await api.refused("POST", f"/jobs/{job['id']}/fail", 400, re.compile(r"Invalid: .*'error'.*"),
                      json={"error": 42})


async def test_cancel_removes_a_waiting_job(api: Api) -> None:
    job = await api.push("c", data=1)
    assert await api.ok("POST", f"/jobs/{job['id']}/cancel") is None
    assert (await api.queue("c"))["pending"] == 0
    assert await api.pull("c", timeout=0) == []
    await api.refused("POST", f"/jobs/{job['id']}/cancel", 404, f"Job {job['id']} not found")


async def test_progress_is_reported_and_read_back(api: Api) -> None:
    job = await active_job(api, "pg", data=1)
    path = f"/jobs/{job['id']}/progress"
    assert await api.ok("GET", path) == [0, None]
    assert await api.ok("POST", path, json={"progress": 40, "message": "reading"}) is None
    assert await api.ok("GET", path) == [40, "reading"]
    assert await api.ok("POST", path, json={"progress": 255}) is None  # above 100: clamped
    assert await api.ok("GET", path) == [100, None]
    for body in ({"progress": 256}, {"progress": "half"}, {"message": "no value"}):
        await api.refused("POST", path, 400, re.compile(r"Invalid: .*'progress'.*"), json=body)
    await api.refused("POST", path, 400, re.compile(r"Invalid: .*'message'.*"),
                      json={"progress": 5, "message": 5})
    await api.refused("POST", path, 400, "Invalid: request body must be a JSON object")


async def test_progress_of_a_job_that_is_not_active_is_404(api: Api) -> None:
    job = await api.push("pg2", data=1)
    await api.refused("POST", f"/jobs/{job['id']}/progress", 404,
                      f"Job {job['id']} not found in processing", json={"progress": 1})


async def test_unknown_jobs_are_404(api: Api) -> None:
    unknown = 987654321
    for method, route in ID_ROUTES:
        path = route.format(unknown)
        if route.endswith("/result"):  # GETRESULT never refuses
            assert await api.ok(method, path) is None
        elif (method, route) == ("POST", "/jobs/{}/progress"):
            await api.refused(method, path, 404, f"Job {unknown} not found in processing",
                              json={"progress": 1})
        else:
            await api.refused(method, path, 404, f"Job {unknown} not found")


@pytest.mark.parametrize("bad", ["abc", "-1", "1.5", "0x10", "²", "١٢", "9" * 5000])
async def test_ids_in_paths_that_are_not_non_negative_integers_are_400(api: Api,
                                                                        bad: str) -> None:
    for method, route in ID_ROUTES:
        body = {"progress": 1} if method == "POST" else None
        text = await api.refused(method, route.format(bad), 400, json=body)
        assert text.startswith("Invalid: job id must be a non-negative integer, got "), text


async def test_a_stale_lease_token_is_409(api: Api) -> None:
    job = await active_job(api, "l", data=1)
    base, lease = f"/jobs/{job['id']}", job["started_at"]
    stale = f"Lease expired for job {job['id']}"
    await api.refused("POST", base + "/ack", 409, stale, json={"lease": lease - 1})
    await api.refused("POST", base + "/fail", 409, stale, json={"lease": lease + 1})
    await api.refused("POST", base + "/progress", 409, stale,
                      json={"progress": 10, "lease": lease - 1})
    await api.refused("POST", base + "/ack", 400, re.compile(r"Invalid: .*'lease'.*"),
                      json={"lease": "x"})
    assert await api.ok("POST", base + "/progress", json={"progress": 10, "lease": lease}) is None
    assert await api.ok("POST", base + "/ack", json={"result": 1, "lease": lease}) is None


# -- crons ----------------------------------------------------------------------------------------


async def test_crons_are_created_listed_replaced_and_deleted(api: Api) -> None:
    assert await api.ok("GET", "/crons") == []
    before = int(time.time() * 1000)
    cron = {"queue": "cq", "data": {"report": True}, "schedule": "0 3 * * *", "priority": 2}
    assert await api.ok("POST", "/crons/nightly", json=cron) is None
    assert await api.ok("POST", "/crons/often", json={"queue": "cq", "data": 1,
                                                      "schedule": "*/60"}) is None
    listed = await api.ok("GET", "/crons")
    assert [c["name"] for c in listed] == ["nightly", "often"]
    assert all(set(c) == {"name", "queue", "data", "schedule", "priority", "next_run"}
               for c in listed)
    nightly, often = listed
    assert {k: nightly[k] for k in cron} == cron
    assert before < nightly["next_run"] <= before + 24 * 3600 * 1000 + 1000
    assert often["priority"] == 0
    assert before + 59_000 <= often["next_run"] <= int(time.time() * 1000) + 61_000
    assert await api.ok("POST", "/crons/nightly", json={**cron, "schedule": "*/5"}) is None
    assert [c["schedule"] for c in await api.ok("GET", "/crons")] == ["*/5", "*/60"]
    assert await api.ok("DELETE", "/crons/nightly") is True
    assert await api.ok("DELETE", "/crons/nightly") is False
    assert [c["name"] for c in await api.ok("GET", "/crons")] == ["often"]


async def test_bad_crons_are_400(api: Api) -> None:
    good = {"queue": "cq", "data": 1, "schedule": "*/10"}
    for bad, field in [({**good, "schedule": "every day"}, "schedule"),
                       ({**good, "schedule": "*/0"}, "schedule"),
                       ({**good, "schedule": 5}, "schedule"),
                       ({"queue": "cq", "data": 1}, "schedule"),
                       ({**good, "queue": 7}, "queue"),
                       ({**good, "priority": "high"}, "priority")]:
        text = await api.refused("POST", "/crons/bad", 400, json=bad)
        assert text.startswith("Invalid: ") and field in text, text
    await api.refused("POST", "/crons/bad", 400, "Invalid: request body must be a JSON object")
    await api.refused("POST", "/crons/bad", 400, re.compile(r"Invalid: body is not valid JSON.*"),
                      data=b"schedule: daily")
    assert await api.ok("GET", "/crons") == []


# -- Poor Man Queue routes ------------------------------------------------------------------------


async def test_publish_answers_id_size_and_where_it_is_stored(api: Api) -> None:
    message = orjson.dumps({"type": "user_registration", "userId": "12345", "priority": 9})
    status, headers, body = await api.raw("POST", "/publish", data=message,
                                          headers={"Content-Type": "application/json"})
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    answer = orjson.loads(body)
    assert set(answer) == {"id", "size", "stored"}
    assert isinstance(answer["id"], str) and answer["id"].isdigit()
    assert answer["size"] == len(message) and answer["stored"] == "memory"
    job = await api.ok("GET", f"/jobs/{answer['id']}")
    assert (job["queue"], job["priority"], job["data"]) == ("default", 9, orjson.loads(message))
    other = await api.call("POST", "/publish", params={"queue": "mail", "priority": "3"},
                           data=b'"plain string"')
    assert other[0] == 200 and other[1]["size"] == len(b'"plain string"')
    job = await api.ok("GET", f"/jobs/{other[1]['id']}")
    assert (job["queue"], job["priority"], job["data"]) == ("mail", 3, "plain string")


async def test_publish_refuses_what_is_not_json(api: Api) -> None:
    await api.refused("POST", "/publish", 400, re.compile(r"Invalid: body is not valid JSON .*"),
                      data=b"hello")
    await api.refused("POST", "/publish", 400, re.compile(r"Invalid: body is not valid JSON .*"))
    await api.refused("POST", "/publish", 400,
                      re.compile(r"Invalid: query parameter 'priority' must be an integer.*"),
                      params={"priority": "urgent"}, data=b"{}")
    await api.refused("POST", "/publish", 400, re.compile(r"Invalid: .*'priority'.*"),
                      params={"priority": str(2**40)}, data=b"{}")


async def test_publish_above_the_blob_threshold_is_stored_on_disk(
    api_for: Callable[..., Any], tmp_path: Path
) -> None:
    api: Api = await api_for(storage=StorageSettings(data_dir=str(tmp_path), blob_threshold=100))
    small = orjson.dumps({"n": 1})
    large = orjson.dumps({"blob": "x" * 500})
    answers = [await api.call("POST", "/publish", data=m) for m in (small, large)]
    assert [(s, a["size"], a["stored"]) for s, a in answers] == [
        (200, len(small), "memory"), (200, len(large), "disk")]
    stats = (await api.call("GET", "/stats"))[1]
    assert (stats["total"], stats["largemessages"], stats["memoryUsage"]) == (2, 1, len(small))
    assert stats["avgmessageSize"] == round((len(small) + len(large)) / 2)
    pulled = await api.pull("default", count=2)
    assert [j["data"] for j in pulled] == [{"n": 1}, {"blob": "x" * 500}]


async def test_stats_has_the_envelope_and_the_poor_man_queue_fields(
    api_for: Callable[..., Any]
) -> None:
    api: Api = await api_for(storage=StorageSettings(memory_budget=1000))
    empty = (await api.call("GET", "/stats"))[1]
    assert empty["ok"] is True and empty["data"] == {"queued": 0, "processing": 0, "delayed": 0,
                                                     "dlq": 0}
    assert {k: empty[k] for k in ("total", "processing", "ready", "retrying", "memoryUsage",
                                  "memoryUtilization", "largemessages", "avgmessageSize")} == {
        "total": 0, "processing": 0, "ready": 0, "retrying": 0, "memoryUsage": 0,
        "memoryUtilization": "0.0%", "largemessages": 0, "avgmessageSize": 0}
    payloads: list[Any] = [{"a": 1}, "xx", [1, 2, 3], "y" * 50]
    for data in payloads[:3]:
        await api.push("st", data=data)
    await api.push("st", data=payloads[3], max_attempts=3, backoff=60_000)
    await api.push("st", data=None, delay=60_000)
    pulled = await api.pull("st", count=4)
    retried = next(j for j in pulled if j["data"] == payloads[3])
    await api.ok("POST", f"/jobs/{retried['id']}/fail", json={"error": "later"})
    status, stats = await api.call("GET", "/stats")
    assert status == 200
    assert stats["data"] == {"queued": 0, "processing": 3, "delayed": 2, "dlq": 0}
    memory = sum(size(p) for p in payloads) + size(None)
    assert {k: stats[k] for k in ("ok", "total", "processing", "ready", "retrying", "memoryUsage",
                                  "memoryUtilization", "largemessages", "avgmessageSize")} == {
        "ok": True, "total": 5, "processing": 3, "ready": 0, "retrying": 1,
        "memoryUsage": memory, "memoryUtilization": f"{100 * memory / 1000:.1f}%",
        "largemessages": 0, "avgmessageSize": round(memory / 5)}
    assert re.fullmatch(r"\d+\.\d%", stats["memoryUtilization"])


async def test_health_is_healthy_until_memory_is_nearly_spent(
    api_for: Callable[..., Any]
) -> None:
    api: Api = await api_for(storage=StorageSettings(memory_budget=1000))
    status, health = await api.call("GET", "/health")
    assert status == 200 and set(health) == {"status", "memoryOk", "queueOk", "timestamp",
                                             "role", "shard", "term", "compiled"}
    assert health["compiled"] is native.status().compiled
    assert (health["status"], health["memoryOk"], health["queueOk"]) == ("healthy", True, True)
    # a node also says its role in its shard (DESIGN §9): a single copy is standalone
    assert (health["role"], health["shard"], health["term"]) == ("standalone", "", 0)
    assert abs(health["timestamp"] - time.time() * 1000) < 60_000
    await api.push("h", data="x" * 950)
    health = (await api.call("GET", "/health"))[1]
    assert (health["status"], health["memoryOk"], health["queueOk"]) == ("warning", False, True)


# -- status codes that need a particular node -----------------------------------------------------


async def test_tokens_guard_every_route_but_health_ready_and_openapi(
    api_for: Callable[..., Any]
) -> None:
    guarded: Api = await api_for(token="secret", tokens=("secret",))
    assert await guarded.ok("GET", "/queues") == []
    bare = Api(guarded.session, guarded.node)
    wrong = Api(guarded.session, guarded.node, token="guess")
    for method, path in [("GET", "/queues"), ("POST", "/queues/q/jobs"), ("GET", "/stats"),
                         ("POST", "/publish"), ("GET", "/crons"), ("GET", "/metrics"),
                         ("GET", "/metrics.json"), ("GET", "/events"), ("GET", "/jobs/1"),
                         ("GET", "/topology"), ("DELETE", "/crons/x")]:
        await bare.refused(method, path, 401, "Authentication required", json={"data": 1})
        await bare.refused(method, path, 401, "Authentication required",
                           headers={"Authorization": "Basic c2VjcmV0"})
        await wrong.refused(method, path, 401, "Invalid token", json={"data": 1})
    assert (await bare.call("GET", "/health"))[0] == 200
    assert (await bare.call("GET", "/ready"))[0] == 200
    assert (await bare.call("GET", "/openapi.json"))[0] == 200
    assert await bare.ok("GET", "/queues", params={"token": "secret"}) == []  # for EventSource
    assert await guarded.ok("GET", "/queues") == []  # nothing got in


async def test_a_payload_over_max_payload_is_413(api_for: Callable[..., Any]) -> None:
    api: Api = await api_for(storage=StorageSettings(max_payload=1000))
    await api.push("big", data="x" * 990)
    over = "x" * 2000
    await api.refused("POST", "/queues/big/jobs", 413,
                      f"Payload too large: {size(over)} bytes (max 1000)", json={"data": over})
    await api.refused("POST", "/publish", 413, f"Payload too large: {size(over)} bytes (max 1000)",
                      data=orjson.dumps(over))
    # Past the body limit (max_payload + 64 KiB) aiohttp stops reading: still 413 and JSON.
    huge = orjson.dumps({"data": "x" * 100_000})
    for path in ("/queues/big/jobs", "/publish", "/jobs/1/ack", "/crons/c"):
        await api.refused("POST", path, 413,
                          re.compile(rf"Payload too large: \d+ bytes \(max {1000 + 65536}\)"),
                          data=huge)
    assert (await api.queue("big"))["pending"] == 1


async def test_a_full_memory_only_node_is_429_with_retry_after(
    api_for: Callable[..., Any]
) -> None:
    api: Api = await api_for(storage=StorageSettings(memory_budget=1000))
    await api.push("full", data="x" * 600)
    for path, kw in [("/queues/full/jobs", {"json": {"data": "y" * 600}}),
                     ("/publish", {"data": orjson.dumps("y" * 600)})]:
        status, headers, body = await api.raw("POST", path, **kw)
        assert status == 429 and headers.get("Retry-After") == "1"
        assert orjson.loads(body) == {"ok": False,
                                      "error": "Queue full: memory and disk budget spent"}
    assert (await api.queue("full"))["pending"] == 1


async def test_a_memory_only_node_keeps_a_payload_above_the_blob_threshold_in_memory(
    api_for: Callable[..., Any]
) -> None:
    api: Api = await api_for(storage=StorageSettings(blob_threshold=100))
    assert (await api.push("mem", data="x" * 500))["data"] == "x" * 500


async def test_a_cluster_node_that_owns_no_slot_is_not_ready_and_503s(api: Api) -> None:
    assert await api.call("GET", "/ready") == (200, {"ready": True, "reason": "ok"})
    assert await api.ok("GET", "/topology") is None  # standalone
    topo = Topology(epoch=3, nodes=[NodeInfo("node-0", f"127.0.0.1:{api.node.tcp_port}"),
                                    NodeInfo("elsewhere", "127.0.0.1:1")],
                    owners=["elsewhere"] * SLOTS)
    tcp = await RawClient.connect(api.node.tcp_port)
    try:
        answer = await tcp.call({"cmd": "SETTOPOLOGY", "topology": topo.wire()})
    finally:
        await tcp.close()
    assert answer == {"ok": True, "epoch": 3}
    assert await api.call("GET", "/ready") == (503, {"ready": False,
                                                     "reason": "owns no slots yet"})
    assert await api.ok("GET", "/topology") == topo.wire()
    status, headers, body = await api.raw("POST", "/queues/q/jobs", json={"data": 1})
    assert (status, headers.get("Retry-After")) == (503, "1")
    assert orjson.loads(body) == {"ok": False, "error": "MOVED 3"}
    await api.refused("GET", "/queues/q/jobs", 503, "MOVED 3", params={"timeout": 0})
    await api.refused("POST", "/jobs/5/ack", 503, "MOVED 3")
    assert (await api.call("GET", "/health"))[0] == 200  # alive, just not serving slots


# -- metrics --------------------------------------------------------------------------------------


async def test_metrics_is_prometheus_text_with_per_queue_counters(api: Api) -> None:
    for n in range(3):
        await api.push("m", data=n)
    await api.push("m2", data=0)
    job = (await api.pull("m"))[0]
    await api.ok("POST", f"/jobs/{job['id']}/ack")
    status, headers, body = await api.raw("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    lines = body.decode().splitlines()
    assert "# TYPE shardq_jobs_pushed_total counter" in lines
    assert 'shardq_jobs_pushed_total{queue="m"} 3.0' in lines
    assert 'shardq_jobs_pushed_total{queue="m2"} 1.0' in lines
    assert 'shardq_jobs_completed_total{queue="m"} 1.0' in lines


async def test_metrics_json_is_magicqueues_metrics(api: Api) -> None:
    for n in range(3):
        await api.push("mj", data=n)
    job = (await api.pull("mj"))[0]
    await api.ok("POST", f"/jobs/{job['id']}/ack")
    await api.pull("mj")
    metrics = await api.ok("GET", "/metrics.json")
    assert set(metrics) == {"total_pushed", "total_completed", "total_failed",
                            "jobs_per_second", "avg_latency_ms", "queues"}
    assert (metrics["total_pushed"], metrics["total_completed"], metrics["total_failed"]) \
        == (3, 1, 0)
    assert isinstance(metrics["jobs_per_second"], float)
    assert isinstance(metrics["avg_latency_ms"], float)
    assert metrics["queues"] == [{"name": "mj", "pending": 1, "processing": 1, "dlq": 0,
                                  "rate_limit": None}]


# -- Server-Sent Events ---------------------------------------------------------------------------


async def next_event(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    while True:
        line = await asyncio.wait_for(resp.content.readline(), 5)
        assert line, "the event stream ended"
        if line.startswith(b"data: "):
            event: dict[str, Any] = orjson.loads(line[6:])
            return event
        assert line in (b"\n", b": subscribed\n"), line


async def open_events(api: Api, **params: str) -> aiohttp.ClientResponse:
    resp = await api.session.get(api.base + "/events", params=params, headers=api.headers)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert await asyncio.wait_for(resp.content.readline(), 5) == b": subscribed\n"
    return resp


async def test_events_stream_a_jobs_life_filtered_by_queue_and_name(api: Api) -> None:
    filtered = await open_events(api, queue="ev", events="failed,completed")
    everything = await open_events(api)
    try:
        job = await api.push("ev", data="j", max_attempts=2)
        other = await api.push("ev-other", data="o")
        await api.pull("ev-other")
        await api.ok("POST", f"/jobs/{other['id']}/ack", json={"result": 1})
        await api.pull("ev")
        await api.ok("POST", f"/jobs/{job['id']}/progress", json={"progress": 50})
        await api.ok("POST", f"/jobs/{job['id']}/fail", json={"error": "first"})
        await api.pull("ev")
        await api.ok("POST", f"/jobs/{job['id']}/ack", json={"result": "done"})
        seen = [await next_event(filtered) for _ in range(2)]
        assert [(e["event"], e["queue"], e["job"]["id"]) for e in seen] == [
            ("failed", "ev", job["id"]), ("completed", "ev", job["id"])]
        assert set(seen[0]) == {"event", "queue", "job"} and set(seen[0]["job"]) >= JOB_KEYS
        assert seen[0]["job"]["error"] == "first" and seen[1]["job"]["state"] == "completed"
        all_seen = [await next_event(everything) for _ in range(5)]
        assert [(e["event"], e["job"]["id"]) for e in all_seen] == [
            ("completed", other["id"]), ("progress", job["id"]), ("failed", job["id"]),
            ("retrying", job["id"]), ("completed", job["id"])]
    finally:
        filtered.close()
        everything.close()


async def test_events_refuse_an_unknown_event_name_with_400(api: Api) -> None:
    await api.refused("GET", "/events", 400, "Invalid: unknown event 'nope' (known: "
                      + ", ".join(EVENTS) + ")", params={"queue": "q", "events": "completed,nope"})


async def test_events_take_the_token_as_a_query_parameter(api_for: Callable[..., Any]) -> None:
    api: Api = await api_for(tokens=("secret",))
    await api.refused("GET", "/events", 401, "Authentication required")
    resp = await open_events(api, queue="t", token="secret")
    resp.close()


async def test_stopping_a_node_ends_its_open_event_streams_at_once(
    session: aiohttp.ClientSession
) -> None:
    node = Node(settings())
    await node.start()
    try:
        resp = await open_events(Api(session, node), queue="s")
    finally:
        started = time.monotonic()
        await asyncio.wait_for(node.stop(), 10)
    assert time.monotonic() - started < 2  # not aiohttp's 60 s graceful shutdown
    assert await asyncio.wait_for(resp.content.read(), 5) == b"\n"  # then a clean end
    resp.close()


async def test_an_event_stream_whose_client_left_is_unsubscribed(api: Api) -> None:
    resp = await open_events(api, queue="gone")
    assert "gone" in api.node.events.subscribers
    resp.close()
    await eventually(lambda: subscribers(api.node, "gone") == 0, 5, 0.005,
                     what="the stream's subscription dropped")


# -- the document, and HTTP next to TCP -----------------------------------------------------------


async def test_openapi_lists_exactly_the_routes_the_server_serves(api: Api) -> None:
    status, doc = await api.call("GET", "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    runner = api.node._http
    served = {(r.method, r.resource.canonical) for r in runner.app.router.routes()
              if r.method != "HEAD" and r.resource is not None}
    assert served == documented
    operation_ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(set(operation_ids)) == len(operation_ids)


async def test_unknown_routes_and_methods_answer_json(api: Api) -> None:
    await api.refused("GET", "/no/such/route", 404, "Not found: GET /no/such/route")
    await api.refused("DELETE", "/queues/q/jobs", 405, "Invalid: Method Not Allowed")


async def test_a_job_pushed_over_http_is_pulled_over_tcp_and_acked_over_http(api: Api) -> None:
    pushed = await api.push("both", data={"via": "http"}, priority=3)
    tcp = await RawClient.connect(api.node.tcp_port)
    try:
        got = await tcp.call({"cmd": "PULL", "queue": "both", "timeout": 2000})
        assert got["ok"] is True
        assert {k: got["job"][k] for k in ("id", "queue", "data", "priority")} == {
            "id": pushed["id"], "queue": "both", "data": {"via": "http"}, "priority": 3}
        assert (await api.ok("GET", f"/jobs/{pushed['id']}"))["state"] == "active"
        # the TCP connection holds the attempt: a lease-less HTTP ack may not settle it
        # (issue 13), the attempt's lease token may
        assert await api.refused("POST", f"/jobs/{pushed['id']}/ack", 409,
                                 json={"result": "x"}) == f"Lease expired for job {pushed['id']}"
        lease = got["job"]["started_at"]
        assert await api.ok("POST", f"/jobs/{pushed['id']}/ack",
                            json={"result": [1, 2], "lease": lease}) is None
        assert await tcp.call({"cmd": "GETRESULT", "id": pushed["id"]}) == {
            "ok": True, "id": pushed["id"], "result": [1, 2]}
        assert await tcp.call({"cmd": "ACK", "id": pushed["id"]}) == {
            "ok": False, "error": f"Job {pushed['id']} not found"}
        tcp_id = (await tcp.call({"cmd": "PUSH", "queue": "both", "data": "tcp"}))["id"]
        assert [(j["id"], j["data"]) for j in await api.pull("both")] == [(tcp_id, "tcp")]
        same = await tcp.call({"cmd": "PUSH", "queue": "both", "data": 1, "priority": "x"})
        text = await api.refused("POST", "/queues/both/jobs", 400,
                                 json={"data": 1, "priority": "x"})
        assert same == {"ok": False, "error": text}  # one validation, one text
    finally:
        await tcp.close()
