"""What a data directory says about the member that owns it (DESIGN §9).

``identity.json`` holds the directory's **storage id**, made when the directory is first
used: a member that comes back with an empty or different directory has a new id, so the
controller sees a learner (no vote until it has caught up), never a voter that forgot
what it acknowledged. ``term.json`` holds the highest term this member promised to
(``FENCE``): it refuses records of older terms, so a deposed primary can never again
gather a majority; and the last term it was primary in: a primary that restarts never
leads that term again (it may have lost records its followers hold at the same
positions), the controller gives the shard a new term. Both are written atomically and
fsynced before they count.

Must not: decide roles (the topology does) or touch the log.
"""

from __future__ import annotations

import os
import uuid

import orjson

IDENTITY = "identity.json"
TERM = "term.json"


def _write(directory: str, name: str, value: object) -> None:
    path = os.path.join(directory, name)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(orjson.dumps(value))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(directory: str, name: str) -> dict[str, object] | None:
    try:
        with open(os.path.join(directory, name), "rb") as f:
            value = orjson.loads(f.read())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None
    return value if type(value) is dict else None


class Membership:
    """The storage id and the fenced term of one data directory (None: memory only)."""

    def __init__(self, data_dir: str | None) -> None:
        self.dir = data_dir
        self.fenced_term = 0
        self.led_term = 0
        #: True when this directory was empty at start: whatever it acknowledged before (if
        #: it ever was a member) is gone, so it must catch up before it may vote
        self.fresh = True
        self.storage_id = uuid.uuid4().hex
        if data_dir is None:
            return
        os.makedirs(data_dir, exist_ok=True)
        identity = _read(data_dir, IDENTITY)
        if identity is not None and type(identity.get("storage_id")) is str:
            self.storage_id = str(identity["storage_id"])
            self.fresh = False
        else:
            self.fresh = not _has_log(data_dir)
            _write(data_dir, IDENTITY, {"storage_id": self.storage_id})
        term = _read(data_dir, TERM)
        if term is not None:
            self.fenced_term = _int(term.get("term"))
            self.led_term = _int(term.get("led"))

    def fence(self, term: int) -> bool:
        """Promise never to follow a primary of a term below ``term``; True if it rose."""
        if term <= self.fenced_term:
            return False
        self._save(term, self.led_term)
        return True

    def lead(self, term: int) -> None:
        """Record that this member is the primary of ``term`` (before it writes anything)."""
        if term > self.led_term or term > self.fenced_term:
            self._save(max(term, self.fenced_term), max(term, self.led_term))

    def _save(self, fenced: int, led: int) -> None:
        if self.dir is not None:
            _write(self.dir, TERM, {"term": fenced, "led": led})
        self.fenced_term, self.led_term = fenced, led


def _int(value: object) -> int:
    return value if type(value) is int else 0


def _has_log(data_dir: str) -> bool:
    wal = os.path.join(data_dir, "wal")
    if os.path.isdir(wal) and any(n.endswith(".wal") for n in os.listdir(wal)):
        return True
    return any(n.endswith(".snap") for n in os.listdir(data_dir))
