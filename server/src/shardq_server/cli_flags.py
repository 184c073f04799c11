"""The flags every server sub-command shares (``shardq node``, ``gateway``, ``up``).

Listening (``--host``, ``--port``, ``--http-port``, ``--token``, ``--log-level``) and the
connection limits (one flag per field of ``Limits``, docs/limits.md), each also a
``SHARDQ_…`` environment variable through ``shardq.cli.flags``. Must not: start anything;
it only adds flags and reads them back.
"""

from __future__ import annotations

import argparse
import logging
import sys

from shardq.cli.flags import flag

from .limits import Limits


def server_flags(p: argparse.ArgumentParser) -> None:
    flag(p, "--host", "127.0.0.1", help="address to listen on")
    flag(p, "--port", 6789, int, help="TCP port")
    flag(p, "--http-port", 6790, int, help="HTTP port (0 = off)")
    flag(p, "--token", "", help="client token(s), comma-separated (empty = no auth)")
    flag(p, "--log-level", "INFO", help="logging level")


def limit_flags(p: argparse.ArgumentParser) -> None:
    """The flags of ``Limits`` (docs/limits.md), one per field."""
    d = Limits()
    flag(p, "--max-output", d.max_output, int,
         "unsent answer bytes of a connection past which it stops running lines and reading")
    flag(p, "--max-output-hard", d.max_output_hard, int,
         "unsent answer bytes past which a connection is closed")
    flag(p, "--output-timeout", d.output_timeout, float,
         "seconds a connection over --max-output may read nothing before it is closed (0 = never)")
    flag(p, "--max-backlog-bytes", d.max_backlog_bytes, int,
         "bytes of lines waiting behind a blocked command before reading pauses")
    flag(p, "--max-backlog-lines", d.max_backlog_lines, int,
         "lines waiting behind a blocked command before reading pauses")
    flag(p, "--max-connections", d.max_connections, int, "open TCP connections")
    flag(p, "--http-max-connections", d.http_max_connections, int, "open HTTP connections")
    flag(p, "--http-header-timeout", d.http_header_timeout, float,
         "seconds to receive a request's head (also the idle keep-alive time)")
    flag(p, "--http-body-timeout", d.http_body_timeout, float,
         "seconds to receive a request's body once its head came")
    flag(p, "--max-depth", d.max_depth, int,
         "levels of arrays/objects a kept value (data, result) may nest (1-200)")


def limits(args: argparse.Namespace) -> Limits:
    """The ``Limits`` of ``limit_flags``'s flags; an invalid one exits with status 2."""
    try:
        return Limits(
            max_output=args.max_output, max_output_hard=args.max_output_hard,
            output_timeout=args.output_timeout, max_backlog_bytes=args.max_backlog_bytes,
            max_backlog_lines=args.max_backlog_lines, max_connections=args.max_connections,
            http_max_connections=args.http_max_connections,
            http_header_timeout=args.http_header_timeout,
            http_body_timeout=args.http_body_timeout, max_depth=args.max_depth,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
