"""The benchmark client: one connection type and the workloads that drive it.

One implementation drives both targets (the shardq node and the loopback
floor), so their numbers compare. Requests are pre-encoded lines; answers are
framed like the servers frame requests and every answer is parsed with orjson
and checked. A workload is a small state machine run from ``data_received``
(no task switch per answer): the client does as little as a client can, and
the same for both targets. Every workload stops by itself at its count or at
its time cap, and is awaited with a timeout.

Must not: connect anywhere but 127.0.0.1, or wait without a bound.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter_ns
from typing import Any

import orjson

HOST = "127.0.0.1"
#: Slack on top of a workload's own time cap before the wait gives up on the server.
STUCK_S = 15.0


class BenchError(RuntimeError):
    """A server answered something unexpected, or went away."""


Check = Callable[[bytes], None]


def check_ok(line: bytes) -> None:
    ans = orjson.loads(line)
    if ans.get("ok") is not True:
        raise BenchError(f"answer not ok: {line[:300]!r}")


def check_ids(n: int) -> Check:
    """An ok answer that carries exactly ``n`` ids (PUSHB on the node)."""

    def check(line: bytes) -> None:
        ans = orjson.loads(line)
        if ans.get("ok") is not True or len(ans.get("ids", ())) != n:
            raise BenchError(f"expected ok with {n} ids: {line[:300]!r}")

    return check


# -- payloads and request lines ---------------------------------------------------------------


def payload(size: int) -> dict[str, object]:
    """A job's data: a plausible JSON object of exactly ``size`` bytes (at least ~110)."""
    data: dict[str, object] = {
        "to": "user@example.com", "subject": "Welcome to shardq", "template": "welcome-v2",
        "user_id": 1234567, "pad": "",
    }
    data["pad"] = "x" * max(0, size - len(orjson.dumps(data)))
    return data


def push_line(queue: str, data: object) -> bytes:
    return orjson.dumps({"cmd": "PUSH", "queue": queue, "data": data}) + b"\n"


def pushb_line(queue: str, data: object, count: int) -> bytes:
    return orjson.dumps({"cmd": "PUSHB", "queue": queue, "jobs": [{"data": data}] * count}) + b"\n"


# -- results ----------------------------------------------------------------------------------


@dataclass
class Measure:
    """What one workload measured on one target."""

    jobs: int  # jobs (or cycles) completed
    seconds: float
    latencies_ns: list[int] = field(default_factory=list, repr=False)
    capped: bool = False  # stopped by the time cap before its count

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds if self.seconds > 0 else 0.0

    def pct_us(self, q: float) -> float | None:
        lat = self.latencies_ns
        if not lat:
            return None
        return lat[min(len(lat) - 1, int(q * len(lat)))] / 1000

    def summary(self) -> dict[str, object]:
        self.latencies_ns.sort()
        out: dict[str, object] = {
            "jobs": self.jobs, "seconds": round(self.seconds, 4), "rate": round(self.rate, 1),
            "capped": self.capped,
        }
        if self.latencies_ns:
            out["latency_us"] = {
                "min": self.latencies_ns[0] / 1000, "p50": self.pct_us(0.50),
                "p95": self.pct_us(0.95), "p99": self.pct_us(0.99),
                "max": self.latencies_ns[-1] / 1000,
            }
        return out


# -- the connection -----------------------------------------------------------------------------


def complete_lines(parts: list[bytes], data: bytes) -> bytes | None:
    """The complete lines of what ``parts`` held and ``data``, as one block without its last
    newline (None: no line is complete yet); the unfinished rest stays in ``parts``. One
    ``rfind`` per read, as the node's TCP server frames (the floor server uses it too)."""
    end = data.rfind(b"\n")
    if end < 0:
        parts.append(data)
        return None
    head = data[:end]
    tail = data[end + 1 :]
    if parts:
        head = b"".join(parts) + head
        parts.clear()
    if tail:
        parts.append(tail)
    return head


