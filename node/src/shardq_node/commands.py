"""One handler per protocol command: validate, call the engine, shape the answer.

Handlers take the parsed request and the calling session and return the
answer object (a dict), or ``PENDING`` when a PULL must wait (the runtime
answers it later). They raise ``ShardqError`` for refusals; the caller turns
those into ``{"ok":false,...}``. Transport-agnostic: the TCP server and the
HTTP routes call the same handlers. No I/O here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from orjson import Fragment

from shardq.errors import (
    AuthenticationRequired,
    CronNotFound,
    InvalidRequest,
    PayloadTooLarge,
)
from shardq.wire import commands as C
from shardq.wire import protocol as P
from shardq.wire.job import EVENTS

from . import introspection
from .callers import Caller
from .jobs import Job, client_encoder

if TYPE_CHECKING:
    from .cluster import Cluster
    from .engine import Engine
    from .events import Events
    from .payloads import Payloads
    from .pulls import Pulls
    from .settings import NodeSettings
    from .storage import Storage

Answer = dict[str, Any]
OK: Answer = {"ok": True}


class Encoded(dict[str, Any]):
    """An answer already encoded as its line (the hot path: PUSH); ``line`` is the bytes."""

    __slots__ = ("line",)

    def __init__(self, line: bytes) -> None:
        super().__init__()
        self.line = line

PENDING: Answer = {"ok": None}  # sentinel: the answer comes later (blocked PULL)
Handler = Callable[[P.Request, "Caller"], Answer]


def encode_answer(answer: Answer, rid: str | int | None) -> bytes:
    """An answer as its line, with the request's ``reqId`` if it had one."""
    if rid is None:
        if answer is OK:
            return P.OK_LINE
        if type(answer) is Encoded:
            return answer.line
        return orjson.dumps(answer) + b"\n"
    if type(answer) is Encoded:
        answer = orjson.loads(answer.line)
    return orjson.dumps({**answer, "reqId": rid}) + b"\n"


def wire_result(result: bytes | None) -> Any:
    return None if result is None else Fragment(result)


