"""The ``shardq`` command line (DESIGN §8: its sub-commands and flags are a contract).

``main`` builds one parser from the client's sub-commands (``client_commands``) and the
server sub-commands that the installed server distributions register under the
``shardq.commands`` entry-point group (``subcommands``); every flag is also a ``SHARDQ_…``
environment variable (``flags``). A server sub-command whose distribution is not installed
is still listed, and running it says what to install. Must not: import server code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .client_commands import CLIENT_COMMANDS
from .subcommands import SERVER_COMMANDS, Missing, SubCommand, discover

__all__ = ["build_parser", "main"]


def _epilog(missing: dict[str, Missing]) -> str | None:
    if not missing:
        return None
    by_distribution: dict[str, list[str]] = {}
    for m in missing.values():
        by_distribution.setdefault(m.distribution, []).append(m.name)
    lines = [f"  {', '.join(names)}: pip install {dist}" for dist, names in by_distribution.items()]
    head = "server sub-commands not installed here (the shardq image has them all):"
    return "\n".join([head, *lines])


def build_parser(
    found: dict[str, SubCommand] | None = None, missing: dict[str, Missing] | None = None,
) -> argparse.ArgumentParser:
    """The parser of every sub-command (the installed ones unless ``found`` is given): the
    server sub-commands in ``SERVER_COMMANDS`` order (others after, by name), then the
    client's."""
    if found is None:
        found, missing = discover()
    missing = missing or {}
    parser = argparse.ArgumentParser(prog="shardq", description="shardq job queue",
                                     epilog=_epilog(missing),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    others = sorted((found.keys() | missing.keys()) - SERVER_COMMANDS.keys())
    for name in [*SERVER_COMMANDS, *others]:
        if name in found:
            found[name].add_arguments(sub.add_parser(name, help=found[name].help))
        elif name in missing:
            sub.add_parser(name, help=missing[name].short())
    for command in CLIENT_COMMANDS:
        command.add_arguments(sub.add_parser(command.name, help=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    found, missing = discover()
    if argv and argv[0] in missing:
        print(f"error: {missing[argv[0]].message()}", file=sys.stderr)
        return 2
    args = build_parser(found, missing).parse_args(argv)
    commands = {c.name: c for c in (*found.values(), *CLIENT_COMMANDS)}
    return commands[args.command].run(args)