class LineConn(asyncio.Protocol):
    """A client connection that hands complete answer lines to its workload."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parts: list[bytes] = []
        self.workload: Workload | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.workload is not None:
            self.workload.fail(BenchError(f"connection lost: {exc!r}"))

    def data_received(self, data: bytes) -> None:
        head = complete_lines(self.parts, data)
        workload = self.workload
        if head is None or workload is None:
            return
        try:
            workload.on_lines(head.split(b"\n"))
        except Exception as exc:
            workload.fail(exc)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        self.workload = None
        if self.transport is not None:
            self.transport.close()


async def connect(port: int) -> LineConn:
    loop = asyncio.get_running_loop()
    _, conn = await asyncio.wait_for(loop.create_connection(LineConn, HOST, port), 10)
    return conn


# -- workloads --------------------------------------------------------------------------------


class Workload:
    """A state machine on one connection; ``done`` resolves when it stops."""

    def __init__(self, conn: LineConn, cap_s: float) -> None:
        self.conn = conn
        self.cap_ns = int(cap_s * 1e9)
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.t0 = self.t1 = self.deadline = 0
        self.got = 0
        self.capped = False
        conn.workload = self

    def begin(self) -> None:
        self.t0 = perf_counter_ns()
        self.deadline = self.t0 + self.cap_ns
        self.send_first()

    def send_first(self) -> None:
        raise NotImplementedError

    def on_lines(self, lines: list[bytes]) -> None:
        raise NotImplementedError

    def finish(self, now: int) -> None:
        self.t1 = now
        self.conn.workload = None
        if not self.done.done():
            self.done.set_result(None)

    def fail(self, exc: BaseException) -> None:
        self.conn.workload = None
        if not self.done.done():
            self.done.set_exception(exc)


class Sequential(Workload):
    """One request in flight: send, wait for its answer, send the next; latency of each."""

    def __init__(self, conn: LineConn, line: bytes, n: int, cap_s: float, check: Check) -> None:
        super().__init__(conn, cap_s)
        self.line = line
        self.n = n
        self.check = check
        self.sent_at = 0
        self.lat: list[int] = []

    def send_first(self) -> None:
        self.sent_at = perf_counter_ns()
        self.conn.write(self.line)

    def on_lines(self, lines: list[bytes]) -> None:
        now = perf_counter_ns()
        if len(lines) != 1:
            raise BenchError(f"{len(lines)} answers to one request")
        self.check(lines[0])
        self.lat.append(now - self.sent_at)
        self.got += 1
        if self.got >= self.n or now >= self.deadline:
            self.capped = self.got < self.n
            self.finish(now)
            return
        self.sent_at = perf_counter_ns()
        self.conn.write(self.line)


class Windowed(Workload):
    """Up to ``window`` requests in flight on one connection, topped up as answers come."""

    def __init__(
        self, conn: LineConn, line: bytes, n: int, window: int, cap_s: float, check: Check
    ) -> None:
        super().__init__(conn, cap_s)
        self.line = line
        self.n = n
        self.window = window
        self.check = check
        self.sent = 0

    def send_first(self) -> None:
        k = min(self.window, self.n)
        self.sent = k
        self.conn.write(self.line * k)

    def on_lines(self, lines: list[bytes]) -> None:
        check = self.check
        for line in lines:
            check(line)
        self.got += len(lines)
        if self.got > self.sent:
            raise BenchError(f"{self.got} answers to {self.sent} requests")
        now = perf_counter_ns()
        if now >= self.deadline and self.n > self.sent:
            self.n = self.sent  # time cap: stop sending, collect what is in flight
            self.capped = True
        if self.got >= self.n:
            self.finish(now)
            return
        room = min(self.n - self.sent, self.window - (self.sent - self.got))
        if room > 0:
            self.sent += room
            self.conn.write(self.line * room)


class Cycle(Workload):
    """PUSH, then PULL it, then ACK it; one request in flight; latency of each cycle."""

    def __init__(self, conn: LineConn, queue: str, data: object, n: int, cap_s: float) -> None:
        super().__init__(conn, cap_s)
        self.push = push_line(queue, data)
        self.pull = orjson.dumps({"cmd": "PULL", "queue": queue, "timeout": 5000}) + b"\n"
        self.n = n
        self.step = 0
        self.started = 0
        self.lat: list[int] = []

    def send_first(self) -> None:
        self.started = perf_counter_ns()
        self.step = 0
        self.conn.write(self.push)

    def on_lines(self, lines: list[bytes]) -> None:
        if len(lines) != 1:
            raise BenchError(f"{len(lines)} answers to one request")
        ans = orjson.loads(lines[0])
        if ans.get("ok") is not True:
            raise BenchError(f"answer not ok in step {self.step}: {lines[0][:300]!r}")
        if self.step == 0:
            self.step = 1
            self.conn.write(self.pull)
        elif self.step == 1:
            job = ans.get("job") if "id" not in ans else ans  # the floor answers any line so
            if not job:
                raise BenchError(f"PULL found no job: {lines[0][:300]!r}")
            self.step = 2
            self.conn.write(b'{"cmd":"ACK","id":%d}\n' % job["id"])
        else:
            now = perf_counter_ns()
            self.lat.append(now - self.started)
            self.got += 1
            if self.got >= self.n or now >= self.deadline:
                self.capped = self.got < self.n
                self.finish(now)
                return
            self.send_first()


async def run(workloads: list[Workload], cap_s: float) -> None:
    """Start all workloads together and wait for all of them (bounded)."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for w in workloads:
            w.begin()
        await asyncio.wait_for(asyncio.gather(*(w.done for w in workloads)), cap_s + STUCK_S)
    finally:
        if was_enabled:
            gc.enable()


def median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Of one workload's round summaries (``Measure.summary()``): the one with the median rate
    (its latencies with it), and every round's rate under ``rounds``, lowest first."""
    ordered = sorted(rounds, key=lambda m: float(m["rate"]))
    return {**ordered[len(ordered) // 2], "rounds": [m["rate"] for m in ordered]}


def measured(workloads: list[Workload], per_unit: int = 1) -> Measure:
    """One Measure over workloads that ran together (from first start to last finish)."""
    t0 = min(w.t0 for w in workloads)
    t1 = max(w.t1 for w in workloads)
    lat: list[int] = []
    for w in workloads:
        lat.extend(getattr(w, "lat", ()))
    return Measure(
        jobs=sum(w.got for w in workloads) * per_unit, seconds=(t1 - t0) / 1e9,
        latencies_ns=lat, capped=any(w.capped for w in workloads),
    )


async def sequential_push(port: int, line: bytes, n: int, warm: int, cap_s: float) -> Measure:
    """``n`` PUSH lines one at a time on a fresh connection, after ``warm`` unmeasured ones."""
    conn = await connect(port)
    try:
        await run([Sequential(conn, line, warm, cap_s, check_ok)], cap_s)
        w = Sequential(conn, line, n, cap_s, check_ok)
        await run([w], cap_s)
        return measured([w])
    finally:
        conn.close()


async def pipelined_push(port: int, line: bytes, n: int, warm: int, window: int,
                         cap_s: float) -> Measure:
    """``n`` PUSH lines with ``window`` in flight on a fresh connection, after ``warm``."""
    conn = await connect(port)
    try:
        await run([Windowed(conn, line, warm, window, cap_s, check_ok)], cap_s)
        w = Windowed(conn, line, n, window, cap_s, check_ok)
        await run([w], cap_s)
        return measured([w])
    finally:
        conn.close()
