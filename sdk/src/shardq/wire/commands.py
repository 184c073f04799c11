"""The one table of protocol commands: every fact about each command, in one row.

A row says how the command is routed (by its queue's slot, by its job id's slot, by a list
of ids split per owner, fanned out to every owner and merged, answered by whoever received
it, kept on a subscription connection, or internal to the cluster), whether it changes
state (refused while storage fails, on a follower, or during a switchover), whether it
may wait, and which fields name its route (checked in the order a node's handler checks
them, so a gateway refuses an unroutable line with exactly the node's words). The node's
dispatch and slot checks, the gateway's routes and metric labels, the client's routing,
the HTTP API and the fuzz tests all read this table: adding a command is a row here, the
engine method, and its handler.

Must not: import anything but the protocol's checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from shardq.wire import protocol as P

Request = P.Request


class Route(Enum):
    QUEUE = "queue"  # the owner of slot_of(queue)
    ID = "id"  # the owner of id % 1024
    IDS = "ids"  # split per owner of each id, answers merged in order
    FANOUT = "fanout"  # every owner, answers merged
    SUBSCRIPTION = "subscription"  # every owner, on the subscriber's own connections
    LOCAL = "local"  # answered by the process that received it
    INTERNAL = "internal"  # nodes only, with the cluster token


def _queue(req: Request) -> None:
    P.check_queue(req)


def _id(req: Request) -> None:
    P.check_id(req)


def _ids(req: Request) -> None:
    P.check_ids(req)


def _cron(req: Request) -> None:
    P.check_str(req, "name")
    P.check_queue(req)


def _name(req: Request) -> None:
    P.check_str(req, "name")


def _nothing(req: Request) -> None:
    """No field routes it."""


@dataclass(frozen=True)
class Command:
    name: str
    route: Route
    #: changes state: refused while storage fails, on a follower, during a switchover
    writes: bool
    #: may wait for jobs (a PULL): it holds back the answers behind it on its connection
    blocks: bool = False
    #: checks the fields the route needs, raising the node's ``Invalid: …``
    validate: Callable[[Request], None] = _nothing
    #: in MagicQueue's protocol or shardq's client additions (not internal, not RELEASE)
    public: bool = True
    #: answered by a node that is not its shard's primary too (DESIGN §9)
    follower: bool = False


def _row(name: str, route: Route, writes: bool, **kw: object) -> tuple[str, Command]:
    validate = {Route.QUEUE: _queue, Route.ID: _id, Route.IDS: _ids}.get(route, _nothing)
    kw.setdefault("validate", validate)
    return name, Command(name, route, writes, **kw)  # type: ignore[arg-type]


Q, ID, S, F, SUB, L, X = (Route.QUEUE, Route.ID, Route.IDS, Route.FANOUT, Route.SUBSCRIPTION,
                          Route.LOCAL, Route.INTERNAL)

TABLE: dict[str, Command] = dict([
    _row("PUSH", Q, True),
    _row("PUSHB", Q, True),
    _row("PULL", Q, True, blocks=True),
    _row("PULLB", Q, True, blocks=True),
    _row("ACK", ID, True),
    _row("ACKB", S, True),
    _row("FAIL", ID, True),
    _row("GETRESULT", ID, False),
    _row("CANCEL", ID, True),
    _row("PROGRESS", ID, True),
    _row("GETPROGRESS", ID, False),
    _row("GETJOB", ID, False),
    _row("TOUCH", ID, False),  # extends a lease in memory; not logged
    _row("DLQ", Q, False),
    _row("RETRYDLQ", Q, True),
    _row("SUBSCRIBE", SUB, False),
    _row("UNSUBSCRIBE", SUB, False),
    _row("METRICS", F, False, follower=True),
    _row("STATS", F, False, follower=True),
    _row("LISTQUEUES", F, False, follower=True),
    _row("CRONLIST", F, False),
    _row("CRONDELETE", F, True, validate=_name),
    _row("CRON", Q, True, validate=_cron),
    _row("RATELIMIT", Q, True),
    _row("RATELIMITCLEAR", Q, True),
    _row("PAUSE", Q, True),
    _row("RESUME", Q, True),
    _row("SETCONCURRENCY", Q, True),
    _row("CLEARCONCURRENCY", Q, True),
    _row("AUTH", L, False, follower=True),
    _row("TOPOLOGY", L, False, follower=True),
    # a gateway hands back the leases of a client that left (split per owner like ACKB)
    _row("RELEASE", S, True, public=False),
    # the cluster's own (DESIGN §5, §9): the coordinator's and the nodes' among themselves
    _row("SETTOPOLOGY", X, False, public=False, follower=True),
    _row("EXPORT", X, False, public=False),
    _row("IMPORT", X, True, public=False),
    _row("DROPSLOTS", X, True, public=False),
    _row("WATCH", X, True, public=False),
    _row("PARENTEND", X, True, public=False),
    _row("STATUS", X, False, public=False, follower=True),
    _row("FENCE", X, False, public=False, follower=True),
    _row("FOLLOW", X, False, public=False, follower=True),
    _row("HANDOFF", X, False, public=False, follower=True),
])

#: The client-facing commands, in the protocol's order.
COMMANDS = tuple(name for name, c in TABLE.items() if c.public)
QUEUE_ROUTED = frozenset(n for n, c in TABLE.items() if c.route is Route.QUEUE)
ID_ROUTED = frozenset(n for n, c in TABLE.items() if c.route is Route.ID)
IDS_ROUTED = frozenset(n for n, c in TABLE.items() if c.route is Route.IDS)
INTERNAL = frozenset(n for n, c in TABLE.items() if c.route is Route.INTERNAL)
#: What a node still answers while its storage refuses writes.
READ_ONLY = frozenset(n for n, c in TABLE.items() if not c.writes)
#: What a node answers itself when it is not its shard's primary.
FOLLOWER_OK = frozenset(n for n, c in TABLE.items() if c.follower)
