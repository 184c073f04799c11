"""The TCP wire contract: parsing and validating request lines, encoding answers.

One JSON object per line each way (see PROTOCOL.md). Every process shares
this module: nodes validate with it, gateways validate before routing, the
SDK encodes with it. Validation normalises a request in place (absent or
``null`` optional fields get their defaults) or raises ``InvalidRequest``
naming exactly what was wrong. No I/O here.
"""

from __future__ import annotations

from typing import Any

import orjson

from shardq.errors import InvalidRequest
from shardq.wire.job import EVENTS

Request = dict[str, Any]

DEFAULT_MAX_LINE = 16 * 1024 * 1024
MAX_QUEUE_NAME = 512
MAX_PRIORITY = 2**31 - 1
MIN_PRIORITY = -(2**31)
#: delay, ttl, timeout, backoff and lease extensions are capped at ~10 years.
MAX_MS = 10 * 365 * 24 * 3600 * 1000
MAX_COUNT = 100_000
MAX_ATTEMPTS = 2**31 - 1
#: Levels of arrays and objects a value the node keeps (``data``, ``result``) may nest. The
#: answers that carry such a value wrap it in up to 4 more levels, and orjson encodes at
#: most ``ENCODER_DEPTH`` (254): 128 leaves room, and nobody needs more.
MAX_DEPTH = 128

OK_LINE = b'{"ok":true}\n'

_JSON_TYPES = {
    type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string",
    list: "array", dict: "object",
}


def json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def parse_line(line: bytes) -> Request:
    """Decode one request line into a dict; raise InvalidRequest if it is not one."""
    if not line.strip():
        raise InvalidRequest("empty line")
    try:
        req = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"line is not valid JSON ({exc.msg} at byte {exc.pos})") from None
    if type(req) is not dict:
        raise InvalidRequest(f"request must be a JSON object, got {json_type(req)}")
    return req


def command_of(req: Request) -> str:
    cmd = req.get("cmd")
    if cmd is None:
        raise InvalidRequest("missing field 'cmd'")
    if type(cmd) is not str:
        raise InvalidRequest(f"field 'cmd' must be a string, got {json_type(cmd)}")
    return cmd


def req_id_of(req: Request) -> str | int | None:
    """The optional ``reqId`` to echo; strings and integers are accepted."""
    rid = req.get("reqId")
    if rid is None or type(rid) is str or type(rid) is int:
        return rid
    raise InvalidRequest(f"field 'reqId' must be a string, got {json_type(rid)}")


# -- nesting ----------------------------------------------------------------------------------


def _encodes(depth: int) -> bool:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    try:
        orjson.dumps(value)
    except TypeError:
        return False
    return True


def _encoder_depth() -> int:
    """The deepest nesting orjson encodes (254 in every release so far), found by bisection."""
    lo, hi = 1, 4096  # encodes lo levels, not hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _encodes(mid) else (lo, mid)
    return lo


ENCODER_DEPTH = _encoder_depth()
#: Up to this size, counting brackets in the JSON text is cheaper than encoding once more.
COUNT_BELOW = 8192
_CONTAINERS = frozenset((dict, list))
_is_container = _CONTAINERS.__contains__
_wrappers: dict[int, tuple[list[Any], list[Any]]] = {}


def too_deep(limit: int = MAX_DEPTH) -> InvalidRequest:
    return InvalidRequest(f"nesting deeper than {limit}")


def nesting_within(value: Any, limit: int = MAX_DEPTH, text: bytes | None = None) -> bool:
    """Does ``value`` nest at most ``limit`` levels of arrays and objects (``[]`` is 1)?

    ``text`` is its JSON, if at hand. Cheapest first, all in C: a short text with at most
    ``limit`` brackets cannot nest deeper; a value whose own items hold no array or object
    is 1 level; else orjson's encoder counts (``encode_within``).
    """
    if text is not None and len(text) < COUNT_BELOW and \
            text.count(b"[") + text.count(b"{") <= limit:
        return True
    if is_flat(value):
        return True
    return encode_within(value, limit) is not None


def is_flat(value: Any) -> bool:
    """A scalar, or an array or object of scalars (one pass in C over its items)."""
    kind = type(value)
    if kind is dict:
        return not any(map(_is_container, map(type, value.values())))
    if kind is list:
        return not any(map(_is_container, map(type, value)))
    return True


