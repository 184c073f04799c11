"""SIGKILL a node at random instants under load; nothing it acknowledged may be lost.

The node runs as a subprocess with ``fsync=always`` and small segments and
snapshot thresholds, so kills land in every phase: group commits, segment
rotation, forked snapshots, recovery itself. A ledger of what the node
answered is checked against what comes back after each restart.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from ..helpers import RawClient, eventually_sync, free_port, port_free, start_node_process

ROUNDS = int(os.environ.get("SHARDQ_CRASH_ROUNDS", "20"))
QUEUE = "crash"


@dataclass
class Ledger:
    pushed: dict[int, int] = field(default_factory=dict)  # id -> n (answered ok)
    ids_seen: list[int] = field(default_factory=list)  # every id ever handed out
    ack_sent: set[int] = field(default_factory=set)
    acked: set[int] = field(default_factory=set)  # ACK answered ok
    dead: set[int] = field(default_factory=set)  # FAIL answered ok on a max_attempts=1 job
    next_n: int = 0
    checked: dict[str, int] = field(default_factory=dict)


@pytest.fixture
def node_proc(tmp_path: Path) -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []
    port = free_port()
    log = open(tmp_path / "node.log", "ab")  # noqa: SIM115 - closed in teardown

    def start() -> subprocess.Popen[bytes]:
        # A snapshot child forked just before the SIGKILL holds the dead node's listening socket
        # until it closes its descriptors, a moment later (node behaviour, reported with issue
        # 14's tests): the node started again could not bind the port until then.
        eventually_sync(lambda: port_free(port), what=f"port {port} released by the killed node")
        proc = start_node_process(
            port, "--data-dir", str(tmp_path / "data"), "--fsync", "always",
            "--segment-bytes", "32768", "--snapshot-bytes", "65536", log=log,
        )
        procs.append(proc)
        return proc

    start.port = port  # type: ignore[attr-defined]
    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log.close()


async def produce(client: RawClient, ledger: Ledger, stop: asyncio.Event) -> None:
    """Pipelined pushes, 32 in flight; every 5th job may die on its first failure."""
    while not stop.is_set():
        batch = []
        for _ in range(32):
            n = ledger.next_n
            ledger.next_n += 1
            req: dict[str, Any] = {"cmd": "PUSH", "queue": QUEUE, "data": {"n": n},
                                   "unique_key": f"k{n}"}
            if n % 5 == 0:
                req["max_attempts"] = 1
            elif n % 7 == 0:
                req.update(max_attempts=3, backoff=5)
            batch.append((n, req))
        await client.send(*(r for _, r in batch))
        for n, _ in batch:
            answer = await client.recv()
            assert answer["ok"] is True, answer
            ledger.pushed[answer["id"]] = n
            ledger.ids_seen.append(answer["id"])
        await asyncio.sleep(0.002)  # pacing: leave the worker room to keep up (not a wait)


async def work(client: RawClient, ledger: Ledger, stop: asyncio.Event) -> None:
    """Pull in batches; fail n % 5 == 0 (dies at once) and n % 7 == 0 (retried); ack the rest."""
    while not stop.is_set():
        answer = await client.call({"cmd": "PULLB", "queue": QUEUE, "count": 64, "timeout": 20})
        jobs = answer["jobs"]
        reqs = []
        for job in jobs:
            n = job["data"]["n"]
            if n % 5 == 0:
                reqs.append(("dead", job["id"], {"cmd": "FAIL", "id": job["id"], "error": "x",
                                                 "lease": job["started_at"]}))
            elif n % 7 == 0:
                reqs.append(("retry", job["id"], {"cmd": "FAIL", "id": job["id"],
                                                  "lease": job["started_at"]}))
            else:
                ledger.ack_sent.add(job["id"])
                reqs.append(("ack", job["id"], {"cmd": "ACK", "id": job["id"],
                                                "result": {"n": n}, "lease": job["started_at"]}))
        await client.send(*(r for _, _, r in reqs))
        for kind, job_id, _ in reqs:
            answer = await client.recv()
            assert answer["ok"] is True, answer
            if kind == "ack":
                ledger.acked.add(job_id)
            elif kind == "dead":
                ledger.dead.add(job_id)


async def load_then_kill(port: int, proc: subprocess.Popen[bytes], ledger: Ledger,
                         seconds: float) -> None:
    producer = await RawClient.connect(port)
    worker = await RawClient.connect(port)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(produce(producer, ledger, stop)),
             asyncio.create_task(work(worker, ledger, stop))]
    await asyncio.sleep(seconds)  # the random instant of the kill is what is under test
    proc.send_signal(signal.SIGKILL)  # mid-flight: answers on the wire are lost with it
    proc.wait()
    stop.set()
    for task in tasks:
        try:
            await asyncio.wait_for(task, 5)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
    await producer.close()
    await worker.close()


async def verify(port: int, ledger: Ledger) -> None:
    client = await RawClient.connect(port)
    try:
        await check(client, ledger)
    finally:  # also when a check fails: a socket left open would fail a later test
        await client.close()


async def check(client: RawClient, ledger: Ledger) -> None:
    ids = sorted(ledger.pushed)
    await client.send(*({"cmd": "GETJOB", "id": i} for i in ids))
    states: dict[str, int] = {}
    for job_id in ids:
        answer = await client.recv()
        job = answer["job"]
        assert job is not None, f"job {job_id} was acknowledged at push but is gone"
        state = job["state"]
        states[state] = states.get(state, 0) + 1
        if job_id in ledger.acked:
            assert state == "completed", f"acked job {job_id} came back as {state}"
        if state == "completed":
            assert job_id in ledger.ack_sent, f"job {job_id} completed without an ack"
        if job_id in ledger.dead:
            assert state == "dead", f"dead job {job_id} came back as {state}"
    # unique keys of live and dead jobs still refuse duplicates
    live = [i for i in ids if i not in ledger.ack_sent][-20:]
    for job_id in live:
        n = ledger.pushed[job_id]
        answer = await client.call({"cmd": "PUSH", "queue": QUEUE, "data": 0,
                                    "unique_key": f"k{n}"})
        assert answer == {"ok": False, "error": f"Duplicate job with key: k{n}"}
    dlq = await client.call({"cmd": "DLQ", "queue": QUEUE, "count": 100_000})
    assert ledger.dead <= {j["id"] for j in dlq["jobs"]}
    for state, count in states.items():
        ledger.checked[state] = ledger.checked.get(state, 0) + count


async def test_sigkill_at_random_instants_loses_no_acknowledged_job(node_proc: Any) -> None:
    rnd = random.Random(int(os.environ.get("SHARDQ_CRASH_SEED", "7")))
    ledger = Ledger()
    port = node_proc.port
    proc = node_proc()
    for _ in range(ROUNDS):
        await load_then_kill(port, proc, ledger, rnd.uniform(0.15, 0.8))
        proc = node_proc()
        await verify(port, ledger)
    assert len(ledger.ids_seen) == len(set(ledger.ids_seen)), "an id was handed out twice"
    assert len(ledger.pushed) > 1000 and ledger.acked and ledger.dead
    print(
        f"\n{ROUNDS} SIGKILL rounds: {len(ledger.pushed)} acknowledged pushes checked, "
        f"{len(ledger.acked)} acknowledged acks never came back, {len(ledger.dead)} dead "
        f"jobs still in the DLQ; states seen over all checks "
        f"{orjson.dumps(ledger.checked).decode()}"
    )


async def test_a_node_stopped_with_sigterm_writes_nothing_after_its_log_closed(
        node_proc: Any, tmp_path: Path) -> None:
    """A graceful stop with a worker still connected: the node used to release the worker's
    lease into its closed WAL (`storage failed … Bad file descriptor` on every stop). Now it
    writes nothing once stopping, and a single copy releases the job when it starts again."""
    proc = node_proc()
    worker = await RawClient.connect(node_proc.port)
    pushed = await worker.call({"cmd": "PUSH", "queue": QUEUE, "data": {"n": 1}})
    pulled = await worker.call({"cmd": "PULL", "queue": QUEUE, "timeout": 0})
    job = pulled["job"]
    assert (pushed["ok"], job["id"], job["state"]) == (True, pushed["id"], "active")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    await worker.close()
    log = (tmp_path / "node.log").read_text()
    assert "stopping" in log and "storage failed" not in log, log

    node_proc()
    client = await RawClient.connect(node_proc.port)
    try:
        state = await client.call({"cmd": "GETJOB", "id": job["id"]})
        assert state["job"]["state"] == "waiting", state
        again = await client.call({"cmd": "PULL", "queue": QUEUE, "timeout": 0})
        assert again["job"]["id"] == job["id"], again
    finally:
        await client.close()
