"""A node whose storage failed: answer what was lost, reload what is durable, probe the disk.

A failed write, fsync, blob write or new WAL segment (ENOSPC, EIO, and running
out of descriptors, EMFILE/ENFILE, alike) makes the log call ``failed``: the
answers that depended on lost writes get ``Storage failed: …`` and the engine
is rebuilt from what is durable, so memory never holds what the disk does not.
That reload opens files and may fail itself; it is then tried again. Every
``retry_seconds`` the node reloads if it still must, then tries a fresh WAL
segment; once that works, writes are accepted again (docs/limits.md, "Storage
failures"). Meanwhile reads are served.

Must not: change engine state except by replacing the engine with a reloaded one.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol

from shardq.errors import StorageFailed

if TYPE_CHECKING:
    from .engine import Engine
    from .replication import Replication
    from .settings import NodeSettings
    from .storage import Storage

log = logging.getLogger("shardq_node.failure")


class FailureHost(Protocol):
    """What a storage failure needs of its node (the runtime is one)."""

    @property
    def settings(self) -> NodeSettings: ...

    @property
    def engine(self) -> Engine: ...

    @property
    def replication(self) -> Replication: ...

    def answer_unpersisted(self, durable: int, text: str) -> None: ...

    def fresh_engine(self) -> Engine: ...

    def use_engine(self, engine: Engine) -> None: ...

    def after_batch(self) -> None: ...


class StorageFailure:
    """The failed state of one node's storage, and the way out of it."""

    def __init__(self, node: FailureHost, storage: Storage) -> None:
        self.node = node
        self.storage = storage
        self.retry = node.settings.storage.retry_seconds
        self.probe: asyncio.TimerHandle | None = None
        self.reload_pending = False  # failed, and the engine is not reloaded yet

    def failed(self, reason: str) -> None:
        """Answer what was not persisted with an error, reload, and probe until the disk
        works again: the node never stays read-only until a restart."""
        self.node.answer_unpersisted(self.storage.wal.durable, StorageFailed(reason).text)
        self.reload_pending = True
        self.reload()
        self.schedule()

    def reload(self) -> bool:
        """Rebuild the engine from what is durable; False (logged) if the disk or the
        process's descriptors do not allow it yet. Until then reads see the old engine."""
        node = self.node
        fresh = node.fresh_engine()
        try:
            self.storage.recover(fresh, open_wal=False, stop_at=self.storage.wal.durable_pos)
        except OSError as exc:
            log.warning("cannot reload the state from disk yet (%s); trying again in %.1fs",
                        exc.strerror or exc, self.retry)
            return False
        node.use_engine(fresh)
        self.reload_pending = False
        return True

    def schedule(self) -> None:
        if self.probe is None:
            self.probe = asyncio.get_running_loop().call_later(self.retry, self._probe)

    def _probe(self) -> None:
        """Every ``retry_seconds`` while failed: reload if that is still due, then try to
        resume writing."""
        self.probe = None
        if self.reload_pending and not self.reload():
            self.schedule()
        elif self.storage.wal.try_recover():
            engine = self.node.engine
            if not self.node.replication.follows:  # a follower writes what its primary sends
                engine.release(sorted(engine.active), "storage recovered")
            self.node.after_batch()
        else:
            self.schedule()

    def close(self) -> None:
        if self.probe is not None:
            self.probe.cancel()
            self.probe = None
