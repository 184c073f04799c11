"""The gateway's routes: what each command needs checked before it can be routed, and
where it goes. Every route takes the ``Client`` that sent the request (clients.py),
a TCP session or an in-process HTTP call alike.

The gateway validates only the fields it routes by, with the checks of
``shardq.wire.protocol`` in the order a node's handler runs them, so a line it
cannot route gets exactly the ``Invalid: …`` a node would give; everything
else about a request is the owner node's to check, and the original line goes
to it unchanged.

- queue commands (PUSH, PUSHB, PULL, PULLB, DLQ, RETRYDLQ, PAUSE, RESUME,
  RATELIMIT, RATELIMITCLEAR, SETCONCURRENCY, CLEARCONCURRENCY, CRON): the owner
  of ``slot_of(queue)``. PUSHB and PULLB name one queue, so a batch goes to one
  node whole: no splitting, and a batch keeps its all-or-nothing answer.
- id commands (ACK, FAIL, GETRESULT, CANCEL, PROGRESS, GETPROGRESS, GETJOB,
  TOUCH): the owner of ``id % 1024``.
- ACKB, RELEASE: split per owner (inflight.Split).
- Leases: the nodes see a gateway's shared connections, not its clients, so the
  gateway gives every lease-less ACK, FAIL, PROGRESS, TOUCH, ACKB and RELEASE the
  lease token it recorded when this client pulled the job (0 when it recorded
  none, which no attempt has): a client settles only the attempts it holds, as
  on a node. A token the client sent itself goes as is.
- STATS, METRICS, LISTQUEUES, CRONLIST, CRONDELETE: every node, merged (merge.py).
- TOPOLOGY, AUTH: answered by the gateway. SUBSCRIBE/UNSUBSCRIBE: every node, on
  the client's own connections (subscriptions.py).
- The internal cluster commands (SETTOPOLOGY, EXPORT, IMPORT, DROPSLOTS) are
  refused: they are for the nodes, from the coordinator.

Must not: re-encode a line it can forward as is, or do I/O itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from shardq.errors import InvalidRequest
from shardq.wire import commands as C
from shardq.wire import protocol as P
from shardq.wire.slots import SLOTS

from . import merge
from .inflight import BLOCKING, FOREVER, TRACK, Merge, answer_line, fan_out, forward, local, split

if TYPE_CHECKING:
    from .clients import Client

Rid = str | int | None
Route = Callable[["Client", P.Request, bytes, Rid], None]

INTERNAL = C.INTERNAL


def to_queue(s: Client, req: P.Request, line: bytes, rid: Rid) -> None:
    queue = req.get("queue")
    if type(queue) is not str or not 0 < len(queue) <= P.MAX_QUEUE_NAME:
        queue = P.check_queue(req)  # raises the node's words for it
    forward(s, line, s.router.slot_of_queue(queue), rid, 0)


def cron(s: Client, req: P.Request, line: bytes, rid: Rid) -> None:
    P.check_str(req, "name")  # a node checks the name first
    to_queue(s, req, line, rid)


def pull(s: Client, req: P.Request, line: bytes, rid: Rid) -> None:
    queue = P.check_queue(req)
    _pull(s, req, line, rid, queue)


def pullb(s: Client, req: P.Request, line: bytes, rid: Rid) -> None:
    queue = P.check_queue(req)
    P.check_count(req, required=True)
    _pull(s, req, line, rid, queue)


def _pull(s: Client, req: P.Request, line: bytes, rid: Rid, queue: str) -> None:
    """``timeout: 0`` shares a pipelined connection; a pull that may wait gets its own."""
    timeout = P.pull_timeout(req)
    slot = s.router.slot_of_queue(queue)
    if timeout == 0:
        forward(s, line, slot, rid, TRACK)
    elif timeout is None:
        try:
            chunked = orjson.dumps({**req, "timeout": s.settings.pull_chunk_ms})
        except TypeError:  # a field nested deeper than the encoder goes (parsed JSON: no other)
            raise P.too_deep(s.settings.limits.max_depth) from None
        forward(s, chunked, slot, rid, BLOCKING | FOREVER | TRACK)
    else:
        forward(s, line, slot, rid, BLOCKING | TRACK)


def by_id(s: Client, req: P.Request, line: bytes, rid: Rid) -> None:
    forward(s, line, P.check_id(req) % SLOTS, rid, 0)


def with_lease(req: P.Request, line: bytes, token: int) -> bytes:
    """``line`` with ``"lease": token`` added (the line parsed as ``req``: an object)."""
    if "lease" in req:  # "lease": null
        return orjson.dumps({**req, "lease": token})
    line = line.rstrip()
    return line[:-1] + b',"lease":%d}' % token


def settle(s: Client, req: P.Request, line: bytes, rid: Rid) -> None:
    """ACK, FAIL: the attempt this client holds (its recorded token); then no longer its
    to hand back."""
    job_id = P.check_id(req)
    token = s.leases.pop(job_id)
    if req.get("lease") is None:
        line = with_lease(req, line, token)
    forward(s, line, job_id % SLOTS, rid, 0)


def leased(s: Client, req: P.Request, line: bytes, rid: Rid) -> None:
    """PROGRESS, TOUCH: of the attempt this client holds (its recorded token)."""
    job_id = P.check_id(req)
    if req.get("lease") is None:
        line = with_lease(req, line, s.leases.get(job_id))
    forward(s, line, job_id % SLOTS, rid, 0)


def cancel(s: Client, req: P.Request, line: bytes, rid: Rid) -> None:
    """CANCEL (any job, no lease): if this client held it, not its to hand back any more."""
    job_id = P.check_id(req)
    s.leases.pop(job_id)
    forward(s, line, job_id % SLOTS, rid, 0)


def ackb(s: Client, req: P.Request, line: bytes, rid: Rid) -> None:
    ids = P.check_ids(req)
    fields: dict[str, list[Any]] = {}
    results = req.get("results")
    if results is not None:
        if type(results) is not list or len(results) != len(ids):
            raise InvalidRequest("field 'results' must be an array as long as 'ids'")
        fields["results"] = results
    _split_leased(s, "ACKB", req, ids, fields, line, rid)


def release(s: Client, req: P.Request, line: bytes, rid: Rid) -> None:
    _split_leased(s, "RELEASE", req, P.check_ids(req), {}, line, rid)


def _split_leased(s: Client, cmd: str, req: P.Request, ids: list[int],
                  fields: dict[str, list[Any]], line: bytes, rid: Rid) -> None:
    """ACKB, RELEASE: with the client's own ``leases``, or the tokens recorded for it."""
    if req.get("leases") is not None:
        leases = P.check_ids(req, "leases")
        if len(leases) != len(ids):
            raise InvalidRequest("field 'leases' must be an array as long as 'ids'")
        s.leases.settled(ids)
    else:
        leases = s.leases.settled(ids)
        line = orjson.dumps({**req, "leases": leases})
    split(s, cmd, ids, {**fields, "leases": leases}, rid, line)


