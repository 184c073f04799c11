"""A node with a data directory: blobs, budgets, disk failures, and what a restart brings back."""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from shardq import AsyncClient
from shardq.errors import DuplicateJob, QueueFull, StorageFailed
from shardq_node.runtime import Node
from shardq_node.settings import NodeSettings, StorageSettings
from shardq_node.wal import Files

from ..helpers import (
    FakeClock,
    RawClient,
    eventually,
    free_port,
    require,
    run_timers,
    start_node_process,
)


class FaultyFiles(Files):
    """The real file layer, with an error to raise on the next writes/fsyncs when armed."""

    def __init__(self, fsync_delay: float = 0.0) -> None:
        self.write_error: int | None = None
        self.fsync_error: int | None = None
        self.fsync_delay = fsync_delay  # a slow disk: every fsync takes at least this long
        self.fsync_threads: list[int] = []  # the thread of each fsync, in order

    def write(self, fd: int, data: bytes) -> None:
        if self.write_error is not None:
            raise OSError(self.write_error, os.strerror(self.write_error))
        super().write(fd, data)

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        if self.write_error is not None:
            raise OSError(self.write_error, os.strerror(self.write_error))
        super().pwrite(fd, data, offset)

    def fsync(self, fd: int) -> None:
        self.fsync_threads.append(threading.get_ident())
        if self.fsync_delay:
            time.sleep(self.fsync_delay)  # the slow disk under test: elapsed time, not a wait
        if self.fsync_error is not None:
            raise OSError(self.fsync_error, os.strerror(self.fsync_error))
        super().fsync(fd)


def storage(tmp: Path, **kw: Any) -> NodeSettings:
    return NodeSettings(port=0, http_port=0,
                        storage=StorageSettings(data_dir=str(tmp), retry_seconds=0.1, **kw))


@pytest.fixture
async def started() -> AsyncIterator[list[Node]]:
    nodes: list[Node] = []
    yield nodes
    for n in nodes:
        await n.stop()


async def start(nodes: list[Node], settings: NodeSettings, files: Files | None = None,
                clock: FakeClock | None = None) -> Node:
    node = Node(settings, files=files) if clock is None else Node(settings, clock, files=files)
    await node.start()
    nodes.append(node)
    return node


# -- blob store --------------------------------------------------------------------------------


async def test_payload_above_threshold_lives_on_disk_and_comes_back_on_pull(
    tmp_path: Path, started: list[Node]
) -> None:
    node = await start(started, storage(tmp_path, blob_threshold=1000))
    async with AsyncClient(f"127.0.0.1:{node.tcp_port}") as c:
        small = await c.push("q", {"s": "x" * 10})
        big = await c.push("q", {"s": "y" * 5000})
        assert node.storage is not None
        assert node.storage.blobs.count == 1
        assert os.path.exists(node.storage.blobs.path(big))
        assert node.engine.payload_bytes < 100
        jobs = await c.pull_batch("q", 2)
        assert [j.data["s"][:1] for j in jobs] == ["x", "y"]
        assert jobs[1].data == {"s": "y" * 5000}
        await c.ack(jobs[1])
        await c.ack(jobs[0])
        blob = node.storage.blobs.path(big)
        await eventually(lambda: not os.path.exists(blob), what="the finished job's blob removed")
        assert node.storage.blobs.used == 0
        assert small


async def test_memory_budget_spent_sends_even_small_payloads_to_disk(
    tmp_path: Path, started: list[Node]
) -> None:
    node = await start(started, storage(tmp_path, memory_budget=2000))
    async with AsyncClient(f"127.0.0.1:{node.tcp_port}") as c:
        ids = [await c.push("q", {"i": i, "pad": "z" * 80}) for i in range(60)]
        assert node.storage is not None
        assert node.engine.payload_bytes <= 2000
        assert node.storage.blobs.count >= 30
        pulled = await c.pull_batch("q", 100)
        assert [j.id for j in pulled] == ids
        assert [j.data["i"] for j in pulled] == list(range(60))


async def test_disk_budget_spent_refuses_pushes_with_queue_full(
    tmp_path: Path, started: list[Node]
) -> None:
    node = await start(started, storage(tmp_path, memory_budget=1000, disk_budget=5000))
    async with AsyncClient(f"127.0.0.1:{node.tcp_port}") as c:
        accepted = 0
        with pytest.raises(QueueFull, match="Queue full: memory and disk budget spent"):
            for i in range(100):
                await c.push("q", {"i": i, "pad": "z" * 400})
                accepted += 1
        assert 5 <= accepted < 100
        stats = await c.stats()
        assert stats["queued"] == accepted  # the refused push left nothing behind


