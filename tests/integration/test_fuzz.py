"""Property tests of the wire protocol: parsing, validation, and a live node under fuzz.

(a) ``parse_line`` and the request validators raise nothing but
``InvalidRequest``, whatever bytes or JSON objects they are given; the nesting
check agrees with a plain recursive depth for any value and limit.
(b) A real node, over one socket, answers every fuzzed line with exactly one
line, refuses malformed input with ``Invalid: …`` (or a documented text),
never closes the connection on a line under the maximum, never hangs, and
still answers afterwards; values of any depth (to past what the parser takes)
are kept or refused with ``Invalid: nesting deeper than 128``; pipelines of
large answers past a small output budget all come back, in order, once read.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardq.errors import InvalidRequest
from shardq.wire import commands as C
from shardq.wire import protocol as P
from shardq.wire.slots import SLOTS, slot_of
from shardq_node.engine import Engine
from shardq_node.jobs import client_json
from shardq_node.runtime import Node
from shardq_node.settings import NodeSettings

from ..helpers import FakeClock

#: Modest and derandomized: the same examples every run, the whole file well under a minute.
FUZZ = settings(
    max_examples=250, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

INT_FIELDS = ("priority", "delay", "ttl", "timeout", "max_attempts", "backoff", "lease", "extend")
STR_FIELDS = ("unique_key", "error", "message")

#: What a node may answer besides ``Invalid: …`` (PROTOCOL.md "Errors", single node).
DOCUMENTED = re.compile(
    r"Job \d+ not found|Job \d+ not found in processing|Duplicate job with key: .*"
    r"|Cron job not found|Lease expired for job \d+|Payload too large: \d+ bytes \(max \d+\)"
    r"|Queue full: memory and disk budget spent|Rate limited",
    re.S,
)


# -- strategies -----------------------------------------------------------------------------------

json_scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
#: Cron fields that are valid alone but not always together (day 31 of February, …).
cron_field = st.sampled_from(
    ["*", "0", "1", "2", "29", "30", "31", "*/5", "1-5", "4,6", "L", "?", "MON", "60", "99999"]
)
#: Characters Python calls digits: decimal ones (int() reads them) and others ("²", "①").
unicode_digits = st.characters(categories=["Nd", "No"]).filter(str.isdigit)
#: Anything, MagicQueue's ``*/N`` with any Unicode digits, and 4 to 7 cron fields.
schedules = (
    st.text(max_size=30)
    | st.text(unicode_digits, min_size=1, max_size=3).map("*/".__add__)
    | st.lists(cron_field, min_size=4, max_size=7).map(" ".join)
)
#: Ids of jobs the fuzz node really holds now and then (seq * 1024 + the queue's slot).
job_ids = st.builds(
    lambda seq, q: seq * SLOTS + slot_of(q), st.integers(0, 40), st.sampled_from(["fuzz", "fz"])
)
queues = st.sampled_from(["fuzz", "fz"])
keys = st.sampled_from(["k1", "k2"]) | st.text(max_size=6)
small_ints = st.integers(min_value=-2, max_value=300)
job_items = st.fixed_dictionaries({"data": json_values}, optional={
    "priority": small_ints, "delay": st.integers(0, 50), "max_attempts": st.integers(0, 3),
    "unique_key": keys, "depends_on": st.lists(job_ids, max_size=2),
    "ttl": st.integers(0, 50), "backoff": st.integers(0, 50),
})
#: A value that fits each field, so requests get past validation and into the engine.
GOOD: dict[str, st.SearchStrategy[Any]] = {
    "queue": queues, "data": json_values, "priority": small_ints, "delay": st.integers(0, 50),
    "ttl": st.integers(0, 50), "timeout": st.integers(0, 50), "max_attempts": st.integers(0, 3),
    "backoff": st.integers(0, 50), "unique_key": keys,
    "depends_on": st.lists(job_ids, max_size=2), "jobs": st.lists(job_items, max_size=3),
    "id": job_ids, "ids": st.lists(job_ids, max_size=4), "result": json_values,
    "results": st.lists(json_values, max_size=4), "error": st.text(max_size=8),
    "progress": small_ints, "message": st.text(max_size=8), "count": st.integers(-1, 5),
    "events": st.lists(st.sampled_from(["completed", "dead", "bogus"]), max_size=2),
    "name": st.sampled_from(["c1", "c2"]), "schedule": schedules, "limit": st.integers(-1, 5),
    "token": st.text(max_size=8), "lease": st.integers(-1, 2**40), "extend": small_ints,
    "reqId": st.text(max_size=6),
}
#: The fields each command reads (PROTOCOL.md and shardq's additions).
SCHEMA: dict[str, tuple[str, ...]] = {
    "PUSH": ("queue", "data", "priority", "delay", "ttl", "timeout", "max_attempts", "backoff",
             "unique_key", "depends_on"),
    "PUSHB": ("queue", "jobs"), "PULL": ("queue",), "PULLB": ("queue", "count"),
    "ACK": ("id", "result", "lease"), "ACKB": ("ids", "results"), "FAIL": ("id", "error", "lease"),
    "GETRESULT": ("id",), "CANCEL": ("id",), "PROGRESS": ("id", "progress", "message", "lease"),
    "GETPROGRESS": ("id",), "DLQ": ("queue", "count"), "RETRYDLQ": ("queue", "id"),
    "SUBSCRIBE": ("queue", "events"), "UNSUBSCRIBE": ("queue",), "METRICS": (), "STATS": (),
    "CRON": ("name", "queue", "data", "schedule", "priority"), "CRONDELETE": ("name",),
    "CRONLIST": (), "RATELIMIT": ("queue", "limit"), "RATELIMITCLEAR": ("queue",),
    "PAUSE": ("queue",), "RESUME": ("queue",), "SETCONCURRENCY": ("queue", "limit"),
    "CLEARCONCURRENCY": ("queue",), "LISTQUEUES": (), "AUTH": ("token",), "GETJOB": ("id",),
    "TOUCH": ("id", "lease", "extend"), "TOPOLOGY": (),
}
assert set(SCHEMA) == set(C.COMMANDS)
#: Commands that change jobs: drawn more often, so ids in later requests often exist.
HOT = ("PUSH", "PUSHB", "PULL", "PULLB", "ACK", "FAIL", "PROGRESS", "CRON")
#: Values that often pass the first checks but are wrong somewhere deeper.
plausible = (
    st.sampled_from(["", "x" * 600, "*/²", "0 0 31 2 *"]) | small_ints | GOOD["jobs"]
    | GOOD["ids"] | GOOD["events"]
)
field_values = json_values | plausible
commands = st.sampled_from(C.COMMANDS) | st.text(max_size=12)


@st.composite
def well_formed(draw: st.DrawFn) -> dict[str, Any]:
    """A real command whose fields are mostly right, sometimes absent, null or anything."""
    cmd = draw(st.sampled_from(C.COMMANDS + HOT * 3))
    obj: dict[str, Any] = {"cmd": cmd}
    for name in (*SCHEMA[cmd], "reqId"):
        how = draw(st.integers(0, 9))
        if how < 7:
            obj[name] = draw(GOOD[name])
        elif how == 7:
            obj[name] = None
        elif how == 8:
            obj[name] = draw(field_values)
    return obj


@st.composite
def anything(draw: st.DrawFn) -> dict[str, Any]:
    """A JSON object with maybe a ``cmd`` and random known or unknown fields."""
    obj: dict[str, Any] = draw(st.dictionaries(
        st.sampled_from(list(GOOD)) | st.text(max_size=8), field_values, max_size=7
    ))
    if draw(st.booleans()):
        obj["cmd"] = draw(commands)
    elif draw(st.booleans()):
        obj["cmd"] = draw(json_values)
    return obj


requests = st.one_of(well_formed(), well_formed(), anything())


def no_newline(data: bytes) -> bytes:
    return data.replace(b"\n", b" ")


#: Valid lines that never block, to be cut and spliced into near-misses.
SEEDS = [
    orjson.dumps(r) for r in (
        {"cmd": "PUSH", "queue": "fuzz", "data": {"a": [1, 2]}, "priority": 3},
        {"cmd": "PUSHB", "queue": "fuzz", "jobs": [{"data": 1}, {"data": None}]},
        {"cmd": "ACK", "id": 1025, "result": "r"},
        {"cmd": "PROGRESS", "id": 7, "progress": 50, "message": "m"},
        {"cmd": "CRON", "name": "n", "queue": "fuzz", "data": 1, "schedule": "*/60"},
        {"cmd": "STATS", "reqId": "x"},
    )
]


@st.composite
def near_misses(draw: st.DrawFn) -> bytes:
    seed = draw(st.sampled_from(SEEDS))
    cut = draw(st.integers(min_value=0, max_value=len(seed)))
    splice = draw(st.binary(max_size=8))
    keep = draw(st.integers(min_value=cut, max_value=len(seed)))
    return seed[:cut] + splice + seed[keep:]


def tame(obj: dict[str, Any]) -> dict[str, Any]:
    """Never block the fuzz connection: PULL/PULLB get ``timeout: 0``, no SUBSCRIBE."""
    cmd = obj.get("cmd")
    if cmd in ("PULL", "PULLB"):
        obj["timeout"] = 0
    elif cmd == "SUBSCRIBE":
        obj["cmd"] = "UNSUBSCRIBE"
    return obj


def tame_bytes(line: bytes) -> bytes:
    """A splice may turn PUSH into PULL: such lines get ``timeout: 0`` too."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return line
    if type(obj) is dict and obj.get("cmd") in ("PULL", "PULLB", "SUBSCRIBE"):
        return orjson.dumps(tame(obj))
    return line


