"""CPU instructions per request of a node's hot path, under valgrind: repeatable on a busy box.

    .venv/bin/python loadtest/bench_instructions.py [--base-pythonpath DIR] [--n 4000]
    .venv/bin/python loadtest/bench_instructions.py --pure      # compiled vs interpreted
    .venv/bin/python loadtest/bench_instructions.py --top 30    # where the instructions go

Wall-clock figures on this shared 2-core machine wander by tens of percent between runs;
callgrind's instruction counts do not (the same binary, inputs and environment give the
same count whatever else runs). This script runs, in a child process under
``valgrind --tool=callgrind``, a memory-only node's request path in-process as a TCP
session runs it (``Node.execute`` per line, ``flush`` and ``after_batch`` every 16 lines)
for N PUSH, then N PULL, then N ACK lines, and once more with N/10 of each; the difference
divided by the 2.7N requests between them is the cost of one request (what happens once, the
first request of a kind importing a module, say, is in both runs). ``--base-pythonpath``
runs the same against another tree (e.g. an older commit's package tree) in the same session,
for a before/after comparison; ``--pure`` the same tree interpreted (``SHARDQ_PURE=1``,
shardq.native) against its compiled build. ``--top K`` prints the K functions with the most
instructions of their own per request (``callgrind_annotate``, the same difference): CPython's
C, the mypyc-compiled functions (``CPyDef_…``), orjson, libc. Prints one line per tree.
Must not: touch the network.
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


def instructions(n: int, pythonpath: str | None, pure: bool = False,
                 functions: dict[str, int] | None = None) -> int:
    """The run's total instructions; with ``functions``, each function's own ones added to
    it (``callgrind_annotate``)."""
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "child.py")
        with open(script, "w") as f:
            f.write(CHILD)
        out = os.path.join(tmp, "callgrind.out")
        env = {k: v for k, v in os.environ.items() if k != "SHARDQ_PURE"}
        env["PYTHONHASHSEED"] = "0"
        if pure:
            env["SHARDQ_PURE"] = "1"
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
        if functions is not None:
            text = subprocess.run(["callgrind_annotate", "--threshold=100", out], check=True,
                                  capture_output=True, text=True).stdout
            for line in text.splitlines():
                f = re.match(r"^\s*([\d,]+) \(\s*[\d.]+%\)\s+(\S+)", line)
                if f and f.group(2) != "PROGRAM":
                    name = re.sub(r"^.*/(Python-[\d.]+/)?", "", f.group(2))
                    functions[name] = functions.get(name, 0) + int(f.group(1).replace(",", ""))
        return int(m.group(1))


def per_request(n: int, pythonpath: str | None, pure: bool = False, top: int = 0) -> float:
    """Instructions per request; with ``top``, prints the ``top`` functions with the most
    instructions of their own per request (the run with requests less the run without)."""
    with_requests: dict[str, int] = {}
    without: dict[str, int] = {}
    few = max(1, n // 10)
    total = (instructions(n, pythonpath, pure, with_requests if top else None)
             - instructions(few, pythonpath, pure, without if top else None))
    requests = 3 * (n - few)
    if top:
        own = {k: (v - without.get(k, 0)) / requests for k, v in with_requests.items()}
        for name, count in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
            print(f"{count:>9,.0f} {100 * count * requests / total:5.1f}%  {name}")
    return total / requests


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4000, help="requests of each kind")
    p.add_argument("--base-pythonpath", default=None,
                   help="also measure the tree at this PYTHONPATH (before/after)")
    p.add_argument("--pure", action="store_true",
                   help="also measure this tree interpreted (SHARDQ_PURE=1)")
    p.add_argument("--top", type=int, default=0,
                   help="print the K functions with the most instructions of their own")
    args = p.parse_args()
    head = per_request(args.n, None, top=args.top)
    print(f"this tree: {head:,.0f} instructions per request (PUSH, PULL, ACK; n={args.n})")
    if args.pure:
        pure = per_request(args.n, None, pure=True, top=args.top)
        print(f"this tree interpreted (SHARDQ_PURE=1): {pure:,.0f} instructions per request; "
              f"compiled / interpreted = {head / pure:.3f}")
    if args.base_pythonpath:
        base = per_request(args.n, args.base_pythonpath)
        print(f"base tree: {base:,.0f} instructions per request; "
              f"this tree / base = {head / base:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
