"""The blob store: payloads kept on the node's volume instead of in memory.

The seed's "overflow to R2", here on the persistent volume: a payload above
the size threshold, or any payload once the memory budget is spent, is
written to ``blobs/XX/<job id>.json`` and the job holds a ``BlobRef``. The
WAL record of the push carries only the blob's size; the blob file is
fsynced in the same group commit, before the record (see ``Wal.extra_fsync``).
Files are removed once the record that finished their job is durable.
"""

from __future__ import annotations

import logging
import os

from .wal import Files

log = logging.getLogger("shardq_node.blobs")


class BlobStore:
    def __init__(self, directory: str, files: Files | None = None) -> None:
        self.dir = directory
        self.files = files or Files()
        self.used = 0  # bytes of blob files on disk
        self.count = 0
        self.sizes: dict[int, int] = {}
        os.makedirs(directory, exist_ok=True)

    def path(self, job_id: int) -> str:
        return os.path.join(self.dir, f"{job_id % 256:02x}", f"{job_id}.json")

    def write(self, job_id: int, data: bytes) -> int:
        """Write one payload; returns the open fd, to be fsynced and closed by the caller."""
        path = self.path(job_id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self.files.write(fd, data)
        except BaseException:
            os.close(fd)
            raise
        self._add(job_id, len(data))
        return fd

    def write_all(self, items: list[tuple[int, bytes]]) -> list[int]:
        """Write each (job id, payload); their open fds. On an error nothing stays behind:
        the fds are closed, the files removed, and the error raised."""
        fds: list[int] = []
        try:
            for job_id, data in items:
                fds.append(self.write(job_id, data))
        except OSError:
            self.discard([job_id for job_id, _ in items], fds)
            raise
        return fds

    def discard(self, job_ids: list[int], fds: list[int]) -> None:
        """Undo ``write_all``: close ``fds`` and remove the files of ``job_ids``."""
        for fd in fds:
            try:
                self.files.close(fd)
            except OSError:
                pass
        for job_id in job_ids:
            try:
                self.remove(job_id)
            except OSError as exc:  # the startup scan removes what is left
                log.warning("could not remove blob of job %d: %s", job_id, exc)

    def _add(self, job_id: int, size: int) -> None:
        old = self.sizes.get(job_id)
        if old is not None:
            self.used -= old
            self.count -= 1
        self.sizes[job_id] = size
        self.used += size
        self.count += 1

    def read(self, job_id: int) -> bytes:
        return self.files.read(self.path(job_id))

    def remove(self, job_id: int) -> None:
        size = self.sizes.pop(job_id, None)
        if size is not None:
            self.used -= size
            self.count -= 1
        try:
            os.unlink(self.path(job_id))
        except FileNotFoundError:
            pass

    def scan(self, keep: set[int]) -> int:
        """Index the files on disk after recovery; delete those no live job refers to."""
        removed = 0
        self.used = self.count = 0
        self.sizes.clear()
        for sub in os.listdir(self.dir):
            subdir = os.path.join(self.dir, sub)
            if not os.path.isdir(subdir):
                continue
            for name in os.listdir(subdir):
                stem = name.removesuffix(".json")
                if not stem.isdigit():
                    continue
                job_id = int(stem)
                path = os.path.join(subdir, name)
                if job_id in keep:
                    self._add(job_id, os.path.getsize(path))
                else:
                    os.unlink(path)
                    removed += 1
        return removed
