"""A MagicQueue client runs unchanged against a shardq node started as a process.

``MagicQueueClient`` below talks the way MagicQueue's own Python SDK does: a
plain blocking socket, ``json.dumps(cmd) + "\\n"`` out, one line back, and
only ``ok`` and the documented fields are looked at. It uses the standard
library alone, never shardq's SDK, so these tests show that code written for
MagicQueue needs no change to use shardq.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ..helpers import free_port, start_node_process


class MagicQueueError(Exception):
    """The server answered ``ok: false``."""


class MagicQueueClient:
    """A blocking line client in the style of MagicQueue's Python SDK."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.reader = self.sock.makefile("rb")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def __enter__(self) -> MagicQueueClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self.sock.sendall((json.dumps(cmd) + "\n").encode())
        line = self.reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        response: dict[str, Any] = json.loads(line)
        if not response.get("ok"):
            raise MagicQueueError(response.get("error"))
        return response

    def push(self, queue: str, data: Any, **options: Any) -> int:
        job_id: int = self.send({"cmd": "PUSH", "queue": queue, "data": data, **options})["id"]
        return job_id

    def push_batch(self, queue: str, jobs: list[dict[str, Any]]) -> list[int]:
        ids: list[int] = self.send({"cmd": "PUSHB", "queue": queue, "jobs": jobs})["ids"]
        return ids

    def pull(self, queue: str) -> dict[str, Any]:
        """Waits until a job is there, as MagicQueue's PULL does."""
        job: dict[str, Any] = self.send({"cmd": "PULL", "queue": queue})["job"]
        return job

    def pull_batch(self, queue: str, count: int) -> list[dict[str, Any]]:
        jobs: list[dict[str, Any]] = self.send(
            {"cmd": "PULLB", "queue": queue, "count": count}
        )["jobs"]
        return jobs

    def ack(self, job_id: int, result: Any = None) -> None:
        self.send({"cmd": "ACK", "id": job_id, "result": result})

    def fail(self, job_id: int, error: str | None = None) -> None:
        self.send({"cmd": "FAIL", "id": job_id, "error": error})

    def get_result(self, job_id: int) -> Any:
        return self.send({"cmd": "GETRESULT", "id": job_id})["result"]

    def progress(self, job_id: int, progress: int, message: str | None = None) -> None:
        self.send({"cmd": "PROGRESS", "id": job_id, "progress": progress, "message": message})

    def get_progress(self, job_id: int) -> tuple[int, str | None]:
        info = self.send({"cmd": "GETPROGRESS", "id": job_id})["progress"]
        return info["progress"], info["message"]

    def dlq(self, queue: str, count: int | None = None) -> list[dict[str, Any]]:
        jobs: list[dict[str, Any]] = self.send({"cmd": "DLQ", "queue": queue, "count": count})[
            "jobs"
        ]
        return jobs

    def retry_dlq(self, queue: str, job_id: int | None = None) -> int:
        retried: int = self.send({"cmd": "RETRYDLQ", "queue": queue, "id": job_id})["ids"][0]
        return retried

    def cancel(self, job_id: int) -> None:
        self.send({"cmd": "CANCEL", "id": job_id})

    def stats(self) -> dict[str, Any]:
        return self.send({"cmd": "STATS"})


@pytest.fixture(scope="module")
def node_port() -> Iterator[int]:
    """``shardq node`` as a subprocess (memory only); stopped by its PID afterwards."""
    port = free_port()
    proc = start_node_process(port)
    try:
        yield port
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture
def client(node_port: int) -> Iterator[MagicQueueClient]:
    with MagicQueueClient("127.0.0.1", node_port) as c:
        yield c


