"""Running a server process: uvloop when installed, waiting for SIGTERM/SIGINT, and
turning an unexpected exception in one request into that request's ``Internal: …`` answer.

Shared by ``shardq node``, ``shardq gateway`` and ``shardq up``.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from prometheus_client.core import GaugeMetricFamily

from shardq import native
from shardq.errors import InternalError


def install_uvloop() -> bool:
    """Use uvloop's event loop policy when it is installed."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def build_info() -> GaugeMetricFamily:
    """``shardq_build_info{compiled="true"}``: whether this process runs the hot path compiled
    with mypyc or its interpreted sources (``shardq.native``), and how many modules."""
    build = native.status()
    info = GaugeMetricFamily("shardq_build_info", "The hot path: compiled with mypyc or "
                             "interpreted (the same sources)", labels=["compiled", "modules"])
    info.add_metric(["true" if build.compiled else "false",
                     str(len(native.loaded_compiled()))], 1.0)
    return info


async def until_signalled() -> None:
    """Return on the first SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


class Causes:
    """Unexpected exceptions of one server: each request that hit one gets an
    ``Internal: …`` answer; the traceback of each cause (type and place) is logged once."""

    MAX_CAUSES = 1000

    def __init__(self, log: logging.Logger, server: str) -> None:
        self.log = log
        self.server = server
        self.seen: set[tuple[str, str, int]] = set()
        self.count = 0

    def error(self, what: str, exc: BaseException) -> InternalError:
        """The answer for a request ``what`` (e.g. "PUSH") that raised ``exc``."""
        self.count += 1
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = (tb.tb_frame.f_code.co_filename, tb.tb_lineno) if tb is not None else ("", 0)
        cause = (type(exc).__name__, *where)
        if cause not in self.seen and len(self.seen) < self.MAX_CAUSES:
            self.seen.add(cause)
            self.log.error("%s failed (each cause is logged once)", what, exc_info=exc)
        return InternalError(f"{what} failed ({type(exc).__name__}); the cause is in the log "
                             f"of {self.server}")