byte_lines = (st.binary(max_size=200) | near_misses()).map(no_newline).map(tame_bytes)


# -- (a) parsing and validators ------------------------------------------------------------------


def validators(req: dict[str, Any]) -> Iterator[Callable[[], object]]:
    """Every validator of the protocol module, bound to ``req``."""
    yield lambda: P.command_of(req)
    yield lambda: P.req_id_of(req)
    yield lambda: P.check_queue(req)
    yield lambda: P.check_id(req)
    yield lambda: P.check_ids(req)
    yield lambda: P.check_ids(req, "depends_on")
    yield lambda: P.job_spec(req)
    yield lambda: P.check_jobs(req)
    yield lambda: P.check_count(req, required=True)
    yield lambda: P.check_count(req, required=False)
    yield lambda: P.check_limit(req)
    yield lambda: P.check_progress(req)
    yield lambda: P.check_events(req)
    yield lambda: P.check_str(req, "name")
    yield lambda: P.check_str(req, "schedule", 256)
    yield lambda: P.check_data(req)
    for name in INT_FIELDS:
        yield partial(P.opt_int, req, name, 0, P.MAX_MS)
    for name in STR_FIELDS:
        yield partial(P.opt_str, req, name)


def only_invalid_request(req: dict[str, Any]) -> None:
    for check in validators(req):
        try:
            check()
        except InvalidRequest as exc:
            assert str(exc).startswith("Invalid: ")


