"""shardq: a sharded, durable job queue for Kubernetes — the Python SDK.

    from shardq import Queue, Worker
    with Queue("emails", "127.0.0.1:6789") as q:
        q.push({"to": "a@example.com"}, priority=5)

``AsyncQueue``/``AsyncWorker``/``AsyncClient`` are the asyncio originals;
``Queue``/``Worker``/``Client`` are their blocking twins. Everything else in
this package is shared by the server processes (protocol, slots, topology).
"""

# first: decides, before any compiled module loads, whether the compiled ones are used
from shardq import native as _native  # noqa: F401  (see shardq.native)
from shardq.client import AsyncClient
from shardq.errors import (
    AuthenticationRequired,
    CronNotFound,
    DuplicateJob,
    GatewayDraining,
    InternalError,
    InvalidRequest,
    InvalidToken,
    JobNotActive,
    JobNotFound,
    LeaseExpired,
    LimitReached,
    Moved,
    PayloadTooLarge,
    QueueFull,
    RateLimited,
    ShardqConnectionError,
    ShardqError,
    StorageFailed,
    TryAgain,
    Unavailable,
)
from shardq.queue import AsyncQueue
from shardq.sync import Client, Queue, Worker
from shardq.wire.job import Job, State
from shardq.worker import AsyncWorker, JobContext

__version__ = "0.1.0"

__all__ = [
    "AsyncClient", "AsyncQueue", "AsyncWorker", "AuthenticationRequired", "Client",
    "CronNotFound", "DuplicateJob", "GatewayDraining", "InternalError", "InvalidRequest",
    "InvalidToken", "Job",
    "JobContext", "JobNotActive", "JobNotFound", "LeaseExpired", "LimitReached", "Moved",
    "PayloadTooLarge",
    "Queue", "QueueFull", "RateLimited", "ShardqConnectionError", "ShardqError", "State",
    "StorageFailed", "TryAgain", "Unavailable", "Worker",
]
