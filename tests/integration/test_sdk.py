"""The SDK against a real node: async and blocking twins, workers, the ack context manager."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from shardq import (
    AsyncClient,
    AsyncQueue,
    AsyncWorker,
    Client,
    DuplicateJob,
    InvalidRequest,
    JobNotFound,
    LeaseExpired,
    Queue,
    ShardqConnectionError,
    Worker,
)
from shardq_node.runtime import Node

from ..helpers import eventually, eventually_sync, free_port, start_node_process


def address(node: Node) -> str:
    return f"127.0.0.1:{node.tcp_port}"


async def test_async_queue_push_pull_ack_with_every_option(node: Node) -> None:
    async with AsyncQueue("sdk", address(node)) as q:
        parent = await q.push({"p": 1})
        job_id = await q.push({"n": 1}, priority=5, delay=0, ttl=60_000, timeout=30_000,
                              max_attempts=3, backoff=100, unique_key="k1")
        with pytest.raises(DuplicateJob, match="k1"):
            await q.push({"n": 2}, unique_key="k1")
        child = await q.push({"c": 1}, depends_on=[parent])
        job = await q.pull(timeout=1000)
        assert job is not None and job.id == job_id and job.priority == 5
        assert job.max_attempts == 3 and job.unique_key == "k1" and job.lease == job.started_at
        await q.progress(job, 40, "working")
        assert await q.get_progress(job) == (40, "working")
        await q.ack(job, {"done": True})
        assert await q.get_result(job_id) == {"done": True}
        with pytest.raises(JobNotFound):
            await q.ack(job_id)
        assert (await q.get_job(child) or {})["state"] == "waiting-children"


async def test_pipelined_requests_on_one_connection_answer_in_order(node: Node) -> None:
    async with AsyncClient(address(node)) as c:
        ids = await asyncio.gather(*(c.push("pipe", {"i": i}) for i in range(500)))
        assert ids == sorted(ids) and len(set(ids)) == 500
        jobs = await c.pull_batch("pipe", 500, timeout=0)
        assert [j.data["i"] for j in jobs] == list(range(500))
        assert await c.ack_batch(jobs, [j.data["i"] for j in jobs]) == 500


async def test_errors_map_to_their_classes(node: Node) -> None:
    async with AsyncClient(address(node)) as c:
        with pytest.raises(InvalidRequest, match="must be between"):
            await c.push("q", 1, priority=2**40)
        job_id = await c.push("q", 1)
        job = await c.pull("q", timeout=0)
        assert job is not None
        with pytest.raises(LeaseExpired):
            await c.ack(job_id, lease=job.started_at + 1)


async def test_a_closed_server_fails_calls_with_a_connection_error() -> None:
    port = free_port()
    with pytest.raises(ShardqConnectionError, match="cannot connect"):
        async with AsyncClient(f"127.0.0.1:{port}") as c:
            await c.stats()


async def test_process_acks_on_a_clean_exit_and_fails_on_an_exception(node: Node) -> None:
    async with AsyncQueue("cm", address(node)) as q:
        await q.push({"n": 1}, max_attempts=1)
        await q.push({"n": 2}, max_attempts=1)
        job = await q.pull(timeout=0)
        assert job is not None
        async with q.process(job) as outcome:
            outcome.result = {"ok": job.data["n"]}
        assert await q.get_result(job) == {"ok": 1}
        job2 = await q.pull(timeout=0)
        assert job2 is not None
        with pytest.raises(ValueError, match="bad input"):
            async with q.process(job2):
                raise ValueError("bad input")
        dead = await q.dlq()
        assert [d.id for d in dead] == [job2.id]
        assert dead[0].error == "ValueError: bad input"


async def test_async_worker_with_concurrency_and_context(node: Node) -> None:
    async with AsyncQueue("aw", address(node)) as q:
        ids = await q.push_batch([{"data": {"n": i}} for i in range(40)])
        worker = AsyncWorker("aw", address=address(node), concurrency=8)
        running = 0
        peak = 0
        together = asyncio.Event()  # two handlers ran at once

        @worker.handler
        async def handle(job: Any, ctx: Any) -> int:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            if running > 1:
                together.set()
            await ctx.update_progress(50, "half")
            await asyncio.wait_for(together.wait(), 10)  # the first job waits for a second one
            running -= 1
            return int(job.data["n"]) * 2

        await asyncio.wait_for(worker.run(max_jobs=40, handle_signals=False), 30)
        assert worker.processed == 40 and worker.failed == 0
        assert 1 < peak <= 8
        assert [await q.get_result(i) for i in ids] == [n * 2 for n in range(40)]


async def test_a_worker_picks_up_a_new_handler_of_another_shape(node: Node) -> None:
    async with AsyncQueue("shapes", address(node)) as q:
        ids = await q.push_batch([{"data": n} for n in range(6)])
        worker = AsyncWorker("shapes", address=address(node), concurrency=2)

        async def first(job: Any) -> str:  # a coroutine, no context
            return f"async {job.data}"

        def second(job: Any, ctx: Any) -> str:  # blocking, with a context, fails on odd data
            ctx.update_progress(10)
            if job.data % 2:
                raise ValueError(f"odd {job.data}")
            return f"blocking {job.data}"

        worker.handler(first)
        await asyncio.wait_for(worker.run(max_jobs=3, handle_signals=False), 30)
        worker.handler(second)
        await asyncio.wait_for(worker.run(max_jobs=3, handle_signals=False), 30)
        assert (worker.processed, worker.failed) == (4, 2)
        assert [await q.get_result(i) for i in ids[:3]] == ["async 0", "async 1", "async 2"]
        assert [await q.get_result(i) for i in ids[3:]] == [None, "blocking 4", None]
        failed = await q.get_job(ids[3])
        assert failed is not None and failed["error"] == "ValueError: odd 3"


async def test_prefetch_leases_ahead_without_running_more_than_concurrency(node: Node) -> None:
    async with AsyncQueue("ahead", address(node)) as q:
        await q.push_batch([{"data": n} for n in range(10)])
        worker = AsyncWorker("ahead", address=address(node), concurrency=2, prefetch=3)
        running = 0
        peak = 0
        go = asyncio.Event()

        @worker.handler
        async def handle(job: Any) -> int:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await go.wait()
            running -= 1
            return int(job.data)

        task = asyncio.create_task(worker.run(max_jobs=10, handle_signals=False))

        async def leased() -> bool:
            return bool((await q.stats())["processing"] == 5)

        await eventually(leased, what="5 jobs leased by the worker")
        stats = await q.stats()
        assert (stats["processing"], stats["pending"]) == (5, 5)  # 2 running + 3 leased ahead
        assert running == 2
        go.set()
        await asyncio.wait_for(task, 30)
        assert worker.processed == 10 and peak == 2
        assert (await q.stats())["processing"] == 0


async def test_stop_is_seen_while_every_slot_is_busy(node: Node) -> None:
    async with AsyncQueue("stuck", address(node)) as q:
        await q.push_batch([{"data": n} for n in range(4)])
        worker = AsyncWorker("stuck", address=address(node), concurrency=1, prefetch=1,
                             grace=0.2)
        started: list[int] = []

        @worker.handler
        async def handle(job: Any) -> None:
            started.append(job.data)
            await asyncio.Event().wait()  # never finishes by itself

        task = asyncio.create_task(worker.run(handle_signals=False))
        await eventually(lambda: started, what="the first job started")
        worker.stop()
        await asyncio.wait_for(task, 5)  # grace, then the running job is cut off
        assert started[0] == 0 and worker.processed == 0


async def test_a_result_that_is_not_json_fails_only_its_own_job(node: Node) -> None:
    async with AsyncQueue("odd-results", address(node)) as q:
        ids = await q.push_batch([{"data": n} for n in range(4)])
        worker = AsyncWorker("odd-results", address=address(node), concurrency=4)

        @worker.handler
        async def handle(job: Any) -> Any:
            return object() if job.data == 1 else job.data * 10

        await asyncio.wait_for(worker.run(max_jobs=4, handle_signals=False), 10)
        assert (worker.processed, worker.failed) == (3, 1)
        assert [await q.get_result(ids[n]) for n in (0, 2, 3)] == [0, 20, 30]
        failed = await q.get_job(ids[1])
        assert failed is not None and failed["error"].startswith("TypeError: ")
        # the connection still pairs answers with requests
        assert await q.push({"after": True}) > ids[-1]


async def test_max_jobs_lets_every_prefetched_job_finish(node: Node) -> None:
    async with AsyncQueue("all-of-them", address(node)) as q:
        ids = await q.push_batch([{"data": n} for n in range(10)])
        worker = AsyncWorker("all-of-them", address=address(node), concurrency=1, prefetch=5,
                             grace=0.01)

        @worker.handler
        async def handle(job: Any) -> int:
            await asyncio.sleep(0.02)  # a run longer than the grace: elapsed time is under test
            return int(job.data)

        await asyncio.wait_for(worker.run(max_jobs=10, handle_signals=False), 10)
        assert worker.processed == 10
        assert [await q.get_result(i) for i in ids] == list(range(10))


async def test_a_prefetched_job_past_its_timeout_is_not_run(node: Node) -> None:
    async with AsyncQueue("late", address(node)) as q:
        first = await q.push(0)
        late = [await q.push(n, timeout=150) for n in (1, 2)]
        worker = AsyncWorker("late", address=address(node), concurrency=1, prefetch=2)
        ran: list[int] = []

        async def timed_out() -> bool:
            """The node timed the two behind it out: a counted attempt, back in the queue."""
            infos = [await q.get_job(job_id) for job_id in late]
            return all(i is not None and i["attempts"] == 1 for i in infos)

        @worker.handler
        async def handle(job: Any) -> None:
            ran.append(job.data)
            if job.data == 0:  # runs until the two prefetched behind it are past their timeout
                await eventually(timed_out, what="the prefetched jobs timed out by the node")

        await asyncio.wait_for(worker.run(max_jobs=3, handle_signals=False), 10)
        assert ran == [0] and worker.processed == 1
        assert await q.get_job(first) is not None
        for job_id in late:
            info = await q.get_job(job_id)
            assert info is not None and info["attempts"] == 1
            assert "timed out" in info["error"]


def test_blocking_twins_share_the_async_core(node_process: str) -> None:
    with Queue("sync", node_process) as q:
        ids = [q.push({"n": i}, max_attempts=2) for i in range(10)]
        worker = Worker("sync", address=node_process, concurrency=3)

        @worker.handler
        def handle(job: Any) -> Any:
            if job.data["n"] == 9:
                raise RuntimeError("nine")
            return job.data["n"] + 100

        worker.run(max_jobs=11)  # 9 fails once and is retried
        assert worker.processed == 9 and worker.failed == 2
        assert [q.get_result(i) for i in ids[:9]] == [n + 100 for n in range(9)]
        assert [j.id for j in q.dlq()] == [ids[9]]
    with Client(node_process) as c:
        assert c.stats()["dlq"] == 1
        assert [q["name"] for q in c.list_queues()] == ["sync"]


@pytest.fixture
def node_process(tmp_path: Path) -> Any:
    port = free_port()
    proc = start_node_process(port)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait()


WORKER_SCRIPT = textwrap.dedent("""
    import sys, threading
    from shardq import Worker
    worker = Worker("graceful", address=sys.argv[1], concurrency=1, poll_ms=100)
    told_to_stop = threading.Event()
    stop = worker._async.stop  # what the worker's SIGTERM handler calls

    def stop_and_tell():
        stop()
        told_to_stop.set()

    worker._async.stop = stop_and_tell

    @worker.handler
    def handle(job):
        print("started", job.data["n"], flush=True)
        told = told_to_stop.wait(30)  # the job runs until the SIGTERM has reached the worker
        print("finished" if told else "never told to stop", job.data["n"], flush=True)
        return job.data["n"]

    worker.run()
    print("exited", flush=True)
