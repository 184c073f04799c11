"""The OpenAPI 3.1 document of the HTTP API (``GET /openapi.json``), built from one table."""

from __future__ import annotations

from typing import Any

_ENVELOPE_ERROR = {
    "type": "object", "required": ["ok", "error"],
    "properties": {"ok": {"const": False}, "error": {"type": "string"}},
}
_JOB = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"}, "queue": {"type": "string"}, "data": {},
        "priority": {"type": "integer"}, "created_at": {"type": "integer"},
        "run_at": {"type": "integer"}, "started_at": {"type": "integer"},
        "attempts": {"type": "integer"}, "max_attempts": {"type": "integer"},
        "backoff": {"type": "integer"}, "ttl": {"type": "integer"}, "timeout": {"type": "integer"},
        "unique_key": {"type": ["string", "null"]},
        "depends_on": {"type": "array", "items": {"type": "integer"}},
        "progress": {"type": "integer"}, "progress_msg": {"type": ["string", "null"]},
        "state": {"type": "string"},
    },
}
_MS = {"type": "integer", "minimum": 0, "maximum": 315_360_000_000}
_PUSH_BODY = {
    "type": "object", "required": ["data"],
    "properties": {
        "data": {}, "priority": {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1},
        "delay": _MS, "ttl": _MS, "timeout": _MS, "backoff": _MS,
        "max_attempts": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
        "unique_key": {"type": ["string", "null"], "maxLength": 1024},
        "depends_on": {"type": "array", "items": {"type": "integer", "minimum": 0}},
    },
}
_LIMIT = {"type": "object", "required": ["limit"],
          "properties": {"limit": {"type": "integer", "minimum": 1, "maximum": 1_000_000_000}}}
_QUEUE = {"name": "queue", "in": "path", "required": True,
          "schema": {"type": "string", "minLength": 1, "maxLength": 512}}
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}}
_NAME = {"name": "name", "in": "path", "required": True,
         "schema": {"type": "string", "minLength": 1, "maxLength": 1024}}


