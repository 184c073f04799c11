"""What each command needs checked before it can be routed, and where it goes.

The gateway validates only the fields it routes by, with the checks of
``shardq.protocol`` in the order a node's handler runs them, so a line it
cannot route gets exactly the ``Invalid: …`` a node would give; everything
else about a request is the owner node's to check, and the original line goes
to it unchanged.

- queue commands (PUSH, PUSHB, PULL, PULLB, DLQ, RETRYDLQ, PAUSE, RESUME,
  RATELIMIT, RATELIMITCLEAR, SETCONCURRENCY, CLEARCONCURRENCY, CRON): the owner
  of ``slot_of(queue)``. PUSHB and PULLB name one queue, so a batch goes to one
  node whole: no splitting, and a batch keeps its all-or-nothing answer.
- id commands (ACK, FAIL, GETRESULT, CANCEL, PROGRESS, GETPROGRESS, GETJOB,
  TOUCH): the owner of ``id % 1024``.
- ACKB, RELEASE: split per owner (calls.Split).
- STATS, METRICS, LISTQUEUES, CRONLIST, CRONDELETE: every node, merged (merge.py).
- TOPOLOGY, AUTH: answered by the gateway. SUBSCRIBE/UNSUBSCRIBE: every node, on
  the session's own connections (subscriptions.py).
- The internal cluster commands (SETTOPOLOGY, EXPORT, IMPORT, DROPSLOTS) are
  refused: they are for the nodes, from the coordinator.

Must not: re-encode a line it can forward as is, or do I/O itself.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from shardq import protocol as P
from shardq.errors import InvalidRequest, InvalidToken
from shardq.slots import SLOTS

from . import merge
from .calls import BLOCKING, FOREVER, TRACK, Merge, answer_line

if TYPE_CHECKING:
    from .server_tcp import ClientSession

Rid = str | int | None
Route = Callable[["ClientSession", P.Request, bytes, Rid], None]

INTERNAL = frozenset({"SETTOPOLOGY", "EXPORT", "IMPORT", "DROPSLOTS"})


def to_queue(s: ClientSession, req: P.Request, line: bytes, rid: Rid) -> None:
    queue = req.get("queue")
    if type(queue) is not str or not 0 < len(queue) <= P.MAX_QUEUE_NAME:
        queue = P.check_queue(req)  # raises the node's words for it
    s.forward(line, s.router.slot_of_queue(queue), rid, 0)


def cron(s: ClientSession, req: P.Request, line: bytes, rid: Rid) -> None:
    P.check_str(req, "name")  # a node checks the name first
    to_queue(s, req, line, rid)


def pull(s: ClientSession, req: P.Request, line: bytes, rid: Rid) -> None:
    queue = P.check_queue(req)
    _pull(s, req, line, rid, queue)


def pullb(s: ClientSession, req: P.Request, line: bytes, rid: Rid) -> None:
    queue = P.check_queue(req)
    P.check_count(req, required=True)
    _pull(s, req, line, rid, queue)


def _pull(s: ClientSession, req: P.Request, line: bytes, rid: Rid, queue: str) -> None:
    """``timeout: 0`` shares a pipelined connection; a pull that may wait gets its own."""
    timeout = P.pull_timeout(req)
    slot = s.router.slot_of_queue(queue)
    if timeout == 0:
        s.forward(line, slot, rid, TRACK)
    elif timeout is None:
        try:
            chunked = orjson.dumps({**req, "timeout": s.settings.pull_chunk_ms})
        except TypeError:  # a field nested deeper than the encoder goes (parsed JSON: no other)
            raise P.too_deep(s.limits.max_depth) from None
        s.forward(chunked, slot, rid, BLOCKING | FOREVER)
    else:
        s.forward(line, slot, rid, BLOCKING)


def by_id(s: ClientSession, req: P.Request, line: bytes, rid: Rid) -> None:
    s.forward(line, P.check_id(req) % SLOTS, rid, 0)


def settle(s: ClientSession, req: P.Request, line: bytes, rid: Rid) -> None:
    """ACK, FAIL, CANCEL: the job is no longer this client's to hand back."""
    job_id = P.check_id(req)
    s.leases.pop(job_id, None)
    s.forward(line, job_id % SLOTS, rid, 0)