def to_every_node(merge_fn: Merge, cmd: str) -> Route:
    line = orjson.dumps({"cmd": cmd})

    def route(s: Client, req: P.Request, _line: bytes, rid: Rid) -> None:
        fan_out(s, line, merge_fn, rid)

    return route


def listqueues(s: Client, req: P.Request, line: bytes, rid: Rid) -> None:
    """A page of queues: ``after`` and ``count`` go to every node, the pages merged."""
    page: dict[str, Any] = {"cmd": "LISTQUEUES"}
    if req.get("after") is not None:
        page["after"] = P.check_queue(req, "after")
    count = None
    if req.get("count") is not None:
        count = page["count"] = P.check_count(req, required=False)

    def merge_page(parts: list[tuple[str, dict[str, Any]]], router: Any) -> dict[str, Any]:
        return merge.listqueues(parts, router, count)

    fan_out(s, orjson.dumps(page), merge_page, rid)


def crondelete(s: Client, req: P.Request, line: bytes, rid: Rid) -> None:
    name = P.check_str(req, "name")
    fan_out(s, orjson.dumps({"cmd": "CRONDELETE", "name": name}), merge.crondelete, rid)


def topology(s: Client, req: P.Request, line: bytes, rid: Rid) -> None:
    topo: Any = s.router.topology.wire() if s.router.epoch >= 0 else None
    local(s, answer_line({"ok": True, "topology": topo}, rid))


def auth(s: Client, req: P.Request, line: bytes, rid: Rid) -> None:
    s.auth.check(req.get("token"))  # a gateway has no cluster token
    s.authed = True
    local(s, answer_line({"ok": True}, rid))


def subscribe(s: Client, req: P.Request, line: bytes, rid: Rid) -> None:
    queue = P.check_queue(req)
    P.check_events(req)
    s.subscriptions().subscribe(queue, line, rid)


def unsubscribe(s: Client, req: P.Request, line: bytes, rid: Rid) -> None:
    queue = P.check_queue(req)
    s.subscriptions().unsubscribe(queue, rid)


def command_name(cmd: object) -> str:
    """What an ``Internal: …`` answer calls the request: its command, if it is one."""
    return cmd if type(cmd) is str and cmd in ROUTES else "a request"


def unknown(req: P.Request) -> InvalidRequest:
    """The refusal of a command the gateway has no route for (as a node words it)."""
    cmd = P.command_of(req)
    if cmd in INTERNAL:
        return InvalidRequest(f"'{cmd}' is an internal command: send it to a node, not a gateway")
    return InvalidRequest(f"unknown command '{cmd[:64]}'")


#: The commands that need more than their route kind's default (below).
SPECIAL: dict[str, Route] = {
    "CRON": cron, "PULL": pull, "PULLB": pullb, "PROGRESS": leased, "TOUCH": leased,
    "ACK": settle, "FAIL": settle, "CANCEL": cancel, "ACKB": ackb, "RELEASE": release,
    "LISTQUEUES": listqueues, "CRONDELETE": crondelete, "TOPOLOGY": topology, "AUTH": auth,
    "SUBSCRIBE": subscribe, "UNSUBSCRIBE": unsubscribe,
}
#: How the answers of each other fan-out command are merged.
MERGES = {"STATS": merge.stats, "METRICS": merge.metrics, "CRONLIST": merge.cronlist}
_DEFAULT: dict[C.Route, Route] = {C.Route.QUEUE: to_queue, C.Route.ID: by_id}


def _route(name: str, command: C.Command) -> Route:
    """A command's route: its own, or its kind's (a fan-out one needs its merge). A row of
    the command table the gateway cannot route fails here, at import."""
    if name in SPECIAL:
        return SPECIAL[name]
    if command.route is C.Route.FANOUT:
        return to_every_node(MERGES[name], name)
    return _DEFAULT[command.route]


ROUTES: dict[str, Route] = {name: _route(name, c) for name, c in C.TABLE.items()
                            if c.route is not C.Route.INTERNAL}