async def test_memory_only_node_refuses_past_its_memory_budget(started: list[Node]) -> None:
    settings = NodeSettings(port=0, http_port=0, storage=StorageSettings(memory_budget=3000))
    node = await start(started, settings)
    async with AsyncClient(f"127.0.0.1:{node.tcp_port}") as c:
        with pytest.raises(QueueFull):
            for _ in range(100):
                await c.push("q", "x" * 500)
        assert (await c.stats())["queued"] == 5


async def test_blob_jobs_survive_a_restart(tmp_path: Path, started: list[Node]) -> None:
    node = await start(started, storage(tmp_path, blob_threshold=100))
    async with AsyncClient(f"127.0.0.1:{node.tcp_port}") as c:
        big = await c.push("q", {"big": "b" * 1000})
        done = await c.push("q", {"big": "c" * 1000})
        job = await c.pull("q", timeout=0)
        assert job is not None and job.id == big
        j2 = await c.pull("q", timeout=0)
        assert j2 is not None and j2.id == done
        await c.ack(j2)
    await node.stop()
    started.remove(node)
    node2 = await start(started, storage(tmp_path, blob_threshold=100))
    assert node2.storage is not None and node2.storage.blobs.count == 1
    async with AsyncClient(f"127.0.0.1:{node2.tcp_port}") as c:
        again = await c.pull("q", timeout=0)
        assert again is not None and again.id == big and again.data == {"big": "b" * 1000}
        assert again.attempts == 1  # it was active at the stop: a counted attempt


# -- disk failures ------------------------------------------------------------------------------


@pytest.mark.parametrize("disk", ["fast", "slow"])
@pytest.mark.parametrize("where", ["write", "fsync"])
async def test_failing_disk_refuses_writes_serves_reads_and_acknowledges_nothing_lost(
    tmp_path: Path, started: list[Node], where: str, disk: str
) -> None:
    files = FaultyFiles(fsync_delay=0.004 if disk == "slow" else 0.0)
    node = await start(started, storage(tmp_path), files)
    raw = await RawClient.connect(node.tcp_port)
    ok = await raw.call({"cmd": "PUSH", "queue": "q", "data": "kept"})
    assert ok["ok"] is True
    setattr(files, f"{where}_error", errno.EIO)
    lost = await raw.call({"cmd": "PUSH", "queue": "q", "data": "lost", "reqId": "r1"})
    assert lost["ok"] is False and lost["reqId"] == "r1"
    assert lost["error"].startswith("Storage failed: ")
    assert "Input/output error" in lost["error"]
    refused = await raw.call({"cmd": "PUSH", "queue": "q", "data": "refused"})
    assert refused["error"].startswith("Storage failed: ")
    pulled = await raw.call({"cmd": "PULL", "queue": "q", "timeout": 0})
    assert pulled["error"].startswith("Storage failed: ")
    stats = await raw.call({"cmd": "STATS"})
    assert stats["ok"] is True and stats["queued"] == 1  # reads still served, "lost" is gone
    setattr(files, f"{where}_error", None)

    async def accepted() -> bool:  # once the node's probe (every 0.1 s here) finds the disk back
        answer = await raw.call({"cmd": "PUSH", "queue": "q", "data": "after"})
        return answer["ok"] is True

    await eventually(accepted, what="a PUSH accepted once the disk works again")
    await raw.close()
    await node.stop()
    started.remove(node)
    node2 = await start(started, storage(tmp_path))
    async with AsyncClient(f"127.0.0.1:{node2.tcp_port}") as c:
        jobs = await c.pull_batch("q", 10, timeout=0)
        assert [j.data for j in jobs] == ["kept", "after"]


async def test_failed_write_answers_every_pipelined_request_of_its_group(
    tmp_path: Path, started: list[Node]
) -> None:
    files = FaultyFiles()
    node = await start(started, storage(tmp_path), files)
    raw = await RawClient.connect(node.tcp_port)
    files.fsync_error = errno.ENOSPC
    await raw.send(*({"cmd": "PUSH", "queue": "q", "data": i} for i in range(20)))
    answers = [await raw.recv() for _ in range(20)]
    assert all(a["ok"] is False for a in answers)
    assert all("No space left on device" in a["error"] for a in answers)
    await raw.close()


