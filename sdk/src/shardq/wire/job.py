"""The job as users and the wire see it: states, the JOB shape, the Job class.

Shared by the SDK and every server process. Times are integer milliseconds
since the epoch; 0 means "not set".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class State(StrEnum):
    """Every state a job can be in; each has its own index on the node."""

    WAITING = "waiting"
    DELAYED = "delayed"
    WAITING_CHILDREN = "waiting-children"
    ACTIVE = "active"
    COMPLETED = "completed"
    DEAD = "dead"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


#: The fields of the wire JOB object, in MagicQueue's order (extras follow).
JOB_FIELDS = (
    "id", "queue", "data", "priority", "created_at", "run_at", "started_at", "attempts",
    "max_attempts", "backoff", "ttl", "timeout", "unique_key", "depends_on", "progress",
    "progress_msg",
)

#: The events a job's life emits (SUBSCRIBE and /events).
EVENTS = ("completed", "failed", "retrying", "dead", "progress", "timeout", "expired")


@dataclass
class Job:
    """A job received from the server (pull, DLQ, events)."""

    id: int
    queue: str
    data: Any
    priority: int = 0
    created_at: int = 0
    run_at: int = 0
    started_at: int = 0
    attempts: int = 0
    max_attempts: int = 0
    backoff: int = 0
    ttl: int = 0
    timeout: int = 0
    unique_key: str | None = None
    depends_on: list[int] = field(default_factory=list)
    progress: int = 0
    progress_msg: str | None = None
    state: str | None = None
    error: str | None = None

    @property
    def lease(self) -> int:
        """The token of this attempt (its ``started_at``), sent back with ack/fail."""
        return self.started_at

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Job:
        return cls(
            id=obj["id"],
            queue=obj.get("queue", ""),
            data=obj.get("data"),
            priority=obj.get("priority", 0),
            created_at=obj.get("created_at", 0),
            run_at=obj.get("run_at", 0),
            started_at=obj.get("started_at", 0),
            attempts=obj.get("attempts", 0),
            max_attempts=obj.get("max_attempts", 0),
            backoff=obj.get("backoff", 0),
            ttl=obj.get("ttl", 0),
            timeout=obj.get("timeout", 0),
            unique_key=obj.get("unique_key"),
            depends_on=list(obj.get("depends_on") or ()),
            progress=obj.get("progress", 0),
            progress_msg=obj.get("progress_msg"),
            state=obj.get("state"),
            error=obj.get("error"),
        )
