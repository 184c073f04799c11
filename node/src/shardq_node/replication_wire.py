"""The replication stream's binary messages (DESIGN §9), both ways, and their framing.

After ``FOLLOW`` on the line protocol, a primary's connection to a follower carries
``[u32 length][u8 kind][body]`` (length counts kind + body):

  primary -> follower
    RECORDS   [u64 first LSN][u32 count][u32 blobs]{[u64 id][u32 n][n bytes]}*[frames]
    TRUNCATE  [u64 LSN]                 cut everything after LSN, then records follow
    SNAPSHOT  [u64 LSN][u32 blobs]{blob}*[snapshot file bytes]   replace the whole state
    HEARTBEAT [u64 commit LSN][u64 primary's last LSN]
  follower -> primary
    ACK       [u64 durable LSN]

``frames`` are WAL frames exactly as the primary wrote them (wal.py).

Must not: decide anything: the primary's side is shipping.py, the follower's following.py.
"""

from __future__ import annotations

import struct

from .wal import HEADER

K_RECORDS = 1
K_TRUNCATE = 2
K_SNAPSHOT = 3
K_HEARTBEAT = 4
K_ACK = 1

MSG = struct.Struct("<IB")
U64 = struct.Struct("<Q")
RECORDS_HEAD = struct.Struct("<QII")
BLOB_HEAD = struct.Struct("<QI")
HEARTBEAT = struct.Struct("<QQ")


def message(kind: int, body: bytes) -> bytes:
    return MSG.pack(len(body) + 1, kind) + body


def blobs_body(blobs: list[tuple[int, bytes]]) -> bytes:
    return b"".join(BLOB_HEAD.pack(jid, len(data)) + data for jid, data in blobs)


class FrameReader:
    """Splits a byte stream into binary messages (kind, body)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self.buf
        buf += data
        out = []
        pos = 0
        while len(buf) - pos >= MSG.size:
            length, kind = MSG.unpack_from(buf, pos)
            end = pos + 4 + length
            if end > len(buf):
                break
            out.append((kind, bytes(buf[pos + MSG.size : end])))
            pos = end
        if pos:
            del buf[:pos]
        return out


def split_blobs(body: bytes, offset: int, count: int) -> tuple[list[tuple[int, bytes]], int]:
    blobs = []
    for _ in range(count):
        jid, n = BLOB_HEAD.unpack_from(body, offset)
        offset += BLOB_HEAD.size
        blobs.append((jid, body[offset : offset + n]))
        offset += n
    return blobs, offset


def skip_frames(frames: bytes, n: int) -> bytes:
    """``frames`` without its first ``n`` records."""
    pos = 0
    for _ in range(n):
        length, _crc = HEADER.unpack_from(frames, pos)
        pos += HEADER.size + length
    return frames[pos:]