async def test_group_commit_fsyncs_on_the_loop_for_a_fast_disk_and_in_a_thread_for_a_slow_one(
    tmp_path: Path, started: list[Node]
) -> None:
    files = FaultyFiles()
    node = await start(started, storage(tmp_path), files)
    raw = await RawClient.connect(node.tcp_port)
    loop_thread = threading.get_ident()  # the in-process node runs on the test's loop

    async def pipelined(first: int) -> list[int]:
        await raw.send(*({"cmd": "PUSH", "queue": "q", "data": first + i} for i in range(20)))
        answers = [await raw.recv() for _ in range(20)]
        assert all(a["ok"] is True for a in answers), answers
        return [a["id"] for a in answers]

    ids = await pipelined(0)
    assert set(files.fsync_threads) == {loop_thread}
    files.fsync_threads.clear()
    # a blob's fsync (up to megabytes to write back) never blocks the loop, fast disk or not
    blob = await raw.call({"cmd": "PUSH", "queue": "blobs", "data": "x" * 100_000})
    assert blob["ok"] is True and files.fsync_threads[-1] != loop_thread
    files.fsync_threads.clear()
    files.fsync_delay = 0.004  # the disk slows down: fsyncs move off the loop
    for r in range(1, 8):
        ids += await pipelined(r * 20)
    assert files.fsync_threads[-1] != loop_thread
    # a slow fsync no longer blocks reads
    stats = await raw.call({"cmd": "STATS"})
    assert stats["queued"] == 161
    await raw.close()
    await node.stop()
    started.remove(node)
    node2 = await start(started, storage(tmp_path))
    async with AsyncClient(f"127.0.0.1:{node2.tcp_port}") as c:
        jobs = await c.pull_batch("q", 200, timeout=0)
        assert sorted(j.data for j in jobs) == list(range(160))
        assert sorted(j.id for j in jobs) == sorted(ids)