@FUZZ
@given(line=st.binary(max_size=300) | near_misses())
def test_parse_line_raises_only_invalid_request_for_any_bytes(line: bytes) -> None:
    try:
        req = P.parse_line(line)
    except InvalidRequest as exc:
        assert str(exc).startswith("Invalid: ")
        return
    assert type(req) is dict
    only_invalid_request(req)


@FUZZ
@given(req=requests)
def test_validators_raise_only_invalid_request_for_any_json_object(req: dict[str, Any]) -> None:
    only_invalid_request(req)
    assert P.parse_line(orjson.dumps(req)) == req


@FUZZ
@given(schedule=schedules)
def test_engine_refuses_any_bad_cron_schedule_with_invalid_request(schedule: str) -> None:
    engine = Engine(FakeClock())
    try:
        engine.crons.add("fuzz", "q", b"1", schedule, 0)
    except InvalidRequest:
        assert "fuzz" not in engine.crons.entries


def depth_of(value: Any) -> int:
    """Levels of arrays and objects, the plain recursive way (``[]`` is 1)."""
    if type(value) is list:
        return 1 + max(map(depth_of, value), default=0)
    if type(value) is dict:
        return 1 + max(map(depth_of, value.values()), default=0)
    return 0


class Nested:
    """A value nested along one path, built from the inside out: the value (when it is not
    deeper than Python's recursion lets a checker go), its JSON text, and its depth."""

    def __init__(self, leaf: Any) -> None:
        self.value: Any = leaf
        self.text = orjson.dumps(leaf)
        self.depth = depth_of(leaf)

    def wrap(self, siblings: list[Any], in_array: bool, at: int) -> None:
        texts = [orjson.dumps(v) for v in siblings]
        self.depth = 1 + max([self.depth, *map(depth_of, siblings)])
        if in_array:
            at = min(at, len(siblings))
            self.value = [*siblings[:at], self.value, *siblings[at:]]
            self.text = b"[" + b",".join([*texts[:at], self.text, *texts[at:]]) + b"]"
        else:
            self.value = {**{f"s{i}": v for i, v in enumerate(siblings)}, "k": self.value}
            keys = [b'"s%d":' % i + t for i, t in enumerate(texts)]
            self.text = b"{" + b",".join([*keys, b'"k":' + self.text]) + b"}"