def ackb(s: ClientSession, req: P.Request, line: bytes, rid: Rid) -> None:
    ids = P.check_ids(req)
    results = req.get("results")
    if results is not None and (type(results) is not list or len(results) != len(ids)):
        raise InvalidRequest("field 'results' must be an array as long as 'ids'")
    s.settled(ids)
    s.split("ACKB", ids, results, rid, line)


def release(s: ClientSession, req: P.Request, line: bytes, rid: Rid) -> None:
    ids = P.check_ids(req)
    s.settled(ids)
    s.split("RELEASE", ids, None, rid, line)


def fan_out(merge_fn: Merge, cmd: str) -> Route:
    line = orjson.dumps({"cmd": cmd})

    def route(s: ClientSession, req: P.Request, _line: bytes, rid: Rid) -> None:
        s.fan_out(line, merge_fn, rid)

    return route


def crondelete(s: ClientSession, req: P.Request, line: bytes, rid: Rid) -> None:
    name = P.check_str(req, "name")
    s.fan_out(orjson.dumps({"cmd": "CRONDELETE", "name": name}), merge.crondelete, rid)


def topology(s: ClientSession, req: P.Request, line: bytes, rid: Rid) -> None:
    topo: Any = s.router.topology.wire() if s.router.epoch >= 0 else None
    s.local(answer_line({"ok": True, "topology": topo}, rid))


def auth(s: ClientSession, req: P.Request, line: bytes, rid: Rid) -> None:
    token = req.get("token")
    if token is None:
        raise InvalidRequest("missing field 'token'")
    if not authenticate(s.settings.tokens, token):
        raise InvalidToken()
    s.authed = True
    s.local(answer_line({"ok": True}, rid))


def authenticate(tokens: tuple[str, ...], token: object) -> bool:
    """Like a node: any token when none are configured; constant-time compare of each."""
    if not tokens:
        return True
    if type(token) is not str:
        return False
    given = token.encode()
    ok = False
    for known in tokens:  # check every token: time does not tell which matched
        ok |= hmac.compare_digest(given, known.encode())
    return ok


def subscribe(s: ClientSession, req: P.Request, line: bytes, rid: Rid) -> None:
    queue = P.check_queue(req)
    P.check_events(req)
    s.subscriptions().subscribe(queue, line, rid)


def unsubscribe(s: ClientSession, req: P.Request, line: bytes, rid: Rid) -> None:
    queue = P.check_queue(req)
    s.subscriptions().unsubscribe(queue, rid)


def unknown(req: P.Request) -> InvalidRequest:
    """The refusal of a command the gateway has no route for (as a node words it)."""
    cmd = P.command_of(req)
    if cmd in INTERNAL:
        return InvalidRequest(f"'{cmd}' is an internal command: send it to a node, not a gateway")
    return InvalidRequest(f"unknown command '{cmd[:64]}'")


ROUTES: dict[str, Route] = {
    **dict.fromkeys(
        ("PUSH", "PUSHB", "DLQ", "RETRYDLQ", "PAUSE", "RESUME", "RATELIMIT", "RATELIMITCLEAR",
         "SETCONCURRENCY", "CLEARCONCURRENCY"), to_queue),
    "CRON": cron, "PULL": pull, "PULLB": pullb,
    **dict.fromkeys(("GETRESULT", "PROGRESS", "GETPROGRESS", "GETJOB", "TOUCH"), by_id),
    **dict.fromkeys(("ACK", "FAIL", "CANCEL"), settle),
    "ACKB": ackb, "RELEASE": release,
    "STATS": fan_out(merge.stats, "STATS"), "METRICS": fan_out(merge.metrics, "METRICS"),
    "LISTQUEUES": fan_out(merge.listqueues, "LISTQUEUES"),
    "CRONLIST": fan_out(merge.cronlist, "CRONLIST"), "CRONDELETE": crondelete,
    "TOPOLOGY": topology, "AUTH": auth, "SUBSCRIBE": subscribe, "UNSUBSCRIBE": unsubscribe,
}
assert set(ROUTES) == {*P.COMMANDS, "RELEASE"}