class Commands:
    """The command table of a node, bound to the parts of the node its handlers use."""

    def __init__(self, *, settings: NodeSettings, engine: Engine, cluster: Cluster,
                 payloads: Payloads, pulls: Pulls, events: Events, storage: Storage | None,
                 log: Any, clock: Callable[[], int]) -> None:
        self.engine = engine  # the runtime's ``use_engine`` replaces it
        self.payloads = payloads
        self.pulls = pulls
        self.events = events
        self.storage = storage
        self.log = log  # the WAL (or MemoryLog): STATS tells whether it refuses writes
        self.clock = clock
        self.cluster = cluster
        self.max_payload = max_payload = settings.storage.max_payload
        request_limits = settings.request_limits
        self.max_result = request_limits.max_result or max_payload
        self.max_message = request_limits.max_message or max_payload
        self.max_cron_payload = min(request_limits.max_cron_payload, max_payload)
        self.max_list_queues = request_limits.max_list_queues
        limits = settings.limits
        #: The JSON the node keeps of a client's value; refused if it nests too deep.
        self.raw = client_encoder(limits.max_depth)
        #: PULLB and DLQ answers stop adding jobs once their payloads pass this.
        self.max_answer = limits.max_output
        self.tokens = cluster.auth  # AUTH: client and cluster tokens
        self.table: dict[str, Handler] = {name: getattr(self, name.lower()) for name in CLIENT}
        for name, fn in cluster.handlers().items():
            self.table[name] = self._internal(name, fn)

    def _internal(self, name: str, fn: Handler) -> Handler:
        def guarded(req: P.Request, caller: Caller) -> Answer:
            self.cluster.check_internal(name, caller)
            return fn(req, caller)

        return guarded

    def handler(self, cmd: str, caller: Caller) -> Handler:
        fn = self.table.get(cmd)
        if fn is None:
            raise InvalidRequest(f"unknown command '{cmd[:64]}'")
        if not caller.authed and cmd != "AUTH":
            raise AuthenticationRequired()
        return fn

    # -- jobs in ----------------------------------------------------------------------------

    def payload(self, data: Any) -> bytes:
        blob = self.raw(data)
        if len(blob) > self.max_payload:
            raise PayloadTooLarge(len(blob), self.max_payload)
        return blob

    def result(self, value: Any) -> bytes | None:
        """An ACK's ``result`` as the raw JSON kept for GETRESULT, within ``max_result``."""
        if value is None:
            return None
        blob = self.raw(value)
        if len(blob) > self.max_result:
            raise PayloadTooLarge(len(blob), self.max_result, "Result")
        return blob

    def text(self, req: P.Request, name: str, what: str) -> str | None:
        """An optional string field (PROGRESS ``message``, FAIL ``error``) within
        ``max_message`` bytes of UTF-8."""
        value = P.opt_str(req, name)
        if value is not None and len(value) * 4 > self.max_message:  # else it surely fits
            size = len(value) if value.isascii() else len(value.encode(errors="replace"))
            if size > self.max_message:
                raise PayloadTooLarge(size, self.max_message, what)
        return value

    def push(self, req: P.Request, caller: Caller) -> Answer:
        queue = req.get("queue")
        if type(queue) is not str or not 0 < len(queue) <= P.MAX_QUEUE_NAME:
            queue = P.check_queue(req)
        spec = P.job_spec(req)
        data = self.raw(spec.data)
        if len(data) > self.max_payload:
            raise PayloadTooLarge(len(data), self.max_payload)
        job_id = self.payloads.push(queue, [spec], [data])[0]
        if self.payloads.spilled:
            return {"ok": True, "id": job_id, "stored": "disk"}
        return Encoded(b'{"ok":true,"id":%d}\n' % job_id)

    def pushb(self, req: P.Request, caller: Caller) -> Answer:
        queue = P.check_queue(req)
        specs = P.check_jobs(req)
        raw = self.raw
        payloads = [raw(s.data) for s in specs]
        limit = self.max_payload
        for blob in payloads:
            if len(blob) > limit:
                raise PayloadTooLarge(len(blob), limit)
        return {"ok": True, "ids": self.payloads.push(queue, specs, payloads)}

    # -- jobs out -----------------------------------------------------------------------------

    def pull(self, req: P.Request, caller: Caller) -> Answer:
        queue = P.check_queue(req)
        timeout = _timeout(req)
        jobs = self.engine.pull(queue, caller.owner, 1)
        if jobs:
            return {"ok": True, "job": self.payloads.job_wire(jobs[0])}
        if timeout == 0:
            return {"ok": True, "job": None}
        return self.pulls.wait(caller, queue, 1, timeout, single=True)

    def pullb(self, req: P.Request, caller: Caller) -> Answer:
        queue = P.check_queue(req)
        count = P.check_count(req, required=True)
        timeout = _timeout(req)
        jobs = self.engine.pull(queue, caller.owner, count, self.max_answer)
        if jobs:
            return {"ok": True, "jobs": [self.payloads.job_wire(j) for j in jobs]}
        if timeout == 0:
            return {"ok": True, "jobs": []}
        return self.pulls.wait(caller, queue, count, timeout, single=False)

    def ack(self, req: P.Request, caller: Caller) -> Answer:
        job_id = P.check_id(req)
        lease = P.opt_int(req, "lease", 0, 2**63, default=-1)
        self.engine.ack(job_id, self.result(req.get("result")), _lease(lease), caller.owner)
        return OK

    def ackb(self, req: P.Request, caller: Caller) -> Answer:
        ids = P.check_ids(req)
        results = req.get("results")
        blobs: list[bytes | None] | None = None
        if results is not None:
            if type(results) is not list or len(results) != len(ids):
                raise InvalidRequest("field 'results' must be an array as long as 'ids'")
            blobs = [self.result(r) for r in results]
        leases = None
        if req.get("leases") is not None:
            leases = P.check_ids(req, "leases")
            if len(leases) != len(ids):
                raise InvalidRequest("field 'leases' must be an array as long as 'ids'")
        return {"ok": True, "ids": [self.engine.ack_batch(ids, blobs, leases, caller.owner)]}

    def fail(self, req: P.Request, caller: Caller) -> Answer:
        job_id = P.check_id(req)
        error = self.text(req, "error", "Error")
        lease = P.opt_int(req, "lease", 0, 2**63, default=-1)
        self.engine.fail(job_id, error, _lease(lease), caller.owner)
        return OK

    def touch(self, req: P.Request, caller: Caller) -> Answer:
        job_id = P.check_id(req)
        lease = P.opt_int(req, "lease", 0, 2**63, default=-1)
        extend = P.opt_int(req, "extend", 1, P.MAX_MS, default=0)
        deadline = self.engine.touch(job_id, _lease(lease), extend or None, caller.owner)
        return {"ok": True, "deadline": deadline}

    def cancel(self, req: P.Request, caller: Caller) -> Answer:
        self.engine.cancel(P.check_id(req))
        return OK

    def progress(self, req: P.Request, caller: Caller) -> Answer:
        job_id = P.check_id(req)
        value = P.check_progress(req)
        message = self.text(req, "message", "Message")
        lease = P.opt_int(req, "lease", 0, 2**63, default=-1)
        self.engine.progress(job_id, value, message, _lease(lease), caller.owner)
        return OK

    def getprogress(self, req: P.Request, caller: Caller) -> Answer:
        job_id = P.check_id(req)
        value, message = self.engine.get_progress(job_id)
        return {"ok": True, "progress": {"id": job_id, "progress": value, "message": message}}

    def getresult(self, req: P.Request, caller: Caller) -> Answer:
        job_id = P.check_id(req)
        return {"ok": True, "id": job_id, "result": wire_result(self.engine.get_result(job_id))}

    def getjob(self, req: P.Request, caller: Caller) -> Answer:
        job_id = P.check_id(req)
        found = self.engine.get_job(job_id)
        if found is None:
            return {"ok": True, "job": None}
        if isinstance(found, Job):
            return {"ok": True, "job": self.payloads.job_wire(found)}
        return {
            "ok": True,
            "job": {
                "id": job_id, "state": found.state.value, "finished_at": found.at,
                "result": wire_result(found.result),
            },
        }

    # -- DLQ ----------------------------------------------------------------------------------

    def dlq(self, req: P.Request, caller: Caller) -> Answer:
        queue = P.check_queue(req)
        count = P.check_count(req, required=False, default=100)
        jobs = self.engine.dlq(queue, count, self.max_answer)
        return {"ok": True, "jobs": [self.payloads.job_wire(j) for j in jobs]}

    def retrydlq(self, req: P.Request, caller: Caller) -> Answer:
        queue = P.check_queue(req)
        job_id = None if req.get("id") is None else P.check_id(req)
        return {"ok": True, "ids": [self.engine.retry_dlq(queue, job_id)]}

    # -- events -------------------------------------------------------------------------------

    def subscribe(self, req: P.Request, caller: Caller) -> Answer:
        queue = P.check_queue(req)
        events = frozenset(P.check_events(req))
        self.events.subscribe(caller, queue, events)
        return OK

    def unsubscribe(self, req: P.Request, caller: Caller) -> Answer:
        self.events.unsubscribe(caller, P.check_queue(req))
        return OK

    # -- queue control ------------------------------------------------------------------------

    def pause(self, req: P.Request, caller: Caller) -> Answer:
        self.engine.set_queue(P.check_queue(req), paused=True)
        return OK

    def resume(self, req: P.Request, caller: Caller) -> Answer:
        self.engine.set_queue(P.check_queue(req), paused=False)
        return OK

    def ratelimit(self, req: P.Request, caller: Caller) -> Answer:
        queue = P.check_queue(req)
        self.engine.set_queue(queue, rate_limit=P.check_limit(req))
        return OK

    def ratelimitclear(self, req: P.Request, caller: Caller) -> Answer:
        self.engine.set_queue(P.check_queue(req), rate_limit=None)
        return OK

    def setconcurrency(self, req: P.Request, caller: Caller) -> Answer:
        queue = P.check_queue(req)
        self.engine.set_queue(queue, concurrency_limit=P.check_limit(req))
        return OK

    def clearconcurrency(self, req: P.Request, caller: Caller) -> Answer:
        self.engine.set_queue(P.check_queue(req), concurrency_limit=None)
        return OK

    # -- cron ---------------------------------------------------------------------------------

    def cron(self, req: P.Request, caller: Caller) -> Answer:
        name = P.check_str(req, "name")
        queue = P.check_queue(req)
        data = self.raw(P.check_data(req))
        if len(data) > self.max_cron_payload:
            raise PayloadTooLarge(len(data), self.max_cron_payload)
        schedule = P.check_str(req, "schedule", 256)
        priority = P.opt_int(req, "priority", P.MIN_PRIORITY, P.MAX_PRIORITY)
        self.engine.crons.add(name, queue, data, schedule, priority)
        return OK

    def crondelete(self, req: P.Request, caller: Caller) -> Answer:
        if not self.engine.crons.delete(P.check_str(req, "name")):
            raise CronNotFound()
        return OK

    def cronlist(self, req: P.Request, caller: Caller) -> Answer:
        crons = [
            {
                "name": name, "queue": e["queue"], "data": Fragment(e["data"]),
                "schedule": e["schedule"], "priority": e["priority"], "next_run": e["next_run"],
            }
            for name, e in sorted(self.engine.crons.entries.items())
        ]
        return {"ok": True, "crons": crons}

    # -- introspection --------------------------------------------------------------------------

    def stats(self, req: P.Request, caller: Caller) -> Answer:
        failed = self.log.failed is not None
        return {"ok": True, **introspection.stats(self.engine, self.storage, failed)}

    def metrics(self, req: P.Request, caller: Caller) -> Answer:
        metrics = introspection.metrics(self.engine, self.clock(), self.max_list_queues)
        return {"ok": True, "metrics": metrics}

    def listqueues(self, req: P.Request, caller: Caller) -> Answer:
        """Up to ``count`` (at most ``max_list_queues``) queues by name, after ``after``;
        ``next`` names the last when more remain."""
        after = req.get("after")
        if after is not None:
            after = P.check_queue(req, "after")
        limit = min(P.check_count(req, required=False, default=self.max_list_queues),
                    self.max_list_queues)
        queues, more = introspection.list_queues(self.engine, limit or self.max_list_queues,
                                                 after)
        if more:
            return {"ok": True, "queues": queues, "next": queues[-1]["name"]}
        return {"ok": True, "queues": queues}

    def topology(self, req: P.Request, caller: Caller) -> Answer:
        return {"ok": True, "topology": introspection.topology(self.cluster)}

    def auth(self, req: P.Request, caller: Caller) -> Answer:
        cluster = self.tokens.check(req.get("token"))
        caller.authed = True
        caller.cluster = cluster  # a later AUTH with a client token drops cluster rights
        return OK

    def release(self, req: P.Request, caller: Caller) -> Answer:
        """RELEASE {ids, leases?}: hand leased jobs back to their queues (a gateway whose
        client left, a worker giving up). Only by the holder: the attempts ``leases`` names
        (one token per id, never a later attempt of the same job) or, without them, those
        this connection holds; the cluster token may release any."""
        ids = P.check_ids(req)
        tokens = None
        if req.get("leases") is not None:
            tokens = P.check_ids(req, "leases")
            if len(tokens) != len(ids):
                raise InvalidRequest("field 'leases' must be as long as 'ids'")
        owner = None if caller.cluster else caller.owner
        return {"ok": True, "ids": [self.engine.release_held(ids, tokens, owner)]}


def _timeout(req: P.Request) -> int | None:
    """PULL's wait in ms: None = wait indefinitely (field absent or null)."""
    if req.get("timeout") is None:
        return None
    return P.opt_int(req, "timeout", 0, P.MAX_MS)


def _lease(value: int) -> int | None:
    return None if value < 0 else value


#: The commands of the table (shardq.wire.commands) this class answers: all but the internal
#: ones (cluster.py). Each is the method of its name; one missing fails at import.
CLIENT = tuple(name for name, c in C.TABLE.items() if c.route is not C.Route.INTERNAL)
_missing = [name for name in CLIENT if not hasattr(Commands, name.lower())]
if _missing:
    raise ImportError(f"commands without a handler in Commands: {_missing}")

__all__ = ["EVENTS", "OK", "PENDING", "Caller", "Commands"]
