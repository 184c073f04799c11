"""``shardq gateway``: the sub-command that runs a gateway (DESIGN §8).

Registered under the ``shardq.commands`` entry-point group (gateway/pyproject.toml). Its
flags are a contract and each is also a ``SHARDQ_…`` environment variable. Must not:
import the gateway's servers before the sub-command runs (every ``shardq`` invocation
loads this module).
"""

from __future__ import annotations

import argparse

from shardq.cli.flags import flag, tokens
from shardq.cli.subcommands import SubCommand
from shardq_server.cli_flags import limit_flags, limits, server_flags, setup_logging


def gateway_arguments(p: argparse.ArgumentParser) -> None:
    server_flags(p)
    limit_flags(p)
    flag(p, "--seed", "127.0.0.1:6800", help="node addresses host:port[,host:port…]")
    flag(p, "--cluster-token", None, help="token the gateway uses with the nodes")
    flag(p, "--drain-delay", 5.0, float,
         help="on SIGTERM: seconds it goes on serving as usual after /ready fails")
    flag(p, "--drain-timeout", 20.0, float,
         help="on SIGTERM: seconds from the signal to the exit, at most")


def run_gateway(args: argparse.Namespace) -> int:
    from .main import run
    from .settings import GatewaySettings

    setup_logging(args.log_level)
    run(GatewaySettings(
        host=args.host, port=args.port, http_port=args.http_port,
        seeds=[s for s in args.seed.split(",") if s], tokens=tokens(args.token),
        cluster_token=args.cluster_token, limits=limits(args),
        drain_delay=args.drain_delay, drain_timeout=args.drain_timeout,
    ))
    return 0


GATEWAY = SubCommand("gateway", "run a gateway (routes by slot to the nodes)",
                     gateway_arguments, run_gateway)
