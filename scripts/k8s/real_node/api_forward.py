"""Make the real node's apiserver reachable from the host's loopback (tests, helm, kubectl).

The whole cluster of the real-node tier lives in a private network namespace; its apiserver
listens on 127.0.0.1:PORT *there*. This process binds 127.0.0.1:0 in the host's namespace
first, then moves itself into the node's namespace (setns), where every connection it opens
is made: each client connection on the host's port is piped to the apiserver's. TLS passes
through untouched (the apiserver's certificate names 127.0.0.1, so clients still verify it).

    python3 api_forward.py --netns /run/netns/NAME --target 127.0.0.1:PORT --port-file FILE

It writes the host port to FILE once it listens. Standard library only.
Must not: listen on anything but the host's 127.0.0.1, or touch the bytes it forwards.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import socket
import sys
from pathlib import Path

CLONE_NEWNET = 0x40000000


def enter_netns(path: str) -> None:
    """Move this (still single-threaded) process into the network namespace at ``path``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def serve(listener: socket.socket, host: str, port: int) -> None:
    async def forward(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            api_r, api_w = await asyncio.open_connection(host, port)
        except OSError as exc:
            print(f"api_forward: {host}:{port}: {exc}", file=sys.stderr, flush=True)
            client_w.close()
            return
        await asyncio.gather(pipe(client_r, api_w), pipe(api_r, client_w))

    server = await asyncio.start_server(forward, sock=listener)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--netns", required=True, help="e.g. /run/netns/shardq-rn")
    parser.add_argument("--target", required=True, help="the apiserver inside: 127.0.0.1:PORT")
    parser.add_argument("--port-file", type=Path, required=True)
    args = parser.parse_args()
    host, port = args.target.rsplit(":", 1)

    listener = socket.socket()  # made in the host's namespace: it stays there after setns
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.setblocking(False)
    enter_netns(args.netns)
    tmp = args.port_file.with_suffix(".tmp")
    tmp.write_text(f"{listener.getsockname()[1]}\n")
    tmp.rename(args.port_file)
    asyncio.run(serve(listener, host, int(port)))


if __name__ == "__main__":
    main()
