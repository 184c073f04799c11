"""A replicated local cluster (``shardq up --replicas 3``): node processes, the failover
controller and a gateway, under a steady load through the gateway.

- SIGKILL of a shard's primary: the shard takes pushes again within seconds, and every job
  whose push was acknowledged is completed (none lost, none twice).
- A planned switchover (``shardq failover``) under load: not one request fails.
- Scaling 3 -> 5 -> 2 shards of 3 members under load: every job completed exactly once.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import pytest

from shardq import AsyncClient
from shardq.errors import ShardqError
from shardq.wire.slots import slot_of
from shardq_operator.local import LocalCluster

from ..cluster import node_call
from ..helpers import RawClient, SteadyLoad, eventually, free_port

QUEUES = [f"rep-{i}" for i in range(12)]


async def _cluster(tmp_path: Path, shards: int, failure_timeout: float = 1.0
                   ) -> tuple[LocalCluster, int]:
    port = free_port()
    cluster = LocalCluster("127.0.0.1", port, 0, str(tmp_path / "data"), "always",
                           replicas=3, failure_timeout=failure_timeout)
    await cluster.start(shards)
    return cluster, port


async def _finish(load: SteadyLoad, producers: list[asyncio.Task[None]],
                  workers: list[asyncio.Task[None]]) -> None:
    load.stop.set()
    await asyncio.wait_for(asyncio.gather(*producers), 30)
    await asyncio.wait_for(asyncio.gather(*workers), 60)
    await load.settle_unsure()


@pytest.mark.slow
async def test_a_killed_primary_is_replaced_within_seconds_and_loses_nothing(
        tmp_path: Path) -> None:
    cluster, port = await _cluster(tmp_path, 2, failure_timeout=2.0)  # the default
    try:
        # a PULL answered by the killed primary but lost with it leaves its jobs leased to
        # nobody: they come back when their lease (the job's timeout) runs out
        load = SteadyLoad(QUEUES, f"127.0.0.1:{port}", error_pause=0.01, job_timeout=2000)
        producers = [asyncio.create_task(load.produce(i)) for i in range(3)]
        workers = [asyncio.create_task(load.work(QUEUES[i::2])) for i in range(2)]
        await eventually(lambda: len(load.completed) > 200, 20, what="load running")
        topo = await cluster.current()
        assert topo is not None
        shard = topo.shards["shard-0"]
        victim = next(n for n in cluster.nodes if n.name == shard.primary)
        queue = next(q for q in (f"probe-{i}" for i in range(10_000))
                     if topo.owners[slot_of(q)] == "shard-0")  # not a load queue: same shard
        assert victim.proc is not None
        async with AsyncClient(f"127.0.0.1:{port}") as probe:
            killed = time.monotonic()
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait()

            async def pushed() -> bool:
                try:
                    await asyncio.wait_for(probe.push(queue, {"probe": True}), 5)
                    return True
                except (ShardqError, TimeoutError):
                    return False

            await eventually(pushed, 15, what="a push to the shard of the killed primary")
            back = time.monotonic() - killed
        await eventually(lambda: len(load.completed) > len(load.pushed) // 2 + 100, 20,
                         what="load going on after the failover")
        await _finish(load, producers, workers)
        after = await cluster.current()
        assert after is not None and after.shards["shard-0"].term == shard.term + 1
    finally:
        await cluster.stop()
    lost, dup = load.lost(), load.duplicates()
    print(f"\nSIGKILL of {victim.name} (primary of shard-0): pushes to it again after "
          f"{back:.2f}s (failure timeout 2 s, the default); {len(load.pushed)} pushed, "
          f"{len(load.completed)} completed, {lost} lost, {dup} twice, "
          f"{len(load.errors)} failed requests")
    assert lost == 0 and dup == 0
    assert back < 3.0, f"the shard took {back:.2f}s to take pushes again"


@pytest.mark.slow
async def test_a_planned_switchover_under_load_fails_no_request(tmp_path: Path) -> None:
    cluster, port = await _cluster(tmp_path, 1)
    try:
        load = SteadyLoad(QUEUES, f"127.0.0.1:{port}")
        producers = [asyncio.create_task(load.produce(i)) for i in range(3)]
        workers = [asyncio.create_task(load.work(QUEUES[i::2])) for i in range(2)]
        await eventually(lambda: len(load.completed) > 200, 20, what="load running")
        before = await cluster.current()
        assert before is not None
        old = before.shards["shard-0"].primary
        target = next(m for m in before.shards["shard-0"].members if m != old)
        topo = await cluster.failover("shard-0", target)
        assert topo.shards["shard-0"].primary == target
        assert topo.shards["shard-0"].term == before.shards["shard-0"].term + 1
        done = len(load.completed)
        await eventually(lambda: len(load.completed) > done + 200, 20,
                         what="load going on after the switchover")
        await _finish(load, producers, workers)
    finally:
        await cluster.stop()
    print(f"\nswitchover {old} -> {target} under load: {len(load.pushed)} pushed, "
          f"{len(load.completed)} completed, {len(load.errors)} failed requests, "
          f"longest request {load.longest * 1000:.0f} ms")
    assert load.errors == []
    assert load.lost() == 0 and load.duplicates() == 0


@pytest.mark.slow
async def test_scaling_3_to_5_to_2_shards_of_3_under_load(tmp_path: Path) -> None:
    cluster, port = await _cluster(tmp_path, 3)
    try:
        load = SteadyLoad(QUEUES, f"127.0.0.1:{port}")
        producers = [asyncio.create_task(load.produce(i)) for i in range(3)]
        workers = [asyncio.create_task(load.work(QUEUES[i::2])) for i in range(2)]
        await eventually(lambda: len(load.completed) > 100, 20, what="load running")
        topo = await cluster.scale(5, lambda d, t: None)
        assert sorted(topo.shards) == [f"shard-{i}" for i in range(5)] and not topo.moving
        assert len(topo.nodes) == 15
        await load.progressed("on 5 shards", 100)
        topo = await cluster.scale(2, lambda d, t: None)
        assert sorted(topo.shards) == ["shard-0", "shard-1"] and not topo.moving
        assert set(topo.owners) == {"shard-0", "shard-1"} and len(topo.nodes) == 6
        await load.progressed("on 2 shards", 100)
        await _finish(load, producers, workers)
    finally:
        await cluster.stop()
    print(f"\nscaling 3->5->2 shards at R=3: {len(load.pushed)} pushed, "
          f"{len(load.completed)} completed, {load.duplicates()} twice, {load.lost()} lost, "
          f"{len(load.errors)} errors {load.errors[:3]}, longest {load.longest * 1000:.0f} ms")
    assert len(load.pushed) > 300  # 100 before the scale-up, then two progressed() waits
    assert load.lost() == 0 and load.duplicates() == 0
    assert load.errors == []


@pytest.mark.slow
async def test_a_blocked_pull_follows_the_primary_across_a_switchover(tmp_path: Path) -> None:
    cluster, port = await _cluster(tmp_path, 1)
    try:
        async with AsyncClient(f"127.0.0.1:{port}") as worker, \
                AsyncClient(f"127.0.0.1:{port}") as producer:
            waiting = asyncio.ensure_future(worker.pull("blocked", timeout=20_000))
            done, _ = await asyncio.wait({waiting}, timeout=0.3)
            assert not done, "nothing to pull yet: the PULL waits"
            before = await cluster.current()
            assert before is not None
            old = before.shards["shard-0"].primary
            topo = await cluster.failover("shard-0", None)
            assert topo.shards["shard-0"].primary != old
            job_id = await producer.push("blocked", {"after": "switchover"})
            job = await asyncio.wait_for(waiting, 10)
            assert job is not None and job.id == job_id
            await worker.ack(job)
            assert await producer.get_job(job_id) is not None
    finally:
        await cluster.stop()


@pytest.mark.slow
async def test_a_push_delivered_to_a_primary_that_dies_is_never_sent_twice(
        tmp_path: Path) -> None:
    """The primary holds a PUSH it cannot commit (both followers stopped: its frames wait in
    their sockets) and is SIGKILLed while the gateway is stopped; the failover makes a
    follower primary, which reads that PUSH from its socket. Before: the gateway, resumed,
    found its connection to the dead primary closed, read the topology again, saw the new
    primary and sent the PUSH there too: one push, stored twice. Now the client is told
    the push may have been applied, and the shard holds it exactly once."""
    cluster, port = await _cluster(tmp_path, 1, failure_timeout=1.0)
    stopped: list[subprocess.Popen[bytes]] = []
    try:
        topo = await cluster.current()
        assert topo is not None and cluster.gateway is not None
        shard = topo.shards["shard-0"]
        primary = next(n for n in cluster.nodes if n.name == shard.primary)
        followers = [n for n in cluster.nodes if n.name in shard.members and n is not primary]
        queue = "delivered-once"
        async with AsyncClient(f"127.0.0.1:{port}") as c:
            await c.push("warm-up", {"warm": True})  # the gateway's links are open
        client = await RawClient.connect(port)
        try:
            for proc in [f.proc for f in followers]:
                assert proc is not None
                proc.send_signal(signal.SIGSTOP)
                stopped.append(proc)

            async def written_not_committed() -> bool:
                status = await node_call(primary.port, {"cmd": "STATUS"})
                return int(status["seq"]) > int(status["commit"])

            await client.send({"cmd": "PUSH", "queue": queue, "data": {"once": True}})
            await eventually(written_not_committed, 10,
                             what="the primary wrote the push and waits for a follower")
            cluster.gateway.send_signal(signal.SIGSTOP)
            stopped.append(cluster.gateway)
            assert primary.proc is not None
            primary.proc.send_signal(signal.SIGKILL)
            primary.proc.wait()
            for proc in stopped[:-1]:
                proc.send_signal(signal.SIGCONT)

            async def failed_over() -> bool:
                t = await cluster.current()
                return t is not None and t.shards["shard-0"].primary not in ("", primary.name)

            await eventually(failed_over, 30, what="a follower made primary")
            for proc in stopped:
                proc.send_signal(signal.SIGCONT)
            stopped.clear()
            answer = await client.recv(30)
        finally:
            await client.close()
        async with AsyncClient(f"127.0.0.1:{port}") as c:
            async def counted() -> tuple[int] | None:
                try:
                    await c.push("after", {"probe": True})
                except ShardqError:
                    return None  # the new primary is not published everywhere yet
                return (len(await c.pull_batch(queue, 10, timeout=0)),)

            (held,) = await eventually(counted, 30, what="the shard takes pushes again")
    finally:
        for proc in stopped:
            proc.send_signal(signal.SIGCONT)
        await cluster.stop()
    print(f"\nPUSH delivered to the killed primary: answered {answer}; the new primary "
          f"holds it {held} time(s)")
    assert answer["ok"] is False and "may have been applied" in answer["error"], answer
    assert held == 1, held
