"""The HTTP API of nodes and gateways (port 6790): MagicQueue's REST routes, the Poor Man
Queue routes, Server-Sent Events, Prometheus metrics, health, readiness, OpenAPI.

Every route turns into one protocol request (the same dicts as on TCP) handed to a
``Backend``: a node runs it in-process, a gateway routes it. So HTTP and TCP
share validation, error texts and semantics; this module only maps routes to
requests and error texts to status codes. Imported by node and gateway (it needs
aiohttp, a server dependency); the SDK's client code never imports it.

Bounds (docs/limits.md, "HTTP"): a body over ``max_body`` is a 413 naming its
size (before it is read when it has a Content-Length), a body nested deeper than
``max_depth`` a 400, a body slower than ``body_timeout`` a 408; a connection
that sends no complete request head within ``header_timeout`` (or idles that
long) is closed, and past ``max_connections`` a new one gets a 503. Any other
exception is a 500 ``Internal: …`` with its cause logged once. The listening side (the
connection cap, the timeouts of a connection) is http_site.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from aiohttp import web

from shardq import errors as E
from shardq.wire.job import EVENTS
from shardq.wire.protocol import nesting_within, too_deep

from .auth import Tokens
from .limits import Limits
from .running import Causes

log = logging.getLogger("shardq_server.http")

Req = dict[str, Any]


class Backend(Protocol):
    """What the HTTP layer needs from a node or a gateway."""

    async def call(self, req: Req) -> Req:
        """Run one protocol request; its answer object (``ok`` true or false)."""

    def events(self, queue: str, names: frozenset[str]) -> AsyncIterator[bytes]:
        """Event lines (the TCP SUBSCRIBE objects) of ``queue`` ("*" = all)."""

    def metrics_text(self) -> bytes:
        """Prometheus text exposition."""

    def readiness(self) -> tuple[bool, str]:
        """(ready, why) for /ready."""

    async def health(self) -> tuple[int, bool, Req]:
        """For /health: payload bytes held in memory, whether it takes jobs (False: its storage
        failed, or a replicated primary without quorum refuses writes), and fields /health
        adds as they are (a node's role in its shard). Must answer promptly: it is the
        liveness probe."""


@dataclass
class HttpSettings:
    tokens: tuple[str, ...] = ()
    #: Request bodies above this are refused with 413.
    max_body: int = 8 * 1024 * 1024 + 64 * 1024
    #: The longest an HTTP pull waits (ms), also when the client gives no timeout.
    max_pull_wait_ms: int = 30_000
    #: Payload bytes held in memory before /health warns (the node's memory budget).
    memory_budget: int = 1024**3
    #: Extra routes (the gateway's dashboard).
    extra: list[web.AbstractRouteDef] = field(default_factory=list)
    #: Connection cap, timeouts and nesting (``http_*`` and ``max_depth`` are used here).
    limits: Limits = field(default_factory=Limits)
    #: Who answers, for ``Internal: …`` texts ("node node-0", "the gateway").
    server: str = "the server"
    #: Counts a connection closed or refused for a limit, by reason (metrics).
    on_drop: Callable[[str], None] = lambda reason: None


class Streams:
    """The open ``/events`` responses. They never end by themselves, so the app ends them when
    it shuts down; else a runner's cleanup waits out aiohttp's graceful shutdown (60 s)."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()
        self.closing = False

    async def end(self, app: web.Application) -> None:
        self.closing = True
        for task in self.tasks:
            task.cancel()


BACKEND = web.AppKey("backend", Backend)
SETTINGS = web.AppKey("settings", HttpSettings)
STREAMS = web.AppKey("streams", Streams)
CAUSES = web.AppKey("causes", Causes)
TOKENS = web.AppKey("tokens", Tokens)

STATUS: list[tuple[type[E.ShardqError], int]] = [
    (E.InvalidRequest, 400), (E.AuthenticationRequired, 401), (E.InvalidToken, 401),
    (E.JobNotFound, 404), (E.CronNotFound, 404), (E.DuplicateJob, 409), (E.LeaseExpired, 409),
    (E.PayloadTooLarge, 413), (E.RateLimited, 429), (E.QueueFull, 429), (E.LimitReached, 429),
    (E.StorageFailed, 503), (E.Moved, 503), (E.TryAgain, 503), (E.Unavailable, 503),
    (E.InternalError, 500),
]
OPEN_PATHS = frozenset({"/health", "/ready", "/openapi.json"})


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def error_response(text: str) -> web.Response:
    err = E.error_from_text(text)
    status = next((code for cls, code in STATUS if isinstance(err, cls)), 500)
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return web.Response(body=orjson.dumps({"ok": False, "error": text}), status=status,
                        content_type="application/json", headers=headers)


class Refused(Exception):
    def __init__(self, text: str) -> None:
        self.text = text


async def run(request: web.Request, req: Req) -> Req:
    answer = await request.app[BACKEND].call(req)
    if answer.get("ok") is False:
        raise Refused(str(answer.get("error")))
    return answer


class BodyTimeout(Exception):
    """The body did not arrive within ``body_timeout``."""


async def read_body(request: web.Request) -> bytes:
    """The body, bounded: 413 naming its size past ``max_body`` (its Content-Length, read
    before any byte of it; a chunked body: the bytes received when it passed the limit),
    ``BodyTimeout`` past ``body_timeout``."""
    settings = request.app[SETTINGS]
    limit = settings.max_body
    length = request.content_length
    if length is not None and length > limit:
        raise Refused(E.PayloadTooLarge(length, limit).text)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(settings.limits.http_body_timeout):
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise Refused(E.PayloadTooLarge(size, limit).text)
                chunks.append(chunk)
    except TimeoutError:
        raise BodyTimeout() from None
    return b"".join(chunks)


def json_body(raw: bytes, max_depth: int, request_object: bool) -> Any:
    """Parse a body; refuse it if it is not JSON or if a value in it nests deeper than
    ``max_depth`` (a request object's own level not counted, as on TCP)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Refused(f"Invalid: body is not valid JSON ({exc.msg} at byte {exc.pos})") from None
    depth = max_depth + request_object
    if len(raw) > 2 * depth and not nesting_within(obj, depth, raw):
        raise Refused(too_deep(max_depth).text)
    return obj


async def body(request: web.Request, required: bool = False) -> Req:
    """A request object: its fields' values may nest ``max_depth`` levels (the object
    itself one more, as a TCP line)."""
    raw = await read_body(request)
    if not raw.strip():
        if required:
            raise Refused("Invalid: request body must be a JSON object")
        return {}
    obj = json_body(raw, request.app[SETTINGS].limits.max_depth, request_object=True)
    if type(obj) is not dict:
        raise Refused("Invalid: request body must be a JSON object")
    return obj


def int_param(request: web.Request, name: str, default: int | None = None) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise Refused(
            f"Invalid: query parameter '{name}' must be an integer, got {raw!r}"
        ) from None


def path_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    # ASCII only ("²".isdigit() is true but int() refuses it) and at most 20 digits (2**64 has
    # 20; int() refuses more than 4300): anything else was a 500 before.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 20:
        raise Refused(f"Invalid: job id must be a non-negative integer, got {raw[:64]!r}")
    return int(raw)


def envelope(data: Any) -> web.Response:
    return _json({"ok": True, "data": data})


# -- middlewares ----------------------------------------------------------------------------------


@web.middleware
async def errors(request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]) -> Any:
    try:
        return await handler(request)
    except Refused as exc:
        return error_response(exc.text)
    except BodyTimeout:
        return _body_timeout(request)
    except web.HTTPException as exc:
        if exc.status == 404:
            return _json({"ok": False, "error": f"Not found: {request.method} {request.path}"},
                         404)
        if exc.status >= 400:
            reason = f"Invalid: {exc.reason}" if exc.status < 500 else exc.reason
            return _json({"ok": False, "error": reason}, exc.status)
        raise
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception as exc:  # a bug: this request gets an answer, the server goes on
        resource = request.match_info.route.resource
        what = f"{request.method} {resource.canonical if resource else request.path}"
        return error_response(request.app[CAUSES].error(what, exc).text)


def _body_timeout(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    settings.on_drop("http_body_timeout")
    seconds = settings.limits.http_body_timeout
    resp = _json({"ok": False, "error": f"Invalid: request body not received within "
                  f"{seconds:g}s (http_body_timeout)"}, 408)
    resp.force_close()  # what is left of the body is not read
    return resp


@web.middleware
async def auth(request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]) -> Any:
    tokens = request.app[TOKENS]
    if tokens and request.path not in OPEN_PATHS and not request.path.startswith("/static/") \
            and request.path != "/":
        header = request.headers.get("Authorization", "")
        token = header[7:] if header.startswith("Bearer ") else request.query.get("token", "")
        if not token:
            return error_response("Authentication required")
        if not tokens.match(token):
            return error_response("Invalid token")
    return await handler(request)


# -- MagicQueue's REST routes -------------------------------------------------------------------


routes = web.RouteTableDef()


@routes.get("/queues")
async def list_queues(request: web.Request) -> web.Response:
    """A page of queues by name (``?after=&count=``); ``next`` says where the next begins."""
    req: Req = {"cmd": "LISTQUEUES", "count": int_param(request, "count")}
    if request.query.get("after"):
        req["after"] = request.query["after"]
    answer = await run(request, req)
    if answer.get("next") is None:
        return envelope(answer["queues"])
    return _json({"ok": True, "data": answer["queues"], "next": answer["next"]})


@routes.post("/queues/{queue}/jobs")
async def push(request: web.Request) -> web.Response:
    job = await body(request, required=True)
    req = {**job, "cmd": "PUSH", "queue": request.match_info["queue"]}
    answer = await run(request, req)
    got = await run(request, {"cmd": "GETJOB", "id": answer["id"]})
    return envelope(got["job"] or {"id": answer["id"]})


@routes.get("/queues/{queue}/jobs")
async def pull(request: web.Request) -> web.Response:
    limit = request.app[SETTINGS].max_pull_wait_ms
    wait = int_param(request, "timeout", limit)
    req = {"cmd": "PULLB", "queue": request.match_info["queue"],
           "count": int_param(request, "count", 1),
           "timeout": min(wait, limit) if wait is not None and wait >= 0 else wait}
    return envelope((await run(request, req))["jobs"])


@routes.post("/queues/{queue}/pause")
async def pause(request: web.Request) -> web.Response:
    await run(request, {"cmd": "PAUSE", "queue": request.match_info["queue"]})
    return envelope(None)


@routes.post("/queues/{queue}/resume")
async def resume(request: web.Request) -> web.Response:
    await run(request, {"cmd": "RESUME", "queue": request.match_info["queue"]})
    return envelope(None)


@routes.get("/queues/{queue}/dlq")
async def dlq(request: web.Request) -> web.Response:
    req = {"cmd": "DLQ", "queue": request.match_info["queue"],
           "count": int_param(request, "count", 100)}
    return envelope((await run(request, req))["jobs"])


@routes.post("/queues/{queue}/dlq/retry")
async def retry_dlq(request: web.Request) -> web.Response:
    b = await body(request)
    req = {"cmd": "RETRYDLQ", "queue": request.match_info["queue"], "id": b.get("id")}
    return envelope((await run(request, req))["ids"][0])


def _limit_routes(path: str, set_cmd: str, clear_cmd: str) -> None:
    async def set_limit(request: web.Request) -> web.Response:
        b = await body(request, required=True)
        await run(request, {"cmd": set_cmd, "queue": request.match_info["queue"],
                            "limit": b.get("limit")})
        return envelope(None)

    async def clear_limit(request: web.Request) -> web.Response:
        await run(request, {"cmd": clear_cmd, "queue": request.match_info["queue"]})
        return envelope(None)

    routes.post(path)(set_limit)
    routes.delete(path)(clear_limit)


_limit_routes("/queues/{queue}/rate-limit", "RATELIMIT", "RATELIMITCLEAR")
_limit_routes("/queues/{queue}/concurrency", "SETCONCURRENCY", "CLEARCONCURRENCY")


@routes.post("/jobs/{id}/ack")
async def ack(request: web.Request) -> web.Response:
    b = await body(request)
    await run(request, {"cmd": "ACK", "id": path_id(request), "result": b.get("result"),
                        "lease": b.get("lease")})
    return envelope(None)


@routes.post("/jobs/{id}/fail")
async def fail(request: web.Request) -> web.Response:
    b = await body(request)
    await run(request, {"cmd": "FAIL", "id": path_id(request), "error": b.get("error"),
                        "lease": b.get("lease")})
    return envelope(None)


@routes.post("/jobs/{id}/cancel")
async def cancel(request: web.Request) -> web.Response:
    await run(request, {"cmd": "CANCEL", "id": path_id(request)})
    return envelope(None)


@routes.post("/jobs/{id}/progress")
async def progress(request: web.Request) -> web.Response:
    b = await body(request, required=True)
    await run(request, {"cmd": "PROGRESS", "id": path_id(request), "progress": b.get("progress"),
                        "message": b.get("message"), "lease": b.get("lease")})
    return envelope(None)


@routes.get("/jobs/{id}/progress")
async def get_progress(request: web.Request) -> web.Response:
    p = (await run(request, {"cmd": "GETPROGRESS", "id": path_id(request)}))["progress"]
    return envelope([p["progress"], p["message"]])


@routes.get("/jobs/{id}/result")
async def get_result(request: web.Request) -> web.Response:
    return envelope((await run(request, {"cmd": "GETRESULT", "id": path_id(request)}))["result"])


@routes.get("/jobs/{id}")
async def get_job(request: web.Request) -> web.Response:
    job = (await run(request, {"cmd": "GETJOB", "id": path_id(request)}))["job"]
    if job is None:
        raise Refused(f"Job {path_id(request)} not found")
    return envelope(job)


@routes.get("/crons")
async def list_crons(request: web.Request) -> web.Response:
    return envelope((await run(request, {"cmd": "CRONLIST"}))["crons"])


@routes.post("/crons/{name}")
async def add_cron(request: web.Request) -> web.Response:
    b = await body(request, required=True)
    await run(request, {**b, "cmd": "CRON", "name": request.match_info["name"]})
    return envelope(None)


@routes.delete("/crons/{name}")
async def delete_cron(request: web.Request) -> web.Response:
    answer = await request.app[BACKEND].call({"cmd": "CRONDELETE",
                                              "name": request.match_info["name"]})
    if answer.get("ok"):
        return envelope(True)
    if answer.get("error") == "Cron job not found":
        return envelope(False)
    raise Refused(str(answer.get("error")))


@routes.get("/topology")
async def topology(request: web.Request) -> web.Response:
    return envelope((await run(request, {"cmd": "TOPOLOGY"}))["topology"])


@routes.get("/metrics.json")
async def metrics_json(request: web.Request) -> web.Response:
    return envelope((await run(request, {"cmd": "METRICS"}))["metrics"])


# -- Poor Man Queue routes ------------------------------------------------------------------------


@routes.post("/publish")
async def publish(request: web.Request) -> web.Response:
    raw = await read_body(request)
    message = json_body(raw, request.app[SETTINGS].limits.max_depth, request_object=False)
    queue = request.query.get("queue") or "default"
    priority = int_param(request, "priority")
    if priority is None and type(message) is dict and type(message.get("priority")) is int:
        priority = message["priority"]
    req: Req = {"cmd": "PUSH", "queue": queue, "data": message, "priority": priority or 0}
    answer = await run(request, req)
    stored = answer.get("stored", "memory")
    return _json({"id": str(answer["id"]), "size": len(raw), "stored": stored})


@routes.get("/stats")
async def stats(request: web.Request) -> web.Response:
    s = await run(request, {"cmd": "STATS"})
    budget = request.app[SETTINGS].memory_budget
    memory = int(s.get("memory_bytes", 0))
    jobs = int(s.get("jobs", 0))
    payload = memory + int(s.get("blob_bytes", 0))
    data = {k: s[k] for k in ("queued", "processing", "delayed", "dlq")}
    return _json({
        "ok": True, "data": data,
        "total": jobs, "processing": s["processing"], "ready": s["queued"],
        "retrying": s.get("retrying", 0), "memoryUsage": memory,
        "memoryUtilization": f"{100 * memory / budget:.1f}%" if budget else "0.0%",
        "largemessages": s.get("blobs", 0),
        "avgmessageSize": round(payload / jobs) if jobs else 0,
        **{k: v for k, v in s.items() if k not in ("ok", "processing")},
    })


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    memory, queue_ok, more = await request.app[BACKEND].health()
    memory_ok = memory < 0.9 * settings.memory_budget
    healthy = memory_ok and queue_ok
    return _json({"status": "healthy" if healthy else "warning", "memoryOk": memory_ok,
                  "queueOk": queue_ok, "timestamp": int(time.time() * 1000), **more})


@routes.get("/ready")
async def ready(request: web.Request) -> web.Response:
    ok, why = request.app[BACKEND].readiness()
    return _json({"ready": ok, "reason": why}, 200 if ok else 503)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[BACKEND].metrics_text(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


@routes.get("/events")
async def events(request: web.Request) -> web.StreamResponse:
    queue = request.query.get("queue") or "*"
    raw_names = request.query.get("events")
    names = frozenset(n for n in (raw_names or "").split(",") if n) or frozenset(EVENTS)
    unknown = names - set(EVENTS)
    if unknown:
        raise Refused(f"Invalid: unknown event {sorted(unknown)[0]!r} (known: {', '.join(EVENTS)})")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    await resp.write(b": subscribed\n\n")
    streams = request.app[STREAMS]
    task = asyncio.current_task()
    assert task is not None
    streams.tasks.add(task)
    try:
        async for line in request.app[BACKEND].events(queue, names):
            await resp.write(b"data: " + line.rstrip(b"\n") + b"\n\n")
    except asyncio.CancelledError:
        if not streams.closing:
            raise
        task.uncancel()  # the server shuts down: end the stream cleanly
    finally:
        streams.tasks.discard(task)
    return resp


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    from shardq_server.openapi import document

    return _json(document())


def make_app(backend: Backend, settings: HttpSettings) -> web.Application:
    app = web.Application(middlewares=[errors, auth], client_max_size=settings.max_body)
    app[BACKEND] = backend
    app[SETTINGS] = settings
    app[TOKENS] = Tokens(settings.tokens)
    app[STREAMS] = streams = Streams()
    app[CAUSES] = Causes(log, settings.server)
    app.on_shutdown.append(streams.end)
    app.add_routes(routes)
    app.add_routes(settings.extra)
    return app
