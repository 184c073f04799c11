"""A gateway drains on SIGTERM (shardq_gateway.drain): a rolling restart of the gateways
under load fails no request, loses and duplicates no job.

Real nodes (in-process), real gateway subprocesses, SDK clients through a test-side
balancer that stands in for the Kubernetes Service (tests/balancer.py): round-robin over
the gateways whose ``/ready`` answers 200, polled like kube-proxy learns it (late).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from shardq import AsyncClient, AsyncWorker, Job
from shardq.errors import GatewayDraining, Unavailable, error_from_text

from ..balancer import Balancer
from ..cluster import Cluster, blocked_pulls
from ..helpers import RawClient, SteadyLoad, eventually, free_port, listens_in

QUEUES = [f"drain-{i}" for i in range(8)]
#: The gateways' drain settings here (the defaults are 5 s and 20 s).
DRAIN_DELAY = 1.5
DRAIN_TIMEOUT = 8.0
#: A process's own start-up and exit around the drain (interpreter, sockets, logs).
EXIT_SLACK = 3.0


class GatewayProc:
    """``shardq gateway`` as a subprocess on two free ports."""

    def __init__(self, seeds: list[str], *args: str) -> None:
        self.port, self.http_port = free_port(), free_port()
        cmd = [sys.executable, "-m", "shardq.cli", "gateway", "--port", str(self.port),
               "--http-port", str(self.http_port), "--seed", ",".join(seeds),
               "--drain-delay", str(DRAIN_DELAY), "--drain-timeout", str(DRAIN_TIMEOUT), *args]
        #: its log (stdout and stderr), kept for a failure's message (``tail``)
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (lives as long as the process)
            prefix=f"gateway-{self.port}-", suffix=".log")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    async def up(self) -> GatewayProc:
        """Wait (without blocking the loop: the nodes run in it) until it listens."""
        def listening() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}")
            return listens_in(self.proc.pid, self.port) and listens_in(self.proc.pid,
                                                                       self.http_port)

        await eventually(listening, 30, 0.05, what=f"gateway listening on {self.port}")
        return self

    async def terminate(self) -> float:
        """SIGTERM it and wait until it exits by itself; the seconds that took."""
        sent = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        await self.exited(DRAIN_TIMEOUT + EXIT_SLACK + 5,
                          f"gateway on port {self.port} exits after SIGTERM")
        return time.monotonic() - sent

    async def exited(self, within: float, what: str) -> int | None:
        """Wait until it has exited by itself, at most ``within`` seconds; its exit code."""
        await eventually(lambda: self.proc.poll() is not None, within, 0.05, what=what)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def tail(self, lines: int = 15) -> str:
        with open(self.log.name, errors="replace") as f:
            return "".join(f.readlines()[-lines:])


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    c = await Cluster.start(2)
    yield c
    await c.stop()


@pytest.fixture
def gateways() -> Iterator[list[GatewayProc]]:
    started: list[GatewayProc] = []
    yield started
    for gw in started:
        gw.kill()


@pytest.fixture
async def balancer() -> AsyncIterator[Balancer]:
    b = await Balancer(period=0.3).start()
    yield b
    await b.close()


async def start(cluster: Cluster, gateways: list[GatewayProc],
                balancer: Balancer | None = None) -> GatewayProc:
    gw = GatewayProc(cluster.seeds())
    gateways.append(gw)
    await gw.up()
    if balancer is not None:
        balancer.add(gw.port, gw.http_port)
    return gw


async def finish(load: SteadyLoad, tasks: list[asyncio.Task[None]], cluster: Cluster) -> None:
    load.stop.set()
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    except TimeoutError:
        raise AssertionError(f"the load did not finish: {await stuck(load, cluster)}") from None
    await load.settle_unsure()


async def stuck(load: SteadyLoad, cluster: Cluster) -> str:
    """What the outstanding jobs are doing, asked of their nodes (for a failure's message)."""
    states = []
    for number in sorted(load.outstanding())[:10]:
        job_id = load.ids.get(number)
        for node in cluster.nodes:
            answer = await cluster.call(node.settings.name, {"cmd": "GETJOB", "id": job_id})
            if answer.get("job"):
                states.append((number, job_id, node.settings.name, answer["job"]))
    return (f"{len(load.outstanding())} outstanding; errors {load.errors[-5:]}; "
            f"first states {states}")


@pytest.mark.slow
async def test_a_rolling_restart_of_the_gateways_under_load_fails_no_request(
    cluster: Cluster, gateways: list[GatewayProc], balancer: Balancer,
) -> None:
    first = await start(cluster, gateways, balancer)
    second = await start(cluster, gateways, balancer)
    await eventually(lambda: len(balancer.ready_ports()) == 2, 10, what="both gateways ready")
    load = SteadyLoad(QUEUES, balancer.address, pause=0.002, work_pause=0.002)
    tasks = [asyncio.create_task(load.produce(i)) for i in range(4)]
    tasks += [asyncio.create_task(load.work(QUEUES[i::3])) for i in range(3)]
    try:
        await load.progressed("before the restart", 300)
        took = [await first.terminate()]
        third = await start(cluster, gateways, balancer)
        await eventually(lambda: third.port in balancer.ready_ports(), 10,
                         what="the replacement gateway ready")
        await load.progressed("after the first gateway's drain", 300)
        took.append(await second.terminate())
        await load.progressed("after the second gateway's drain", 300)
    finally:
        await finish(load, tasks, cluster)
    codes = [first.proc.returncode, second.proc.returncode]
    print(f"\ngateway drain: pushed {len(load.pushed)}, completed {len(load.completed)}, "
          f"lost {load.lost()}, duplicated {load.duplicates()}, failed requests "
          f"{len(load.errors)}, exits after SIGTERM {[f'{t:.2f}s' for t in took]}, "
          f"exit codes {codes}, connections the balancer could not place {balancer.refused}")
    assert load.errors == []
    assert load.lost() == 0
    assert load.duplicates() == 0, load.duplicate_evidence()
    assert codes == [0, 0]
    assert all(t <= DRAIN_TIMEOUT + EXIT_SLACK for t in took), took


@pytest.mark.slow
async def test_sdk_workers_on_waiting_pulls_ride_a_rolling_restart_of_the_gateways(
    cluster: Cluster, gateways: list[GatewayProc], balancer: Balancer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same rollout with ``AsyncWorker``s (waiting pulls on connections of their own,
    acks batched on another): every job handled exactly once, no warning from the SDK."""
    first = await start(cluster, gateways, balancer)
    second = await start(cluster, gateways, balancer)
    await eventually(lambda: len(balancer.ready_ports()) == 2, 10, what="both gateways ready")
    load = SteadyLoad(QUEUES, balancer.address, pause=0.002)
    handled: dict[int, int] = {}

    def handle(job: Job) -> None:
        handled[job.data["n"]] = handled.get(job.data["n"], 0) + 1

    workers = [AsyncWorker(q, handle, address=balancer.address, concurrency=4, poll_ms=300)
               for q in QUEUES]
    caplog.set_level(logging.WARNING, logger="shardq")
    runs = [asyncio.create_task(w.run(handle_signals=False)) for w in workers]
    producers = [asyncio.create_task(load.produce(i)) for i in range(3)]
    try:
        await eventually(lambda: len(handled) > 300, 30, what="jobs handled before the restart")
        took = [await first.terminate()]
        third = await start(cluster, gateways, balancer)
        await eventually(lambda: third.port in balancer.ready_ports(), 10,
                         what="the replacement gateway ready")
        took.append(await second.terminate())
        done = len(handled)
        await eventually(lambda: len(handled) > done + 300, 30, what="jobs handled after")
    finally:
        load.stop.set()
        await asyncio.wait_for(asyncio.gather(*producers), 30)
        await eventually(lambda: load.pushed <= handled.keys(), 30, 0.05,
                         what="every pushed job handled",
                         hint=lambda: f"{len(load.pushed - handled.keys())} not handled")
        for w in workers:
            w.stop()
        await asyncio.wait_for(asyncio.gather(*runs), 30)
    twice = {n: c for n, c in handled.items() if c > 1}
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    print(f"\nworkers through the drain: pushed {len(load.pushed)}, handled {len(handled)}, "
          f"twice {len(twice)}, push errors {len(load.errors)}, SDK warnings {len(warnings)}, "
          f"exits after SIGTERM {[f'{t:.2f}s' for t in took]}")
    assert load.errors == []
    assert warnings == []
    assert twice == {}
    assert [first.proc.returncode, second.proc.returncode] == [0, 0]
    for node in cluster.nodes:  # every job acked: none left queued or leased
        stats = await cluster.call(node.settings.name, {"cmd": "STATS"})
        assert (stats["queued"], stats["processing"]) == (0, 0), stats


async def test_pipelined_requests_in_flight_get_every_answer_during_the_drain(
    cluster: Cluster, gateways: list[GatewayProc],
) -> None:
    gw = await start(cluster, gateways)
    client = await RawClient.connect(gw.port)
    await client.call({"cmd": "PUSH", "queue": "pipe", "data": 0})  # connected and routed
    gw.proc.send_signal(signal.SIGTERM)
    # during the delay everything is served as usual: a burst of 500 pipelined requests
    await client.send(*({"cmd": "PUSH", "queue": f"pipe-{i % 7}", "data": i, "reqId": str(i)}
                        for i in range(500)))
    answers = [await client.recv() for _ in range(500)]
    assert [a["reqId"] for a in answers] == [str(i) for i in range(500)]
    assert all(a["ok"] for a in answers), [a for a in answers if not a["ok"]][:3]
    # once it closes connections, the idle client is told so and the connection ends
    goodbye = await client.recv(DRAIN_DELAY + 5)
    assert goodbye == {"ok": False, "error": GatewayDraining().text}
    assert await client.closed_by_server()
    await client.close()
    await gw.exited(DRAIN_TIMEOUT, "the drained gateway exits before its bound")
    assert gw.proc.returncode == 0


async def test_a_pipelining_client_gets_every_answer_then_one_refusal_and_nothing_after_runs(
    cluster: Cluster, gateways: list[GatewayProc],
) -> None:
    gw = await start(cluster, gateways)
    client = await RawClient.connect(gw.port)
    gw.proc.send_signal(signal.SIGTERM)
    sent = 0

    async def write() -> None:  # bursts of pipelined pushes until the gateway stops reading
        nonlocal sent
        with contextlib.suppress(ConnectionError):
            while True:
                await client.send(*({"cmd": "PUSH", "queue": "burst", "data": n,
                                     "reqId": str(n)} for n in range(sent, sent + 50)))
                sent += 50
                await asyncio.sleep(0.001)  # the client's pace, not a wait for a state

    writer = asyncio.create_task(write())
    answers = []
    while not answers or answers[-1]["ok"]:
        answers.append(await client.recv(DRAIN_DELAY + 5))
    assert await client.closed_by_server()
    writer.cancel()
    await client.close()
    served, refused = answers[:-1], answers[-1]
    # every request before the refusal was answered, in order; the refusal names the next one
    assert [a["reqId"] for a in served] == [str(n) for n in range(len(served))]
    assert all(a["ok"] for a in served)
    # (unasked, without a reqId, if the drain found the connection idle between two bursts)
    assert refused["error"] == GatewayDraining().text
    assert refused.get("reqId", str(len(served))) == str(len(served))
    assert sent >= len(served)
    owner = cluster.owner_of_queue("burst").settings.name
    stats = await cluster.call(owner, {"cmd": "STATS"})
    assert stats["queued"] == len(served), (stats, len(served), sent)  # nothing after it ran
    print(f"\npipelined burst: {len(served)} answered, then the refusal "
          f"({'to ' + refused['reqId'] if 'reqId' in refused else 'unasked'}); {sent} sent")


async def test_a_waiting_pull_is_cut_short_by_the_drain_and_the_sdk_sends_it_elsewhere(
    cluster: Cluster, gateways: list[GatewayProc], balancer: Balancer,
) -> None:
    first = await start(cluster, gateways, balancer)
    await eventually(lambda: balancer.ready_ports() == [first.port], 10, what="first ready")
    async with AsyncClient(balancer.address) as worker, AsyncClient(balancer.address) as other:
        pull = asyncio.create_task(worker.pull("waiting"))  # no timeout: waits for a job
        await eventually(lambda: blocked_pulls(cluster.owner_of_queue("waiting"), "waiting"),
                         10, 0.02, what="the pull waiting on its node")
        # a rollout with maxSurge 1: the new gateway is ready before the old one is stopped
        await start(cluster, gateways, balancer)
        await eventually(lambda: len(balancer.ready_ports()) == 2, 10, what="both ready")
        first.proc.send_signal(signal.SIGTERM)
        await first.exited(DRAIN_TIMEOUT + EXIT_SLACK, "the first gateway drained and exited")
        # sent again, through the second gateway, and waiting there
        assert not pull.done(), f"{pull}\nthe first gateway's log:\n{first.tail()}"
        pushed = await other.push("waiting", "the job")
        job = await asyncio.wait_for(pull, 10)
        assert job is not None and job.id == pushed
        await worker.ack(job)
    assert first.proc.returncode == 0


async def test_a_job_pulled_by_a_waiting_pull_can_be_acked_elsewhere_after_the_drain(
    cluster: Cluster, gateways: list[GatewayProc], balancer: Balancer,
) -> None:
    """The SDK's workers pull on connections of their own: the drain keeps the node
    connection those jobs are leased on until the gateway exits, so a worker still running
    one when its connections are drained acks it through the other gateway."""
    first = await start(cluster, gateways, balancer)
    await eventually(lambda: balancer.ready_ports() == [first.port], 10, what="first ready")
    async with AsyncClient(balancer.address) as worker:
        await worker.push("running", "a long job")
        job = await worker.pull("running", timeout=5000)  # on a connection of its own
        assert job is not None
        await start(cluster, gateways, balancer)
        await eventually(lambda: len(balancer.ready_ports()) == 2, 10, what="both ready")
        pulling = set(worker._all) - {worker._main[worker.address]}
        first.proc.send_signal(signal.SIGTERM)
        await eventually(lambda: worker._main[worker.address].closed, DRAIN_DELAY + 5, 0.05,
                         what="the worker's idle connection drained (told unasked)")
        # its next pull goes on the pull connection to the first gateway: refused there (the
        # connection ends), sent again through the second
        assert await worker.pull_batch("running", 1, timeout=100) == []
        assert all(c.closed for c in pulling)
        assert first.proc.poll() is None  # still holding the job's node connection
        await worker.ack(job)  # through the second gateway, with the job's lease token
        assert (await worker.get_job(job.id) or {}).get("state") == "completed"
    await first.exited(DRAIN_TIMEOUT + EXIT_SLACK, "the first gateway exits at its bound")
    assert first.proc.returncode == 0


async def test_a_request_read_after_the_drain_began_is_refused_not_run_and_nothing_after_it(
    cluster: Cluster, gateways: list[GatewayProc],
) -> None:
    gw = await start(cluster, gateways)
    holder = await RawClient.connect(gw.port)  # holds a job: its connection outlives the delay
    for data in ("settled", "held"):
        await holder.call({"cmd": "PUSH", "queue": "raw", "data": data})
    pulled = await holder.call({"cmd": "PULLB", "queue": "raw", "count": 2, "timeout": 0})
    job = pulled["jobs"][0]["id"]
    gw.proc.send_signal(signal.SIGTERM)
    await eventually(lambda: ready(gw.http_port, 503), 5, 0.05, what="/ready fails at once")
    await asyncio.sleep(DRAIN_DELAY + 0.5)  # the delay is a fixed duration, not a state
    # a client holding jobs may still settle them
    assert await holder.call({"cmd": "ACK", "id": job, "reqId": "a"}) == {"ok": True,
                                                                         "reqId": "a"}
    # anything else: refused, with that request's id, and the lines behind it are not run
    await holder.send({"cmd": "PUSH", "queue": "raw", "data": "late", "reqId": "p"},
                      {"cmd": "PUSH", "queue": "raw", "data": "later", "reqId": "q"})
    refused = await holder.recv()
    assert refused == {"ok": False, "error": GatewayDraining().text, "reqId": "p"}
    assert refused["error"].startswith("Unavailable: gateway draining, request not executed")
    assert await holder.closed_by_server()
    await holder.close()
    stats = await cluster.call(cluster.owner_of_queue("raw").settings.name, {"cmd": "STATS"})
    # neither late push ran: only the held job is left (leased, or handed back by the node
    # once the gateway exited: a drained client's jobs are not released with its connection)
    assert stats["queued"] + stats["processing"] == 1, stats
    await gw.exited(DRAIN_TIMEOUT, "the drained gateway exits before its bound")


async def test_the_sdk_sends_a_refused_request_again_through_another_gateway(
    cluster: Cluster, gateways: list[GatewayProc], balancer: Balancer,
) -> None:
    first = await start(cluster, gateways, balancer)
    await eventually(lambda: balancer.ready_ports() == [first.port], 10, what="first ready")
    async with AsyncClient(balancer.address) as client:
        await client.push("sdk", 1)
        first.proc.send_signal(signal.SIGTERM)
        await start(cluster, gateways, balancer)
        await eventually(lambda: len(balancer.ready_ports()) == 1
                         and first.port not in balancer.ready_ports(), 10,
                         what="only the second gateway ready")
        await first.exited(DRAIN_TIMEOUT + EXIT_SLACK, "the first gateway drained and exited")
        # the client's connection was closed by the drain while idle: the next push goes on
        # a new connection, to the second gateway, and succeeds
        ids = [await client.push("sdk", n) for n in range(2, 12)]
        assert len(set(ids)) == 10
        assert (await client.stats())["queued"] == 11


def ready(http_port: int, status: int) -> Any:
    async def check() -> bool:
        async with (aiohttp.ClientSession() as http,
                    http.get(f"http://127.0.0.1:{http_port}/ready") as answer):
            return answer.status == status

    return check


def test_the_draining_refusal_is_an_unavailable_the_sdk_knows_is_safe_to_send_again() -> None:
    refusal = GatewayDraining()
    assert refusal.text.startswith("Unavailable: gateway draining, request not executed")
    parsed = error_from_text(refusal.text)
    assert isinstance(parsed, GatewayDraining) and isinstance(parsed, Unavailable)
    # any other Unavailable stays what it was: the SDK does not resend it
    other = error_from_text("Unavailable: slot 5 is moving, try again")
    assert type(other) is Unavailable
