"""Run the shardq command line with the garbage collector's time counted.

    python [-m cProfile -o FILE] loadtest/node_gcstats.py node --port 0 --http-port 0

Exactly ``python -m shardq.cli ...``, plus a ``gc.callbacks`` hook that times
every collection. At exit it prints one line on stderr:
``GCSTATS {"collections": [g0, g1, g2], "seconds": [...], "cpu_seconds": S}``.
cProfile cannot show this time as its own: a collection runs inside whatever
allocation triggered it and is charged to that function.

Must not: change how the node runs (no GC tuning here).
"""

from __future__ import annotations

import atexit
import gc
import json
import sys
import time
from typing import Any

_counts = [0, 0, 0]
_seconds = [0.0, 0.0, 0.0]
_started = [0.0]
_cpu0 = time.process_time()


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    gen = info["generation"]
    _counts[gen] += 1
    _seconds[gen] += time.perf_counter() - _started[0]


def _report() -> None:
    stats = {
        "collections": _counts, "seconds": [round(s, 4) for s in _seconds],
        "cpu_seconds": round(time.process_time() - _cpu0, 4),
    }
    print("GCSTATS " + json.dumps(stats), file=sys.stderr, flush=True)


def main() -> int:
    gc.callbacks.append(_on_gc)
    atexit.register(_report)
    from shardq.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