""")


def test_worker_stops_gracefully_on_sigterm(node_process: str, tmp_path: Path) -> None:
    with Queue("graceful", node_process) as q:
        ids = [q.push({"n": i}) for i in range(3)]
        script = tmp_path / "worker.py"
        script.write_text(WORKER_SCRIPT)
        proc = subprocess.Popen([sys.executable, str(script), node_process],
                                stdout=subprocess.PIPE, text=True, env=os.environ.copy())
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "started 0"
        proc.send_signal(signal.SIGTERM)  # mid-job: it must finish this one, then exit
        out = proc.communicate(timeout=30)[0]
        assert proc.returncode == 0
        assert out.split("\n")[:2] == ["finished 0", "exited"]
        assert q.get_result(ids[0]) == 0
        # the others were never started: handed back (if leased) when the worker left
        eventually_sync(lambda: q.stats()["pending"] == 2, what="the 2 other jobs pending")


async def test_a_long_job_without_timeout_keeps_its_lease(make_node: Any) -> None:
    from shardq_node.engine_config import EngineConfig
    from shardq_node.settings import NodeSettings

    node = await make_node(NodeSettings(port=0, http_port=0,
                                        engine=EngineConfig(default_lease_ms=400)))
    async with AsyncQueue("long", address(node)) as q:
        job_id = await q.push({"n": 1})
        worker = AsyncWorker("long", address=address(node), touch_every=0.1)
        runs = 0

        @worker.handler
        async def handle(job: Any) -> str:
            nonlocal runs
            runs += 1
            await asyncio.sleep(1.2)  # three times the lease: elapsed time is under test
            return "done"

        await asyncio.wait_for(worker.run(max_jobs=1, handle_signals=False), 10)
        assert runs == 1
        assert (await q.get_job(job_id) or {}).get("state") == "completed", await q.get_job(job_id)
        assert await q.get_result(job_id) == "done"
        assert (await q.get_job(job_id) or {})["state"] == "completed"