def test_push_with_every_option_then_pull_returns_them(client: MagicQueueClient) -> None:
    parent = client.push("mq-opts-parent", {"step": 1})
    child = client.push(
        "mq-opts", {"step": 2}, priority=5, delay=0, ttl=600_000, timeout=60_000,
        max_attempts=4, backoff=100, unique_key="mq-order-1", depends_on=[parent],
    )
    with pytest.raises(MagicQueueError, match=r"^Duplicate job with key: mq-order-1$"):
        client.push("mq-opts", {"step": 2}, unique_key="mq-order-1")
    assert client.stats()["queued"] >= 1
    first = client.pull("mq-opts-parent")
    assert first["id"] == parent
    client.ack(parent, {"done": 1})  # the child may run only now
    job = client.pull("mq-opts")
    assert job["id"] == child and job["data"] == {"step": 2}
    assert (job["priority"], job["ttl"], job["timeout"]) == (5, 600_000, 60_000)
    assert (job["max_attempts"], job["backoff"]) == (4, 100)
    assert job["unique_key"] == "mq-order-1" and job["depends_on"] == [parent]
    client.ack(child)


def test_delayed_job_is_pulled_only_after_its_delay(client: MagicQueueClient) -> None:
    job_id = client.push("mq-delay", "later", delay=150)
    started = time.monotonic()
    job = client.pull("mq-delay")
    assert job["id"] == job_id
    assert time.monotonic() - started >= 0.1
    assert job["run_at"] - job["created_at"] == 150
    client.ack(job_id)


def test_higher_priority_is_pulled_first(client: MagicQueueClient) -> None:
    low = client.push("mq-prio", "low", priority=1)
    high = client.push("mq-prio", "high", priority=9)
    assert [client.pull("mq-prio")["id"] for _ in range(2)] == [high, low]
    client.ack(high)
    client.ack(low)


def test_ack_with_result_is_read_back_with_getresult(client: MagicQueueClient) -> None:
    job_id = client.push("mq-result", {"n": 21})
    job = client.pull("mq-result")
    client.progress(job_id, 50, "halfway")
    assert client.get_progress(job_id) == (50, "halfway")
    client.ack(job_id, {"answer": job["data"]["n"] * 2})
    assert client.get_result(job_id) == {"answer": 42}
    assert client.get_result(987_654_321) is None


def test_failed_job_is_retried_after_backoff_then_dead_lettered(
    client: MagicQueueClient,
) -> None:
    job_id = client.push("mq-retry", {"flaky": True}, max_attempts=2, backoff=50)
    client.fail(client.pull("mq-retry")["id"], "first failure")
    retried = client.pull("mq-retry")  # blocks until the backoff has passed
    assert retried["id"] == job_id and retried["attempts"] == 1
    client.fail(job_id, "second failure")
    (dead,) = client.dlq("mq-retry")
    assert dead["id"] == job_id and dead["attempts"] == 2
    assert client.stats()["dlq"] >= 1
    with pytest.raises(MagicQueueError, match=rf"^Job {job_id} not found$"):
        client.ack(job_id)
    assert client.retry_dlq("mq-retry") == 1
    again = client.pull("mq-retry")
    assert again["id"] == job_id and again["attempts"] == 0
    client.ack(job_id, "third time lucky")
    assert client.get_result(job_id) == "third time lucky"
    assert client.dlq("mq-retry") == []


def test_batches_and_stats(client: MagicQueueClient) -> None:
    before = client.stats()
    assert {"queued", "processing", "delayed", "dlq"} <= before.keys()
    ids = client.push_batch("mq-batch", [{"data": i} for i in range(4)])
    assert len(ids) == 4
    assert client.stats()["queued"] == before["queued"] + 4
    jobs = client.pull_batch("mq-batch", 3)
    assert [j["id"] for j in jobs] == ids[:3]
    assert client.stats()["processing"] == before["processing"] + 3
    assert client.send({"cmd": "ACKB", "ids": [j["id"] for j in jobs]})["ids"] == [3]
    client.cancel(ids[3])
    after = client.stats()
    assert (after["queued"], after["processing"]) == (before["queued"], before["processing"])


def test_errors_come_back_as_ok_false_with_the_magicqueue_texts(
    client: MagicQueueClient,
) -> None:
    with pytest.raises(MagicQueueError, match=r"^Job 5 not found$"):
        client.ack(5)
    with pytest.raises(MagicQueueError, match=r"^Invalid: "):
        client.send({"cmd": "PUSH", "queue": "mq-err"})
    with pytest.raises(MagicQueueError, match=r"^Cron job not found$"):
        client.send({"cmd": "CRONDELETE", "name": "mq-none"})
    assert client.stats()["ok"] is True  # the connection survives refusals
