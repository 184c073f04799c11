"""The loopback floor: the fastest a Python line server on this machine answers.

Run as a subprocess by ``bench.py``. It frames the byte stream exactly as the
node's TCP server does (one ``rfind`` per read, ``split`` into lines), parses
every line with orjson, and answers each with one short line
``{"ok":true,"id":N}``, all answers of one read in one write. Whatever the
node spends beyond this is the queue's own cost.

Prints ``LISTENING <port>`` on stdout once bound; stops on SIGINT/SIGTERM.

Must not: do anything per line beyond parse and answer, or listen beyond loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import orjson
from bench_client import complete_lines


class FloorSession(asyncio.Protocol):
    """One connection: a line in, a short line out."""

    counter = 0  # ids handed out, shared by all connections like a node's id counter

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parts: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        head = complete_lines(self.parts, data)
        if head is None:
            return
        loads = orjson.loads
        n = FloorSession.counter
        out = []
        for line in head.split(b"\n"):
            loads(line)
            n += 1
            out.append(b'{"ok":true,"id":%d}\n' % n)
        FloorSession.counter = n
        assert self.transport is not None
        self.transport.write(out[0] if len(out) == 1 else b"".join(out))


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(FloorSession, "127.0.0.1", port, reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    print(f"LISTENING {bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 = any)")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        print("uvloop not installed: the floor runs on asyncio's own loop", file=sys.stderr)
    else:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