def encode_within(value: Any, limit: int) -> bytes | None:
    """``value``'s JSON, or None if it nests deeper than ``limit``: encoded inside
    ``ENCODER_DEPTH - limit`` levels of arrays, which orjson refuses exactly then."""
    wrap = _wrappers.get(limit)
    if wrap is None:
        if not 0 < limit < ENCODER_DEPTH:
            raise ValueError(f"a nesting limit must be between 1 and {ENCODER_DEPTH - 1}")
        inner: list[Any] = []
        outer = inner
        for _ in range(ENCODER_DEPTH - limit - 1):
            outer = [outer]
        wrap = _wrappers[limit] = (outer, inner)
    outer, inner = wrap
    inner.append(value)
    try:
        text = orjson.dumps(outer)
    except TypeError:
        return None
    finally:
        inner.clear()
    levels = ENCODER_DEPTH - limit
    return text[levels:-levels]


# -- field checks -----------------------------------------------------------------------------


def _missing(name: str) -> InvalidRequest:
    return InvalidRequest(f"missing field '{name}'")


def check_queue(req: Request, name: str = "queue") -> str:
    q = req.get(name)
    if type(q) is str and 0 < len(q) <= MAX_QUEUE_NAME:
        return q
    if q is None:
        raise _missing(name)
    if type(q) is str:
        raise InvalidRequest(f"field '{name}' must be 1 to {MAX_QUEUE_NAME} characters long")
    raise InvalidRequest(f"field '{name}' must be a string, got {json_type(q)}")


def check_id(req: Request, name: str = "id") -> int:
    v = req.get(name)
    if type(v) is int and v >= 0:
        return v
    if v is None:
        raise _missing(name)
    raise InvalidRequest(f"field '{name}' must be a non-negative integer, got {_shown(v)}")


def _shown(v: object) -> str:
    if type(v) in (int, float):
        return repr(v)
    return json_type(v)


def opt_int(req: Request, name: str, lo: int, hi: int, default: int = 0, where: str = "") -> int:
    v = req.get(name)
    if v is None:
        return default
    if type(v) is int and lo <= v <= hi:
        return v
    label = f"{where}{name}"
    if type(v) is int:
        raise InvalidRequest(f"field '{label}' must be between {lo} and {hi}, got {v}")
    raise InvalidRequest(f"field '{label}' must be an integer, got {_shown(v)}")


def opt_str(req: Request, name: str, where: str = "") -> str | None:
    v = req.get(name)
    if v is None or type(v) is str:
        return v
    raise InvalidRequest(f"field '{where}{name}' must be a string or null, got {json_type(v)}")


def check_ids(req: Request, name: str = "ids", where: str = "") -> list[int]:
    v = req.get(name)
    if v is None:
        raise _missing(where + name)
    if type(v) is not list:
        raise InvalidRequest(f"field '{where}{name}' must be an array of ids, got {json_type(v)}")
    if len(v) > MAX_COUNT:
        raise InvalidRequest(f"field '{where}{name}' holds {len(v)} ids (max {MAX_COUNT})")
    for i, item in enumerate(v):
        if type(item) is not int or item < 0:
            raise InvalidRequest(
                f"field '{where}{name}[{i}]' must be a non-negative integer, got {_shown(item)}"
            )
    return v


class JobSpec:
    """The validated options of one job to push (PUSH, each PUSHB item, cron)."""

    __slots__ = (
        "backoff", "data", "delay", "depends_on", "max_attempts", "priority", "timeout", "ttl",
        "unique_key",
    )

    def __init__(
        self,
        data: Any,
        priority: int = 0,
        delay: int = 0,
        ttl: int = 0,
        timeout: int = 0,
        max_attempts: int = 0,
        backoff: int = 0,
        unique_key: str | None = None,
        depends_on: list[int] | None = None,
    ) -> None:
        self.data = data
        self.priority = priority
        self.delay = delay
        self.ttl = ttl
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.unique_key = unique_key
        self.depends_on = depends_on


_PLAIN_KEYS = frozenset(("cmd", "queue", "data", "priority", "reqId"))


