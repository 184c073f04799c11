"""Run the shardq command line under cProfile timed by the main thread's CPU clock.

    python loadtest/node_cpuprofile.py OUT.prof node --port 0 --http-port 0 ...

Exactly ``python -m shardq.cli ...`` under ``cProfile.Profile(time.thread_time)``; the
profile is written to OUT.prof when the node exits (SIGINT stops it cleanly). Unlike
``python -m cProfile`` (wall-clock time), time the process spends preempted by other
processes or idle in the event loop's poll is not charged to any function: on a shared,
loaded machine the profile is of the node's own CPU, which is what it is read for.
Threads other than the main one (the WAL's fsync and spare-segment workers) are not
profiled.

Must not: change how the node runs.
"""

from __future__ import annotations

import cProfile
import sys
import time


def main() -> int:
    out, argv = sys.argv[1], sys.argv[2:]
    from shardq.cli import main as cli_main

    prof = cProfile.Profile(time.thread_time)
    prof.enable()
    try:
        return cli_main(argv)
    finally:
        prof.disable()
        prof.dump_stats(out)


if __name__ == "__main__":
    raise SystemExit(main())
