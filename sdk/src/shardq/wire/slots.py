"""Slots: every queue belongs to one of SLOTS slots, the unit that moves.

``slot = crc32(queue) % SLOTS`` and job ids carry their slot in the low bits
(``id = seq * SLOTS + slot``), so any process can route an id without a lookup.
``SlotCache`` remembers the slots of the queue names a router saw lately (a node's
slot checks, a gateway's routes, the SDK's direct mode).
"""

from __future__ import annotations

import zlib

SLOTS = 1024
SLOT_BITS = 10  # SLOTS == 1 << SLOT_BITS
#: ids stay below 2**53 so JavaScript clients read them exactly.
MAX_ID = 2**53 - 1


def slot_of(queue: str) -> int:
    return zlib.crc32(queue.encode()) % SLOTS


class SlotCache:
    """``slot_of`` of the queue names seen lately: at most ``size`` of them, past which it
    starts over (a stream of one-off names cannot grow it without bound)."""

    __slots__ = ("known", "size")

    def __init__(self, size: int = 100_000) -> None:
        self.known: dict[str, int] = {}
        self.size = size

    def slot_of(self, queue: str) -> int:
        known = self.known
        slot = known.get(queue)
        if slot is None:
            if len(known) > self.size:
                known.clear()
            slot = known[queue] = slot_of(queue)
        return slot


def slot_of_id(job_id: int) -> int:
    return job_id % SLOTS