def _q(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


def _env(data: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": ["ok", "data"],
            "properties": {"ok": {"const": True}, "data": data}}


# (method, path, summary, parameters, request body schema, success schema)
ROUTES: list[tuple[str, str, str, list[dict[str, Any]], dict[str, Any] | None, dict[str, Any]]] = [
    ("get", "/queues", "List queues by name, a page at a time (`next`: the last of this page)",
     [_q("after", {"type": "string", "minLength": 1, "maxLength": 512}),
      _q("count", {"type": "integer", "minimum": 1, "maximum": 100_000})],
     None, _env({"type": "array"})),
    ("post", "/queues/{queue}/jobs", "Push a job", [_QUEUE], _PUSH_BODY, _env(_JOB)),
    ("get", "/queues/{queue}/jobs", "Pull jobs (waits for at least one, up to timeout ms)",
     [_QUEUE, _q("count", {"type": "integer", "minimum": 1, "maximum": 100_000}),
      _q("timeout", {"type": "integer", "minimum": 0, "maximum": 30_000})],
     None, _env({"type": "array", "items": _JOB})),
    ("post", "/queues/{queue}/pause", "Pause a queue", [_QUEUE], None, _env({"type": "null"})),
    ("post", "/queues/{queue}/resume", "Resume a queue", [_QUEUE], None, _env({"type": "null"})),
    ("get", "/queues/{queue}/dlq", "Dead-letter queue, oldest first",
     [_QUEUE, _q("count", {"type": "integer", "minimum": 1, "maximum": 100_000})],
     None, _env({"type": "array", "items": _JOB})),
    ("post", "/queues/{queue}/dlq/retry", "Retry the DLQ (or one job of it)", [_QUEUE],
     {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0}}},
     _env({"type": "integer"})),
    ("post", "/queues/{queue}/rate-limit", "Set a rate limit (jobs/s)", [_QUEUE], _LIMIT,
     _env({"type": "null"})),
    ("delete", "/queues/{queue}/rate-limit", "Clear the rate limit", [_QUEUE], None,
     _env({"type": "null"})),
    ("post", "/queues/{queue}/concurrency", "Set a concurrency limit", [_QUEUE], _LIMIT,
     _env({"type": "null"})),
    ("delete", "/queues/{queue}/concurrency", "Clear the concurrency limit", [_QUEUE], None,
     _env({"type": "null"})),
    ("post", "/jobs/{id}/ack", "Acknowledge a job", [_ID],
     {"type": "object", "properties": {"result": {}, "lease": {"type": "integer", "minimum": 0}}},
     _env({"type": "null"})),
    ("post", "/jobs/{id}/fail", "Fail a job's attempt", [_ID],
     {"type": "object", "properties": {"error": {"type": ["string", "null"]},
                                       "lease": {"type": "integer", "minimum": 0}}},
     _env({"type": "null"})),
    ("post", "/jobs/{id}/cancel", "Cancel a job", [_ID], None, _env({"type": "null"})),
    ("post", "/jobs/{id}/progress", "Report progress", [_ID],
     {"type": "object", "required": ["progress"],
      "properties": {"progress": {"type": "integer", "minimum": 0, "maximum": 255},
                     "message": {"type": ["string", "null"]}}},
     _env({"type": "null"})),
    ("get", "/jobs/{id}/progress", "Progress of a job", [_ID], None, _env({"type": "array"})),
    ("get", "/jobs/{id}/result", "Result of a job (null if unknown)", [_ID], None, _env({})),
    ("get", "/jobs/{id}", "A job with its state", [_ID], None, _env(_JOB)),
    ("get", "/crons", "List crons", [], None, _env({"type": "array"})),
    ("post", "/crons/{name}", "Create or replace a cron", [_NAME],
     {"type": "object", "required": ["queue", "data", "schedule"],
      "properties": {"queue": {"type": "string", "minLength": 1, "maxLength": 512}, "data": {},
                     "schedule": {"type": "string", "minLength": 1, "maxLength": 256},
                     "priority": {"type": "integer"}}},
     _env({"type": "null"})),
    ("delete", "/crons/{name}", "Delete a cron (true if it existed)", [_NAME], None,
     _env({"type": "boolean"})),
    ("get", "/stats", "Statistics (MagicQueue envelope plus Poor Man Queue fields)", [], None,
     {"type": "object", "required": ["ok", "data", "total", "processing", "ready", "retrying",
                                     "memoryUsage", "memoryUtilization", "largemessages",
                                     "avgmessageSize"]}),
    ("post", "/publish", "Publish a message (Poor Man Queue)",
     [_q("queue", {"type": "string", "minLength": 1, "maxLength": 512}),
      _q("priority", {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1})],
     {}, {"type": "object", "required": ["id", "size", "stored"],
          "properties": {"id": {"type": "string"}, "size": {"type": "integer"},
                         "stored": {"enum": ["memory", "disk"]}}}),
    ("get", "/health", "Health (Poor Man Queue)", [], None,
     {"type": "object", "required": ["status", "memoryOk", "queueOk", "timestamp"]}),
    ("get", "/ready", "Readiness for Kubernetes", [], None, {"type": "object"}),
    ("get", "/metrics", "Prometheus metrics (text)", [], None, {"type": "string"}),
    ("get", "/metrics.json", "MagicQueue's JSON metrics", [], None, _env({"type": "object"})),
    ("get", "/topology", "The cluster topology (null on a standalone node)", [], None,
     _env({"type": ["object", "null"]})),
    ("get", "/events", "Server-Sent Events",
     [_q("queue", {"type": "string"}), _q("events", {"type": "string"})], None,
     {"type": "string"}),
    ("get", "/openapi.json", "This document", [], None, {"type": "object"}),
]


def document() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for method, path, summary, params, body, ok in ROUTES:
        op: dict[str, Any] = {
            "summary": summary,
            "operationId": _operation_id(method, path),
            "parameters": params,
            "responses": {
                "200": {"description": "success", "content": {_type(path): {"schema": ok}}},
                "default": {"description": "refused",
                            "content": {"application/json": {"schema": _ENVELOPE_ERROR}}},
            },
        }
        if body is not None:
            op["requestBody"] = {"required": bool(body.get("required")),
                                 "content": {"application/json": {"schema": body}}}
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "shardq", "version": "0.1.0",
                 "description": "MagicQueue's REST API and the Poor Man Queue API, on shardq."},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}, {}],
        "paths": paths,
    }


def _operation_id(method: str, path: str) -> str:
    words = path.strip("/").replace("{", "").replace("}", "").replace(".", "_").split("/")
    return "_".join([method, *words])


def _type(path: str) -> str:
    if path == "/metrics":
        return "text/plain"
    if path == "/events":
        return "text/event-stream"
    return "application/json"
