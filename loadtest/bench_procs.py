"""The benchmark's server processes: a shardq node and the loopback floor.

Each is started as a subprocess on a free loopback port (port 0, the port is
read back from what the process prints), its output goes to a log file, and
it is stopped by its PID: SIGINT first (the node then stops cleanly, and
under cProfile writes its profile), SIGKILL if it does not exit in time.

Must not: stop any process it did not start, or wait without a timeout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent

_NODE_READY = re.compile(rb"listening on 127\.0\.0\.1:(\d+)")
_FLOOR_READY = re.compile(rb"LISTENING (\d+)")


class ServerError(RuntimeError):
    """A server process did not start or stop as expected."""


class Server:
    """One server subprocess, stopped by PID."""

    def __init__(self, name: str, argv: list[str], ready: re.Pattern[bytes], log: Path) -> None:
        self.name = name
        self.argv = argv
        self.ready = ready
        self.log_path = log
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 20.0) -> Server:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self.ready.search(self.log_path.read_bytes())
            if m:
                self.port = int(m.group(1))
                return self
            if self.proc.poll() is not None:
                raise ServerError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            time.sleep(0.02)
        self.stop()
        raise ServerError(f"{self.name} not listening after {timeout:.0f} s:\n{self.tail()}")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGINT, then SIGKILL after ``timeout``; the exit code (None if never started)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"{self.name} (pid {proc.pid}) ignored SIGINT; killing it", file=sys.stderr)
                proc.kill()
                proc.wait(10)
        return proc.returncode

    def pin(self, cpus: set[int]) -> None:
        """Restrict the server to these CPUs (its main thread: where the event loop runs)."""
        os.sched_setaffinity(self.pid, cpus)

    def rss_bytes(self) -> int:
        """Resident set size of the process, from /proc/PID/status (VmRSS)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise ServerError(f"no VmRSS for pid {self.pid}")

    def tail(self, n: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: A profiled node runs its interpreted sources: cProfile sees only Python functions, so
#: under a compiled build (shardq.native) every compiled function's time would be charged
#: to its interpreted caller and the profile would name none of them. ``env`` execs, so
#: the node keeps the PID the benchmark pins.
PROFILED = ["env", "SHARDQ_PURE=1"]


def node_argv(profile_to: Path | None = None, gcstats: bool = False) -> list[str]:
    """How the node is run: memory only, any free port, no HTTP.

    ``profile_to``: under cProfile, writing there, with the interpreted sources
    (``PROFILED``); ``gcstats``: through ``node_gcstats.py``, which times the garbage
    collector (same CLI otherwise).
    """
    argv = [sys.executable]
    if profile_to is not None:
        argv = [*PROFILED, sys.executable, "-m", "cProfile", "-o", str(profile_to)]
    argv += [str(HERE / "node_gcstats.py")] if gcstats else ["-m", "shardq.cli"]
    return [
        *argv, "node", "--host", "127.0.0.1", "--port", "0", "--http-port", "0",
        "--log-level", "INFO",
    ]


def node(
    log_dir: Path, tag: str = "node", profile_to: Path | None = None, gcstats: bool = False
) -> Server:
    argv = node_argv(profile_to, gcstats)
    return Server(f"shardq {tag}", argv, _NODE_READY, log_dir / f"{tag}.log")


def gc_stats(server: Server) -> dict[str, Any] | None:
    """The GCSTATS line a stopped ``node_gcstats.py`` node printed, if any."""
    for line in reversed(server.log_path.read_text(errors="replace").splitlines()):
        if line.startswith("GCSTATS "):
            stats: dict[str, Any] = json.loads(line[len("GCSTATS "):])
            return stats
    return None


def floor(log_dir: Path) -> Server:
    argv = [sys.executable, str(HERE / "floor_server.py"), "--port", "0"]
    return Server("floor", argv, _FLOOR_READY, log_dir / "floor.log")


def shown(argv: list[str]) -> str:
    """A command line as a person would type it from the repository root."""
    root = str(ROOT) + "/"
    return " ".join(a[len(root):] if a.startswith(root) else a for a in argv)