@st.composite
def nested(draw: st.DrawFn, max_depth: int = 300) -> Nested:
    """Up to ``max_depth`` levels, arrays or objects, small siblings at a few levels, and now
    and then a level wide enough that the check lets the encoder count."""
    out = Nested(draw(json_values))
    depth = draw(st.integers(0, max_depth))
    kinds = draw(st.binary(min_size=depth, max_size=depth))
    extras = draw(st.dictionaries(st.integers(0, max(0, depth - 1)),
                                  st.lists(json_values, min_size=1, max_size=2), max_size=4))
    wide = draw(st.none() | st.tuples(st.integers(0, max(0, depth - 1)), st.integers(100, 400)))
    for level in range(depth):
        siblings = list(extras.get(level, []))
        if wide is not None and wide[0] == level:
            siblings += [{"w": [1]}] * wide[1]
        out.wrap(siblings, bool(kinds[level] & 1), kinds[level] >> 1)
    return out


@FUZZ
@given(value=nested(), limit=st.integers(1, 200))
def test_nesting_check_agrees_with_a_recursive_depth(value: Nested, limit: int) -> None:
    assert value.depth == depth_of(value.value)
    within = value.depth <= limit
    assert P.nesting_within(value.value, limit) == within
    assert P.nesting_within(value.value, limit, value.text) == within
    try:  # the node's path: the JSON it keeps, or the refusal
        kept = client_json(value.value, limit)
    except InvalidRequest as exc:
        assert not within and str(exc) == f"Invalid: nesting deeper than {limit}"
    else:
        assert within and kept == orjson.dumps(value.value)


#: Where a node keeps a client's JSON: the fields a deep value is put in.
KEPT = {
    "PUSH": b'{"cmd":"PUSH","queue":"fuzz","data":@}',
    "PUSHB": b'{"cmd":"PUSHB","queue":"fuzz","jobs":[{"data":1},{"data":@}]}',
    "CRON": b'{"cmd":"CRON","name":"deep","queue":"fuzz","schedule":"*/60","data":@}',
    "ACK": b'{"cmd":"ACK","id":1025,"result":@}',
    "ACKB": b'{"cmd":"ACKB","ids":[1025],"results":[@]}',
}


