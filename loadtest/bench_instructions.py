"""CPU instructions per request of a node's hot path, under valgrind: repeatable on a busy box.

    .venv/bin/python loadtest/bench_instructions.py [--base-pythonpath DIR] [--n 4000]

Wall-clock figures on this shared 2-core machine wander by tens of percent between runs;
callgrind's instruction counts do not (the same binary, inputs and environment give the
same count whatever else runs). This script runs, in a child process under
``valgrind --tool=callgrind``, a memory-only node's request path in-process as a TCP
session runs it (``Node.execute`` per line, ``flush`` and ``after_batch`` every 16 lines)
for N PUSH, then N PULL, then N ACK lines, and once more with no request; the difference
divided by 3N is the cost of one request. ``--base-pythonpath`` runs the same against
another tree (e.g. an older commit's package tree) in the same session, for a before/after
comparison. Prints one line per tree. Must not: touch the network.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

CHILD = r'''
import sys
import orjson
n = int(sys.argv[1])
try:
    from shardq_node.runtime import Node
    from shardq_node.settings import NodeSettings
except ImportError:  # an older layout: shardq.node
    from shardq.node.runtime import Node
    from shardq.node.settings import NodeSettings


class Caller:
    owner = 1
    authed = True
    cluster = False
    pending_rid = None
    waiter = None
    closing = False
    transport = None

    def __init__(self):
        self.subscriptions = {}


import asyncio


async def main():
    node = Node(NodeSettings(port=0, http_port=0))
    caller = Caller()
    data = orjson.dumps({"payload": "x" * 180})
    push = b'{"cmd":"PUSH","queue":"bench","data":' + data + b"}"
    ids = []
    def batch(lines):
        out = []
        for i, line in enumerate(lines, 1):
            out.append(node.execute(line, caller))
            if i % 16 == 0:
                node.flush()
                node.after_batch()
        node.flush()
        node.after_batch()
        return out
    batch([push] * n)
    for answer in batch([b'{"cmd":"PULL","queue":"bench","timeout":0}'] * n):
        job = orjson.loads(answer)["job"]
        ids.append((job["id"], job["started_at"]))
    batch([b'{"cmd":"ACK","id":%d,"lease":%d}' % pair for pair in ids])

asyncio.run(main())
'''


def instructions(n: int, pythonpath: str | None) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "child.py")
        with open(script, "w") as f:
            f.write(CHILD)
        out = os.path.join(tmp, "callgrind.out")
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                        sys.executable, script, str(n)], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=3600)
        with open(out) as f:
            text = f.read()
        m = re.search(r"^summary: (\d+)", text, re.M) or re.search(r"^totals: (\d+)", text, re.M)
        if m is None:
            raise RuntimeError("no instruction total in callgrind's output")
        return int(m.group(1))


def per_request(n: int, pythonpath: str | None) -> float:
    return (instructions(n, pythonpath) - instructions(0, pythonpath)) / (3 * n)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4000, help="requests of each kind")
    p.add_argument("--base-pythonpath", default=None,
                   help="also measure the tree at this PYTHONPATH (before/after)")
    args = p.parse_args()
    head = per_request(args.n, None)
    print(f"this tree: {head:,.0f} instructions per request (PUSH, PULL, ACK; n={args.n})")
    if args.base_pythonpath:
        base = per_request(args.n, args.base_pythonpath)
        print(f"base tree: {base:,.0f} instructions per request; "
              f"this tree / base = {head / base:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
