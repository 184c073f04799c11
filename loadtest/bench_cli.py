"""What every benchmark script does with its command line and its process: a ``Config``
dataclass's fields as ``--flags`` (``--quick`` picks the smoke run's counts), SIGTERM as an
exit that stops the servers it started, uvloop for the client's loop, progress on stderr.

Used by ``bench.py`` and ``bench_replication.py``. Must not: start anything.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from dataclasses import asdict
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT")


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_config(p: argparse.ArgumentParser, config: type[ConfigT], quick: dict[str, Any],
                 argv: list[str]) -> tuple[argparse.Namespace, ConfigT]:
    """Parse ``argv`` with one ``--field`` flag per field of the dataclass ``config`` added to
    ``p``; a flag given wins over ``--quick``'s value, which wins over the default."""
    # config is a dataclass, which mypy cannot tell of a type variable
    defaults: dict[str, Any] = asdict(config())  # type: ignore[call-overload]
    for name, value in defaults.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=None,
                       help=f"default {value} ({quick.get(name, value)} with --quick)")
    args = p.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k in defaults and v is not None}
    return args, config(**{**defaults, **(quick if args.quick else {}), **given})


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def prepare_process() -> None:
    """SIGTERM raises ``SystemExit`` (so ``finally`` blocks stop the servers); uvloop runs
    the client when it is installed."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        import uvloop
    except ImportError:
        progress("uvloop not installed: the client runs on asyncio's own loop")
    else:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
