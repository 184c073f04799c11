"""Locust users for shardq: TCP producers and workers on the SDK, and Poor Man Queue publishers.

    locust -f loadtest/locustfile.py --host 127.0.0.1:6789 --headless -u 50 -r 50 -t 30s \
        [--payload-bytes 200] [--queues 8] [--http-host http://127.0.0.1:6790] \
        Producer Worker Publisher

* ``Producer``: pushes jobs over TCP (``LineClient``: the SDK's codec and errors on a
  gevent-friendly socket), one PUSH per task.
* ``Worker``: pulls a batch (PULLB), acks each job; reports PULLB and ACK separately.
* ``Publisher``: ``POST /publish`` with a ~200-byte JSON message, like the Poor Man
  Queue's own load test (HTTP, locust's FastHttpUser).

Every TCP call is reported to locust's statistics as request type ``TCP``. With
``SHARDQ_LATENCY_FILE`` set, each request's exact latency (ms, float) is also
written there at the end, per name, for percentiles finer than locust's
rounded buckets. The mix is chosen on the command line (user classes and
``--producer-weight``/``--worker-weight``); every run is bounded by ``-t``.
"""

from __future__ import annotations

import os
import socket
import time
from collections import defaultdict
from typing import Any

import orjson
from locust import FastHttpUser, User, between, constant, events, task
from locust.env import Environment

from shardq.errors import ShardqError, error_from_text
from shardq.wire.job import Job

LATENCIES: dict[str, list[float]] = defaultdict(list)


@events.init_command_line_parser.add_listener
def _arguments(parser: Any) -> None:
    parser.add_argument("--payload-bytes", type=int, default=200, help="size of each job's data")
    parser.add_argument("--queues", type=int, default=8, help="queues to spread jobs over")
    parser.add_argument("--http-host", default="http://127.0.0.1:6790",
                        help="HTTP base URL for Publisher")
    parser.add_argument("--publish-rate", type=float, default=0.0,
                        help="requests/s per Publisher (0 = as fast as it can)")
    parser.add_argument("--producer-weight", type=int, default=1)
    parser.add_argument("--worker-weight", type=int, default=1)


@events.init.add_listener
def _weights(environment: Environment, **_: Any) -> None:
    opts = environment.parsed_options
    if opts is not None:
        Producer.weight = opts.producer_weight
        Worker.weight = opts.worker_weight
        Publisher.host = opts.http_host


@events.request.add_listener
def _record(name: str, response_time: float, exception: Any, **_: Any) -> None:
    if exception is None and os.environ.get("SHARDQ_LATENCY_FILE"):
        LATENCIES[name].append(response_time)


@events.quitting.add_listener
def _write_latencies(environment: Environment, **_: Any) -> None:
    path = os.environ.get("SHARDQ_LATENCY_FILE")
    if not path:
        return
    out = {}
    for name, values in LATENCIES.items():
        values.sort()
        n = len(values)
        out[name] = {"count": n, **{f"p{q}": values[min(n - 1, int(n * q / 100))]
                                    for q in (50, 90, 99)}} if n else {"count": 0}
    with open(path, "wb") as f:
        f.write(orjson.dumps(out))


def payload(size: int) -> dict[str, Any]:
    data: dict[str, Any] = {"type": "user_registration", "userId": "12345",
                            "email": "user@example.com", "pad": ""}
    data["pad"] = "x" * max(0, size - len(orjson.dumps(data)))
    return data


class LineClient:
    """A blocking client of the TCP protocol built on the SDK's job model and error tree.

    Locust runs users as gevent greenlets; the SDK's blocking ``shardq.Client`` runs an
    asyncio loop on a thread of its own, which gevent's patched threads cannot host
    for many users at once. So the load test speaks the same lines over a plain
    (gevent-patched, cooperative) socket and maps answers with ``shardq.errors``.
    """

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self.sock = socket.create_connection((host or "127.0.0.1", int(port)), timeout=30)
        self.file = self.sock.makefile("rb")

    def call(self, req: dict[str, Any]) -> dict[str, Any]:
        self.sock.sendall(orjson.dumps(req) + b"\n")
        answer: dict[str, Any] = orjson.loads(self.file.readline())
        if answer.get("ok") is False:
            raise error_from_text(str(answer.get("error")))
        return answer

    def push(self, queue: str, data: Any) -> int:
        return int(self.call({"cmd": "PUSH", "queue": queue, "data": data})["id"])

    def pull_batch(self, queue: str, count: int, timeout: int) -> list[Job]:
        answer = self.call({"cmd": "PULLB", "queue": queue, "count": count, "timeout": timeout})
        return [Job.from_wire(j) for j in answer["jobs"]]

    def ack(self, job: Job, result: Any) -> None:
        self.call({"cmd": "ACK", "id": job.id, "result": result, "lease": job.lease})

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class _TcpUser(User):
    abstract = True

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.client = LineClient(self.host or "127.0.0.1:6789")
        self.queues = [f"load-{i}" for i in range(opts.queues if opts else 8)]
        self.data = payload(opts.payload_bytes if opts else 200)
        self.n = 0

    def on_stop(self) -> None:
        self.client.close()

    def _call(self, name: str, fn: Any, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            result = fn(*args)
        except (ShardqError, OSError) as exc:
            self._report(name, started, exc)
            return None
        self._report(name, started, None)
        return result

    def _report(self, name: str, started: float, exc: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type="TCP", name=name, response_time=(time.perf_counter() - started) * 1000,
            response_length=0, exception=exc, context={},
        )


class Producer(_TcpUser):
    wait_time = constant(0)

    @task
    def push(self) -> None:
        self.n += 1
        self._call("PUSH", self.client.push, self.queues[self.n % len(self.queues)], self.data)


class Worker(_TcpUser):
    wait_time = between(0, 0.002)

    @task
    def work(self) -> None:
        self.n += 1
        queue = self.queues[self.n % len(self.queues)]
        jobs = self._call("PULLB", self.client.pull_batch, queue, 20, 0) or []
        for job in jobs:
            self._call("ACK", self.client.ack, job, {"ok": True})


class Publisher(FastHttpUser):
    """``POST /publish`` like the Poor Man Queue's load test (~200-byte messages)."""

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.url = f"{opts.http_host if opts else 'http://127.0.0.1:6790'}/publish?queue=pmq"
        self.body = orjson.dumps(payload(opts.payload_bytes if opts else 200))
        rate = opts.publish_rate if opts else 0.0
        self._gap = 1.0 / rate if rate > 0 else 0.0
        self._next = time.perf_counter()

    def wait_time(self) -> float:  # a constant rate per user when --publish-rate is set
        if not self._gap:
            return 0.0
        self._next += self._gap
        return max(0.0, self._next - time.perf_counter())

    @task
    def publish(self) -> None:
        with self.client.post(self.url, data=self.body,
                              headers={"Content-Type": "application/json"},
                              name="/publish", catch_response=True) as resp:
            if resp.status_code != 200 or b'"stored"' not in (resp.content or b""):
                resp.failure(f"{resp.status_code}: {(resp.content or b'')[:200]!r}")
