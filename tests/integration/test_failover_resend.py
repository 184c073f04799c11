"""Issue 17: a request the killed primary may have run is never sent again by the gateway.

The duplicate completion seen on Kubernetes after a primary SIGKILL: with tokens configured
(every pod of the operator's gets one) the gateway authenticates each node connection, and
the AUTH answer was taken off the count of requests written on it although the AUTH write
had never been counted. Every later request counted one short, so when the connection
dropped, the last request written passed for never sent and went again to the new primary:
a PUSH the killed primary had applied (and the new primary held) made a second job.

Here the moment is made on purpose (real processes, ``shardq up --replicas 3`` as
``LocalCluster`` runs it, with a client token): the followers are SIGSTOPped so the primary
writes a PUSH but cannot confirm it, the primary is SIGKILLed with the PUSH written and
unanswered, started again on its data directory (as the kubelet does), and the followers
resumed. The primary that comes back holds the PUSH; whichever member is elected, the queue
must hold that payload at most once, and exactly once if the push was answered ok.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest

from shardq import AsyncClient
from shardq.errors import ShardqError
from shardq.wire.slots import slot_of
from shardq_operator.local import LocalCluster, _wait_port

from ..helpers import eventually, free_port

TOKEN = "failover-resend-client-token"


async def _status(address: str) -> dict[str, Any]:
    async with AsyncClient(address, token=TOKEN) as direct:
        return await direct.call({"cmd": "STATUS"})


@pytest.mark.slow
async def test_a_push_the_killed_primary_wrote_is_not_sent_again(tmp_path: Path) -> None:
    port = free_port()
    cluster = LocalCluster("127.0.0.1", port, 0, str(tmp_path / "data"), "always",
                           tokens=(TOKEN,), replicas=3, failure_timeout=2.0)
    await cluster.start(1)
    stopped: list[Any] = []
    try:
        topo = await cluster.current()
        assert topo is not None
        shard = topo.shards["shard-0"]
        queue = next(q for q in (f"resend-{i}" for i in range(1000))
                     if topo.owners[slot_of(q)] == "shard-0")
        primary = next(n for n in cluster.nodes if n.name == shard.primary)
        followers = [n for n in cluster.nodes if n.name != shard.primary]
        address = f"127.0.0.1:{primary.port}"
        async with AsyncClient(f"127.0.0.1:{port}", token=TOKEN) as c:
            # the gateway's connection to the primary is up (and authenticated)
            await c.push(queue, {"warm": True})
            seq = int((await _status(address))["seq"])
            for f in followers:  # the primary can write, not confirm
                assert f.proc is not None
                f.proc.send_signal(signal.SIGSTOP)
                stopped.append(f.proc)
            push = asyncio.create_task(c.push(queue, {"n": 1}))
            await eventually(_written(address, seq), 5,
                             what="the primary wrote the PUSH (unconfirmed)")
            assert not push.done(), "the PUSH was answered without a majority"
            assert primary.proc is not None
            primary.proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(primary.proc.wait)
            primary.proc = cluster._spawn_node(primary)  # same data directory
            await _wait_port("127.0.0.1", primary.port, primary.proc)
            for proc in stopped:
                proc.send_signal(signal.SIGCONT)
            stopped.clear()
            try:
                job_id: int | None = await asyncio.wait_for(push, 30)
            except ShardqError as exc:  # its answer was lost with the primary: it says so
                print(f"\nthe push failed: {exc}")
                assert "may have been applied" in str(exc), exc
                job_id = None

            async def taken() -> bool:  # the shard has a primary again
                try:
                    await c.push(queue, {"probe": True})
                    return True
                except ShardqError:
                    return False

            await eventually(taken, 30, 0.1, what="a push to the shard after the failover")
            jobs = await c.pull_batch(queue, 100, timeout=0)
        copies = [j.id for j in jobs if j.data == {"n": 1}]
        print(f"\npush answered {'ok, id ' + str(job_id) if job_id else 'with an error'}; "
              f"copies in the queue: {copies}")
        assert len(copies) <= 1, f"one push made {len(copies)} jobs: {copies}"
        if job_id is not None:
            assert copies == [job_id]
    finally:
        for proc in stopped:
            proc.send_signal(signal.SIGCONT)
        await cluster.stop()


def _written(address: str, seq: int) -> Any:
    async def check() -> bool:
        return int((await _status(address))["seq"]) > seq

    return check
