"""Where a job's payload lives: in memory within the memory budget, or in the blob store.

``push`` admits a push: a payload past ``blob_threshold``, or one that would take the
memory past ``memory_budget``, is spilled to the blob store (within ``disk_budget``;
without a data directory, or past the disk budget, the push is refused with ``Queue
full``). Blobs are written before the jobs exist, so a blob that cannot be written
fails the storage before anything is counted; they are fsynced with the push's group
commit. ``job_wire`` is the way back out: a job's wire form, its payload read from the
blob store when it was spilled.

Must not: change engine state except through ``Engine.push``, or touch the WAL (only
``Storage``'s blob methods).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shardq.errors import InvalidRequest, QueueFull, StorageFailed
from shardq.wire.protocol import JobSpec
from shardq.wire.slots import SLOTS

from .jobs import BlobRef, Job

if TYPE_CHECKING:
    from .engine import Engine
    from .settings import StorageSettings
    from .storage import Storage


class Payloads:
    """The memory and disk budgets of one node's payloads, and its blob store's traffic."""

    def __init__(self, engine: Engine, budget: StorageSettings, storage: Storage | None,
                 log: Any, serves: Callable[[int], bool],
                 note_blob: Callable[[int, bytes], None]) -> None:
        self.engine = engine  # the runtime's ``use_engine`` replaces it
        self.budget = budget
        self.storage = storage
        self.log = log  # the WAL (or MemoryLog): ``failed`` refuses pushes
        self.serves = serves  # does this node serve a slot now (cluster.py)
        self.note_blob = note_blob  # a spilled payload travels with its record to followers
        self.spilled = 0  # payloads the last push sent to the blob store

    def push(self, queue: str, specs: list[JobSpec], payloads: list[bytes]) -> list[int]:
        """Push through the memory budget: spill to the blob store, or refuse when full; the
        new jobs' ids (``spilled`` tells how many payloads the last push sent to disk)."""
        self.spilled = 0
        if self.log.failed is not None:
            raise StorageFailed(self.log.failed)
        budget = self.budget
        if specs and (specs[0].depends_on or len(specs) > 1):
            self._check_parents(specs)
        if len(payloads) == 1:  # the common case: one payload well within the budgets
            size = len(payloads[0])
            if (size <= budget.blob_threshold
                    and self.engine.payload_bytes + size <= budget.memory_budget):
                return self.engine.push(queue, specs, payloads)  # type: ignore[arg-type]
        storage = self.storage
        in_memory = self.engine.payload_bytes
        spill: list[tuple[int, bytes]] = []
        stored: list[bytes | BlobRef] = list(payloads)
        on_disk = storage.blobs.used if storage is not None else 0
        for i, data in enumerate(payloads):
            size = len(data)
            if size <= budget.blob_threshold and in_memory + size <= budget.memory_budget:
                in_memory += size
                continue
            if storage is None:
                if in_memory + size <= budget.memory_budget:  # no disk: big ones stay here
                    in_memory += size
                    continue
                raise QueueFull()
            if on_disk + size > budget.disk_budget:
                raise QueueFull()
            on_disk += size
            spill.append((i, data))
            stored[i] = BlobRef(size)
        if not spill:
            return self.engine.push(queue, specs, stored)
        assert storage is not None
        ids = self._push_spilled(storage, queue, specs, stored, spill)
        self.spilled = len(spill)
        return ids

    def _push_spilled(self, storage: Storage, queue: str, specs: list[JobSpec],
                      stored: list[bytes | BlobRef], spill: list[tuple[int, bytes]]) -> list[int]:
        """Blobs first, then the jobs: a blob that cannot be written (ENOSPC, EMFILE, EIO)
        fails the storage before any job exists or is counted."""
        ids = self.engine.next_ids(queue, len(specs))
        fds = storage.write_blobs([(ids[i], data) for i, data in spill])
        try:
            pushed = self.engine.push(queue, specs, stored)
        except BaseException:  # refused (a duplicate key, ...): no blob stays behind
            storage.blobs.discard([ids[i] for i, _ in spill], fds)
            raise
        assert pushed == ids
        for i, data in spill:  # a replicated primary sends them with their records
            self.note_blob(ids[i], data)
        storage.keep_blobs(fds)
        return ids

    def _check_parents(self, specs: list[JobSpec]) -> None:
        """Parents in other slots that this node serves must exist (elsewhere: the WATCH
        answer decides, and an unknown parent sends the child to the DLQ)."""
        for spec in specs:
            for parent in spec.depends_on or ():
                if self.serves(parent % SLOTS) and \
                        self.engine.deps.state_of(parent) == "unknown":
                    raise InvalidRequest(f"depends_on: job {parent} not found")

    def job_wire(self, job: Job) -> dict[str, Any]:
        """A job as answers carry it, its payload read back if it was spilled."""
        if type(job.data) is BlobRef:
            return job.wire(self.read_blob(job.id))
        return job.wire()

    def read_blob(self, job_id: int) -> bytes:
        """A payload from the blob store; StorageFailed names why it cannot be read (EMFILE,
        EIO). A pulled job whose blob cannot be read stays leased to its puller (its lease
        ends as any other: disconnect, timeout)."""
        assert self.storage is not None
        try:
            return self.storage.blobs.read(job_id)
        except OSError as exc:
            raise StorageFailed(f"read from blob store failed: {exc.strerror or exc}") from None