def job_spec(obj: Request, where: str = "") -> JobSpec:
    """Validate the job fields of a PUSH request or of one PUSHB item."""
    if "data" not in obj:
        raise _missing(where + "data")
    prio = obj.get("priority", 0)
    if type(prio) is not int or not MIN_PRIORITY <= prio <= MAX_PRIORITY:
        if type(prio) is int:
            raise InvalidRequest(
                f"field '{where}priority' must be between {MIN_PRIORITY} and {MAX_PRIORITY}"
            )
        raise InvalidRequest(f"field '{where}priority' must be an integer, got {_shown(prio)}")
    if len(obj) <= 5 and _PLAIN_KEYS.issuperset(obj):  # fast path: no options at all
        return JobSpec(obj["data"], prio)
    deps = obj.get("depends_on")
    if deps is not None:
        deps = check_ids(obj, "depends_on", where)
        if len(deps) > 10_000:
            raise InvalidRequest(f"field '{where}depends_on' holds more than 10000 ids")
    key = opt_str(obj, "unique_key", where)
    if key is not None and len(key) > 1024:
        raise InvalidRequest(f"field '{where}unique_key' is longer than 1024 characters")
    return JobSpec(
        obj["data"],
        prio,
        opt_int(obj, "delay", 0, MAX_MS, where=where),
        opt_int(obj, "ttl", 0, MAX_MS, where=where),
        opt_int(obj, "timeout", 0, MAX_MS, where=where),
        opt_int(obj, "max_attempts", 0, MAX_ATTEMPTS, where=where),
        opt_int(obj, "backoff", 0, MAX_MS, where=where),
        key,
        deps or None,
    )


def check_jobs(req: Request) -> list[JobSpec]:
    items = req.get("jobs")
    if items is None:
        raise _missing("jobs")
    if type(items) is not list:
        raise InvalidRequest(f"field 'jobs' must be an array, got {json_type(items)}")
    if len(items) > MAX_COUNT:
        raise InvalidRequest(f"field 'jobs' holds {len(items)} jobs (max {MAX_COUNT})")
    specs = []
    for i, item in enumerate(items):
        if type(item) is not dict:
            raise InvalidRequest(f"field 'jobs[{i}]' must be an object, got {json_type(item)}")
        specs.append(job_spec(item, f"jobs[{i}]."))
    return specs


def check_count(req: Request, required: bool, default: int = 100) -> int:
    v = req.get("count")
    if v is None:
        if required:
            raise _missing("count")
        return default
    if type(v) is int and 1 <= v <= MAX_COUNT:
        return v
    if type(v) is int:
        raise InvalidRequest(f"field 'count' must be between 1 and {MAX_COUNT}, got {v}")
    raise InvalidRequest(f"field 'count' must be an integer, got {_shown(v)}")


def check_limit(req: Request) -> int:
    v = req.get("limit")
    if v is None:
        raise _missing("limit")
    if type(v) is int and 1 <= v <= 1_000_000_000:
        return v
    raise InvalidRequest(f"field 'limit' must be a positive integer, got {_shown(v)}")


def check_progress(req: Request) -> int:
    v = req.get("progress")
    if v is None:
        raise _missing("progress")
    if type(v) is int and 0 <= v <= 255:
        return min(v, 100)
    raise InvalidRequest(f"field 'progress' must be an integer from 0 to 255, got {_shown(v)}")


def check_events(req: Request) -> list[str]:
    v = req.get("events")
    if v is None:
        return list(EVENTS)
    if type(v) is not list:
        raise InvalidRequest(f"field 'events' must be an array of event names, got {json_type(v)}")
    for name in v:
        if name not in EVENTS:
            raise InvalidRequest(
                f"unknown event {_shown_str(name)} (known: {', '.join(EVENTS)})"
            )
    return v


def _shown_str(v: object) -> str:
    return repr(v) if type(v) is str else json_type(v)


def pull_timeout(req: Request) -> int | None:
    """PULL/PULLB's ``timeout`` in ms: None = wait indefinitely (absent, null); 0 = no wait."""
    if req.get("timeout") is None:
        return None
    return opt_int(req, "timeout", 0, MAX_MS)


def check_str(req: Request, name: str, max_len: int = 1024) -> str:
    v = req.get(name)
    if type(v) is str and 0 < len(v) <= max_len:
        return v
    if v is None:
        raise _missing(name)
    if type(v) is str:
        raise InvalidRequest(f"field '{name}' must be 1 to {max_len} characters long")
    raise InvalidRequest(f"field '{name}' must be a string, got {json_type(v)}")


def check_data(req: Request) -> Any:
    if "data" not in req:
        raise _missing("data")
    return req["data"]


# -- answers ----------------------------------------------------------------------------------


def encode(answer: dict[str, Any]) -> bytes:
    return orjson.dumps(answer) + b"\n"


def error_answer(text: str, req_id: str | int | None = None) -> bytes:
    if req_id is None:
        return orjson.dumps({"ok": False, "error": text}) + b"\n"
    return orjson.dumps({"ok": False, "error": text, "reqId": req_id}) + b"\n"
