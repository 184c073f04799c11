"""Slots: every queue belongs to one of SLOTS slots, the unit that moves.

``slot = crc32(queue) % SLOTS`` and job ids carry their slot in the low bits
(``id = seq * SLOTS + slot``), so any process can route an id without a lookup.
"""

from __future__ import annotations

import zlib

SLOTS = 1024
SLOT_BITS = 10  # SLOTS == 1 << SLOT_BITS
#: ids stay below 2**53 so JavaScript clients read them exactly.
MAX_ID = 2**53 - 1


def slot_of(queue: str) -> int:
    return zlib.crc32(queue.encode()) % SLOTS


def slot_of_id(job_id: int) -> int:
    return job_id % SLOTS
