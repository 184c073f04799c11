"""Splitting a byte stream into request lines (nodes and gateways share it).

``LineSplitter.feed(data)`` returns the complete lines in ``data`` (plus what
was buffered before) and, when one of them, or the unfinished rest, is longer
than ``max_line``, its length: the lines before it are still returned, so the
caller answers them in order before refusing the long one.
"""

from __future__ import annotations


class LineSplitter:
    __slots__ = ("max_line", "part_len", "parts")

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self.parts: list[bytes] = []  # an unfinished line, in pieces
        self.part_len = 0

    def feed(self, data: bytes) -> tuple[list[bytes], int]:
        """The complete lines, and the size of a too-long line (0 if none)."""
        if data.rfind(b"\n") < 0:
            self.parts.append(data)
            self.part_len += len(data)
            return [], (self.part_len if self.part_len > self.max_line else 0)
        if self.parts:
            self.parts.append(data)
            data = b"".join(self.parts)
            self.parts = []
        lines = data.split(b"\n")
        tail = lines.pop()
        if tail:
            self.parts.append(tail)
        self.part_len = len(tail)
        too_long = 0
        if len(data) > self.max_line:  # only then can a line be too long
            for i, line in enumerate(lines):
                if len(line) > self.max_line:
                    too_long = len(line)
                    del lines[i:]
                    break
            if not too_long and self.part_len > self.max_line:
                too_long = self.part_len
        return lines, too_long

    def drop(self) -> None:
        self.parts = []
        self.part_len = 0
