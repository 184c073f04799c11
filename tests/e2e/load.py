"""A steady, bounded load through the gateway Service, and the checker that counts it.

Run by the real-node tests *inside* the node's network namespace, so it reaches the gateways
the way a client in the cluster does: by the Service's DNS name (the cluster DNS), its
ClusterIP (kube-proxy) and a gateway pod behind it::

    ip netns exec shardq-rn python -m tests.e2e.load \
        --address shardq-gateway.shardq.svc.cluster.local:6789 ...

Each queue has its own producer, pushing numbered jobs (``{"n": N}``, a lease of ``--lease-ms``
so a job held by a node that died is handed out again), and its own worker, pulling and acking
them: while one node is away, the queues of the others flow on. It prints ``started`` once a job
went round (pushed, pulled, acked). It stops pushing when a line (or EOF) arrives on stdin (not
before ``--min-seconds``), after ``--max-seconds`` or after ``--max-jobs`` pushes, then drains:
workers go on until every pushed job was acked once, for at most ``--drain-seconds``. A job
still missing then is looked up (GETJOB): ``completed`` there means its ack was applied but the
answer was lost on the way (counted completed); anything else is lost. The last stdout line is
the counts, as JSON: pushed, completed, lost, duplicated (acked more than once) and the
evidence behind them.

Every request is bounded (``REQUEST_TIMEOUT``); so is every loop. Must not: retry a push under
the same number (a retried push is a new job), or count an ack the server refused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from shardq import AsyncClient
from shardq.errors import ShardqConnectionError, ShardqError

REQUEST_TIMEOUT = 10.0  # seconds any one request may take
ERROR_PAUSE = 0.2  # after a failed request
SAMPLES = 3  # error texts kept per kind
SETTLE_EVERY = 2.0  # seconds between look-ups of the jobs a drain still waits for
SETTLE_BATCH = 200  # jobs looked up at a time


@dataclass
class Counts:
    pushed: dict[int, int] = field(default_factory=dict)  # number -> job id
    acked: Counter[int] = field(default_factory=Counter)  # number -> successful acks
    errors: Counter[str] = field(default_factory=Counter)  # "push: Unavailable" -> how often
    samples: dict[str, list[str]] = field(default_factory=dict)
    longest: float = 0.0  # the slowest successful request, seconds
    settled: set[int] = field(default_factory=set)  # not acked here, completed on the server

    def error(self, what: str, exc: BaseException) -> None:
        kind = f"{what}: {type(exc).__name__}"
        self.errors[kind] += 1
        kept = self.samples.setdefault(kind, [])
        if len(kept) < SAMPLES:
            kept.append(str(exc)[:200])

    def missing(self) -> list[int]:
        return [n for n in self.pushed if n not in self.acked and n not in self.settled]


class Load:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.queues = [f"{args.prefix}-{i}" for i in range(args.queues)]
        self.counts = Counts()
        self.stop = asyncio.Event()
        self.round_trip = asyncio.Event()  # one job pushed, pulled and acked
        self.began = time.monotonic()

    def client(self) -> AsyncClient:
        return AsyncClient(self.args.address, token=self.args.token)

    async def request(self, what: str, call: Any) -> Any:
        """One bounded request; raises what it failed with (after counting it)."""
        started = time.monotonic()
        try:
            answer = await asyncio.wait_for(call, REQUEST_TIMEOUT)
        except (ShardqError, TimeoutError, OSError) as exc:
            self.counts.error(what, exc)
            raise
        self.counts.longest = max(self.counts.longest, time.monotonic() - started)
        return answer

    async def produce(self, index: int, deadline: float) -> None:
        c, n, queue = self.client(), 0, self.queues[index]
        try:
            while not self.stop.is_set() and time.monotonic() < deadline \
                    and len(self.counts.pushed) < self.args.max_jobs:
                number = index * 10_000_000 + n
                n += 1
                try:
                    job_id = await self.request("push", c.push(
                        queue, {"n": number}, timeout=self.args.lease_ms))
                except (ShardqError, TimeoutError, OSError) as exc:
                    c = await self.fresh(c, exc)
                    continue
                self.counts.pushed[number] = job_id
                await asyncio.sleep(self.args.pause)  # the load's pace: a steady rate, not a wait
        finally:
            await c.close()

    async def work(self, queue: str, drain_deadline: list[float]) -> None:
        c = self.client()
        try:
            while time.monotonic() < drain_deadline[0]:
                if self.stop.is_set() and not self.counts.missing():
                    return
                got = 0
                try:
                    jobs = await self.request("pull", c.pull_batch(queue, 20, timeout=0))
                    for job in jobs:
                        await self.request("ack", c.ack(job, "done"))
                        self.counts.acked[job.data["n"]] += 1
                        self.round_trip.set()
                        got += 1
                except (ShardqError, TimeoutError, OSError) as exc:
                    c = await self.fresh(c, exc)
                if not got:
                    await asyncio.sleep(self.args.pause)  # empty: poll at the load's pace
        finally:
            await c.close()

    async def fresh(self, c: AsyncClient, exc: BaseException) -> AsyncClient:
        """After a failed request: a new client if the connection may be broken, then a pause."""
        if isinstance(exc, (ShardqConnectionError, TimeoutError, OSError)):
            await c.close()
            c = self.client()
        await asyncio.sleep(ERROR_PAUSE)  # back off after a failed request
        return c

    async def settle(self, drain_deadline: list[float]) -> None:
        """While draining: look up the jobs not acked yet; one the server has completed (its
        ack was applied, the answer lost) is settled, so the drain need not wait for it."""
        while time.monotonic() < drain_deadline[0]:
            await asyncio.sleep(SETTLE_EVERY)  # the settle loop's period
            await self.look_up(self.counts.missing()[:SETTLE_BATCH])

    async def look_up(self, numbers: list[int]) -> dict[str, int]:
        """GETJOB each; completed ones are settled; the others' states counted."""
        states = Counter[str]()
        if not numbers:
            return {}
        async with self.client() as c:
            for number in numbers:
                try:
                    job = await self.request("getjob", c.get_job(self.counts.pushed[number]))
                except (ShardqError, TimeoutError, OSError):
                    states["unknown (GETJOB failed)"] += 1
                    continue
                state = (job or {}).get("state", "gone")
                if state == "completed":
                    self.counts.settled.add(number)
                else:
                    states[state] += 1
        return dict(states)

    async def run(self) -> dict[str, Any]:
        args = self.args
        started = self.began = time.monotonic()
        drain_deadline = [started + args.max_seconds + args.drain_seconds]
        producers = [asyncio.create_task(self.produce(i, started + args.max_seconds))
                     for i in range(len(self.queues))]
        workers = [asyncio.create_task(self.work(q, drain_deadline)) for q in self.queues]
        side = [asyncio.create_task(self.watch_stdin()), asyncio.create_task(self.announce())]
        await asyncio.gather(*producers)
        self.stop.set()
        stopped = time.monotonic()
        drain_deadline[0] = min(drain_deadline[0], stopped + args.drain_seconds)
        side.append(asyncio.create_task(self.settle(drain_deadline)))
        await asyncio.gather(*workers)
        for task in side:
            task.cancel()
        drained = time.monotonic()
        states = await self.look_up(self.counts.missing())
        acked, pushed = set(self.counts.acked), set(self.counts.pushed)
        by_server = len(self.counts.settled - acked)
        return {
            "pushed": len(pushed),
            "completed": len(pushed & (acked | self.counts.settled)),
            "lost": len(pushed - acked - self.counts.settled),
            "duplicated": sum(1 for times in self.counts.acked.values() if times > 1),
            "ack_answer_lost": by_server,  # completed on the server, the ack's answer never came
            "lost_states": states,
            "acked_unrecorded_push": len(acked - pushed),  # a push whose answer was lost
            "errors": dict(self.counts.errors),
            "error_samples": self.counts.samples,
            "longest_request_s": round(self.counts.longest, 3),
            "load_seconds": round(stopped - started, 1),
            "drain_seconds": round(drained - stopped, 1),
            "push_rate": round(len(pushed) / max(stopped - started, 0.001), 1),
        }

    async def announce(self) -> None:
        await self.round_trip.wait()
        print("started", flush=True)

    async def watch_stdin(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        await reader.readline()  # a line, or EOF: stop pushing (after --min-seconds)
        # pushing lasts at least --min-seconds, a bound on the load, not a wait for a state
        await asyncio.sleep(max(0.0, self.args.min_seconds - (time.monotonic() - self.began)))
        self.stop.set()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--address", required=True, help="the gateway Service, NAME.NS.svc...:6789")
    p.add_argument("--token", default=None)
    p.add_argument("--prefix", default="load", help="queue names: PREFIX-0 ... PREFIX-(N-1)")
    p.add_argument("--queues", type=int, default=8)
    p.add_argument("--pause", type=float, default=0.1,
                   help="seconds between a producer's pushes (and a worker's empty pulls)")
    p.add_argument("--lease-ms", type=int, default=10_000, help="each job's lease (timeout)")
    p.add_argument("--min-seconds", type=float, default=10.0,
                   help="a stop asked for earlier waits until then: a load, not a blip")
    p.add_argument("--max-seconds", type=float, default=300.0)
    p.add_argument("--max-jobs", type=int, default=50_000)
    p.add_argument("--drain-seconds", type=float, default=90.0)
    return p.parse_args(argv)


def main() -> None:
    args = parse()
    result = asyncio.run(Load(args).run())
    print(json.dumps(result, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