# -- (b) a live node ------------------------------------------------------------------------------


class NodeThread:
    """A real node on its own event loop thread, so hypothesis can drive it synchronously."""

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self.port = 0
        self.errors: list[str] = []
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.set_exception_handler(lambda _loop, ctx: self.errors.append(repr(ctx)))
        self._stop = asyncio.Event()
        node = Node(self.settings)
        await node.start()
        self.port = node.tcp_port
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await node.stop()

    def __enter__(self) -> NodeThread:
        self._thread.start()
        assert self._ready.wait(10), "node did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


class LineClient:
    """One blocking socket; every read is bounded by a timeout, so a hang fails the test."""

    def __init__(self, port: int, rcvbuf: int = 0) -> None:
        self.sock = socket.socket()
        if rcvbuf:  # before connecting: a window shrunk later can stall a loopback connection
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(5.0)
        self.sock.connect(("127.0.0.1", port))
        self.reader = self.sock.makefile("rb")
        self.sent = 0

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def answers(self, line: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
        """Send ``line`` then a STATS sentinel; return both answers (exactly one each)."""
        self.sent += 1
        sentinel = orjson.dumps({"cmd": "STATS", "reqId": f"sentinel-{self.sent}"})
        self.sock.sendall(line + b"\n" + sentinel + b"\n")
        first = self.read()
        second = self.read()
        assert second.get("reqId") == f"sentinel-{self.sent}", (line, first, second)
        assert second["ok"] is True
        return first, second

    def read(self) -> dict[str, Any]:
        raw = self.reader.readline()
        assert raw.endswith(b"\n"), "the server closed the connection"
        answer = json.loads(raw)
        assert type(answer) is dict and type(answer.get("ok")) is bool, answer
        return answer


@pytest.fixture
def live() -> Iterator[tuple[NodeThread, LineClient]]:
    with NodeThread(NodeSettings(port=0, http_port=0)) as node:
        client = LineClient(node.port)
        try:
            yield node, client
        finally:
            client.close()
        assert node.errors == [], node.errors


def check_refusal(answer: dict[str, Any], context: object) -> None:
    if answer["ok"]:
        return
    assert list(answer)[:2] == ["ok", "error"], (context, answer)
    text = answer["error"]
    assert type(text) is str, (context, answer)
    assert text.startswith("Invalid: ") or DOCUMENTED.fullmatch(text), (context, answer)


def test_node_answers_every_fuzzed_byte_line_exactly_once(
    live: tuple[NodeThread, LineClient],
) -> None:
    node, client = live

    @FUZZ
    @given(line=byte_lines)
    def one_line(line: bytes) -> None:
        answer, _ = client.answers(line)
        check_refusal(answer, line)
        if not answer["ok"]:
            try:
                parsed = orjson.loads(line)
            except orjson.JSONDecodeError:
                assert answer["error"].startswith("Invalid: "), (line, answer)
            else:
                if type(parsed) is not dict:
                    assert answer["error"].startswith("Invalid: "), (line, answer)

    one_line()
    assert node.errors == []
    assert client.answers(b'{"cmd":"STATS"}')[0]["ok"] is True


def test_node_answers_every_fuzzed_json_object_exactly_once(
    live: tuple[NodeThread, LineClient],
) -> None:
    node, client = live

    @FUZZ
    @given(req=requests.map(tame))
    def one_object(req: dict[str, Any]) -> None:
        answer, _ = client.answers(orjson.dumps(req))
        check_refusal(answer, req)
        if type(req.get("reqId")) is str:
            assert answer.get("reqId") == req["reqId"], (req, answer)
        if req.get("cmd") not in C.COMMANDS:
            assert not answer["ok"] and answer["error"].startswith("Invalid: "), (req, answer)

    one_object()
    assert node.errors == []
    stats = client.answers(b'{"cmd":"STATS"}')[0]
    assert stats["ok"] is True and {"queued", "processing", "delayed", "dlq"} <= stats.keys()


def test_node_keeps_or_refuses_values_of_any_depth(live: tuple[NodeThread, LineClient]) -> None:
    node, client = live

    @settings(FUZZ, max_examples=120)
    @given(value=nested(max_depth=1100), where=st.sampled_from(sorted(KEPT)))
    def one_value(value: Nested, where: str) -> None:
        answer, _ = client.answers(KEPT[where].replace(b"@", value.text))
        depth = value.depth
        if depth > 1020:  # with the request around it, past what orjson decodes (1024)
            assert answer["ok"] is False and answer["error"].startswith("Invalid: "), answer
        elif depth > P.MAX_DEPTH:
            assert answer == {"ok": False, "error": "Invalid: nesting deeper than 128"}, (
                where, depth, answer)
        else:
            check_refusal(answer, (where, depth))
            assert "nesting" not in answer.get("error", ""), (where, depth, answer)

    one_value()
    assert node.errors == []


#: The output budget of ``budgeted``: most answers of the pipelines pass it.
BUDGET = 16 * 1024


@pytest.fixture
def budgeted() -> Iterator[tuple[NodeThread, LineClient]]:
    """A node whose connections have a small output budget."""
    from shardq_server.limits import Limits

    settings = NodeSettings(port=0, http_port=0, limits=Limits(max_output=BUDGET))
    with NodeThread(settings) as node:
        # the kernel holds little (not under loopback's 64 KiB segment: TCP would stall): the
        # node's budget, not socket buffers, takes what is unread
        client = LineClient(node.port, rcvbuf=65536)
        try:
            yield node, client
        finally:
            client.close()
        assert node.errors == [], node.errors


def test_node_answers_pipelines_of_large_answers_past_its_budget_in_order(
    budgeted: tuple[NodeThread, LineClient],
) -> None:
    _node, client = budgeted
    seq = [0]

    @FUZZ
    @given(sizes=st.lists(st.integers(0, 48 * 1024), min_size=1, max_size=6),
           reads=st.lists(st.tuples(st.sampled_from(["GETJOB", "PULLB", "DLQ", "GETRESULT"]),
                                    st.integers(0, 5)), min_size=1, max_size=40))
    def pipeline(sizes: list[int], reads: list[tuple[str, int]]) -> None:
        seq[0] += 1
        queue = f"big{seq[0]}"
        pushes = [orjson.dumps({"cmd": "PUSH", "queue": queue, "data": "x" * n}) for n in sizes]
        client.sock.sendall(b"\n".join(pushes) + b"\n")
        ids = [client.read()["id"] for _ in sizes]
        lines = []
        for n, (cmd, pick) in enumerate(reads):
            req: dict[str, Any] = {"cmd": cmd, "reqId": n}
            if cmd in ("GETJOB", "GETRESULT"):
                req["id"] = ids[pick % len(ids)]
            else:
                req.update(queue=queue, count=pick + 1, timeout=0)
            lines.append(orjson.dumps(req))
        client.sock.sendall(b"\n".join(lines) + b"\n")  # all sent before any is read
        for n, (cmd, _) in enumerate(reads):
            raw = client.reader.readline()
            answer = orjson.loads(raw)
            assert answer.get("reqId") == n and answer["ok"] is True, (cmd, answer)
            if cmd == "PULLB":  # stops adding jobs past the budget (at least one)
                assert len(raw) <= BUDGET + max(sizes) + 4096, (len(raw), sizes)

    pipeline()
    assert client.answers(b'{"cmd":"STATS"}')[0]["ok"] is True