# -- a real full disk -----------------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a real filesystem that runs out of space (needs root)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True)
    require(proc.returncode == 0, f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_really_full_disk_refuses_writes_and_loses_nothing_acknowledged(
    tiny_disk: Path,
) -> None:
    port = free_port()
    data = tiny_disk / "data"
    proc = start_node_process(port, "--data-dir", str(data), "--fsync", "always")
    acked: list[int] = []
    errors: set[str] = set()
    try:
        raw = await RawClient.connect(port)
        for i in range(400):
            req = {"cmd": "PUSH", "queue": "q", "data": {"i": i, "p": "f" * 8000}}
            answer = await raw.call(req)
            if answer["ok"]:
                acked.append(answer["id"])
            else:
                errors.add(answer["error"].split(":")[0])
        stats = await raw.call({"cmd": "STATS"})
        assert stats["ok"] is True  # reads still answered on a full disk
        await raw.close()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert errors == {"Storage failed"}, errors
    assert 50 < len(acked) < 400
    # make room, as an operator would, and start again: every acknowledged push is there
    shutil.copytree(data, tiny_disk.parent / "copy")
    proc = start_node_process(port, "--data-dir", str(tiny_disk.parent / "copy"))
    try:
        raw = await RawClient.connect(port)
        await raw.send(*({"cmd": "GETJOB", "id": i} for i in acked))
        for job_id in acked:
            answer = await raw.recv()
            assert answer["job"] is not None, f"acknowledged job {job_id} lost"
        await raw.close()
    finally:
        proc.terminate()
        proc.wait()


# -- everything comes back after SIGKILL ---------------------------------------------------------


async def test_every_state_and_setting_comes_back_after_sigkill(tmp_path: Path) -> None:
    port = free_port()
    args = ("--data-dir", str(tmp_path / "d"), "--blob-threshold", "500")
    proc = start_node_process(port, *args)
    try:
        async with AsyncClient(f"127.0.0.1:{port}") as c:
            waiting = await c.push("q", {"w": 1}, unique_key="uw")
            delayed = await c.push("q", {"d": 1}, delay=3_600_000)
            parent = await c.push("p", {"p": 1})
            child = await c.push("q", {"c": 1}, depends_on=[parent])
            dead = await c.push("dq", {"x": 1}, max_attempts=1, unique_key="ud")
            job = await c.pull("dq", timeout=0)
            assert job is not None
            await c.fail(job, "broken")
            done = await c.push("r", {"r": 1})
            rjob = await c.pull("r", timeout=0)
            assert rjob is not None
            await c.ack(rjob, {"result": 42})
            active = await c.push("a", "x" * 1000)
            assert (await c.pull("a", timeout=0)) is not None
            await c.pause("paused")
            await c.set_rate_limit("limited", 7)
            await c.set_concurrency("limited", 3)
            await c.add_cron("nightly", "cq", "0 3 * * *", {"n": 1})
            last_id = await c.push("q", "last")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc = start_node_process(port, *args)
    try:
        async with AsyncClient(f"127.0.0.1:{port}") as c:
            states = {k: (await c.get_job(v) or {}).get("state") for k, v in {
                "waiting": waiting, "delayed": delayed, "child": child, "dead": dead,
                "done": done, "active": active, "parent": parent}.items()}
            assert states == {"waiting": "waiting", "delayed": "delayed",
                              "child": "waiting-children", "dead": "dead", "done": "completed",
                              "active": "waiting", "parent": "waiting"}
            assert await c.get_result(done) == {"result": 42}
            dlq = await c.dlq("dq")
            assert [j.id for j in dlq] == [dead] and dlq[0].error == "broken"
            with pytest.raises(DuplicateJob):
                await c.push("q", 1, unique_key="uw")
            with pytest.raises(DuplicateJob):
                await c.push("dq", 1, unique_key="ud")
            queues = {q["name"]: q for q in await c.list_queues()}
            assert queues["paused"]["paused"] is True
            assert queues["limited"]["rate_limit"] == 7
            assert queues["limited"]["concurrency_limit"] == 3
            assert [x["name"] for x in await c.list_crons()] == ["nightly"]
            again = await c.pull("a", timeout=0)
            assert again is not None and again.attempts == 1 and again.data == "x" * 1000
            new_id = await c.push("q", "new")
            assert new_id > last_id  # the id counter came back: no id is reused
            pj = await c.pull("p", timeout=0)
            assert pj is not None
            await c.ack(pj)
            cj = await c.pull("q", timeout=0)
            assert cj is not None and cj.id == waiting
    finally:
        proc.terminate()
        proc.wait()


def test_storage_failed_error_maps_to_its_class() -> None:
    from shardq.errors import error_from_text

    assert isinstance(error_from_text("Storage failed: disk full"), StorageFailed)


async def test_a_cron_fires_exactly_once_per_tick_across_a_crash(
    tmp_path: Path, started: list[Node], clock: FakeClock
) -> None:
    """On the fake clock: a real node with a real log, its data dir copied while it runs (what a
    SIGKILL leaves once the fires are durable), and a node started on the copy."""
    data, crashed = tmp_path / "d", tmp_path / "crashed"
    t0 = clock.now
    node = await start(started, storage(data, segment_bytes=1 << 20), clock=clock)
    async with AsyncClient(f"127.0.0.1:{node.tcp_port}") as c:
        await c.add_cron("tick", "ticks", "*/1", {"t": 1})
    for _ in range(3):
        clock.advance(1000)
        run_timers(node)
        run_timers(node)  # a second look at the same instant fires nothing more
    await eventually(lambda: node.log.durable == node.log.seq, what="every fire on disk")
    # a spare segment being zero-filled (in a thread) is not part of the log: left behind
    shutil.copytree(data, crashed, ignore=shutil.ignore_patterns("*.spare", "*.part"))
    await node.stop()
    started.remove(node)

    again = await start(started, storage(crashed, segment_bytes=1 << 20), clock=clock)
    run_timers(again)  # back at the instant of the crash: the last tick is not fired again
    async with AsyncClient(f"127.0.0.1:{again.tcp_port}") as c:
        assert {q["name"]: q["pending"] for q in await c.list_queues()} == {"ticks": 3}
        clock.advance(5_500)  # five ticks missed: they fire once, together
        run_timers(again)
        clock.advance(1000)
        run_timers(again)
        jobs = await c.pull_batch("ticks", 100, timeout=0)
    assert [j.created_at - t0 for j in jobs] == [1000, 2000, 3000, 8500, 9500]
    assert all(j.data == {"t": 1} for j in jobs)


async def test_a_real_node_fires_a_cron_in_real_time_across_a_sigkill(tmp_path: Path) -> None:
    """The one cron test on the real clock: a node process fires ``*/1`` every second, is
    SIGKILLed, and fires again after its restart without firing a tick twice."""
    port = free_port()
    args = ("--data-dir", str(tmp_path / "d"))

    seen = 0

    async def fired(c: AsyncClient, ticks: int) -> bool:
        nonlocal seen
        seen = sum(q["pending"] for q in await c.list_queues() if q["name"] == "ticks")
        return seen >= ticks

    proc = start_node_process(port, *args)
    try:
        async with AsyncClient(f"127.0.0.1:{port}") as c:
            await c.add_cron("tick", "ticks", "*/1", {"t": 1})
            await eventually(lambda: fired(c, 2), 15, 0.1, what="two ticks fired",
                             hint=lambda: f"{seen} fired")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc = start_node_process(port, *args)
    try:
        async with AsyncClient(f"127.0.0.1:{port}") as c:
            await fired(c, 0)
            before = seen
            assert before >= 2
            await eventually(lambda: fired(c, before + 2), 15, 0.1,
                             what="two more ticks fired after the restart",
                             hint=lambda: f"{seen} fired")
            jobs = await c.pull_batch("ticks", 100, timeout=0)
    finally:
        proc.terminate()
        proc.wait()
    times = sorted(j.created_at for j in jobs)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 900, f"a tick fired twice: gaps {gaps} ms"
