"""How the ``shardq`` command finds its sub-commands: the ``shardq.commands`` entry points.

A sub-command is a ``SubCommand``: its name, one line of help, a function that adds its
flags to its parser and one that runs it. The client's own sub-commands live in
``shardq.cli.client_commands``; the servers' (``node``, ``gateway``, ``operator``, ``up``,
``scale``, …) are registered by the server distributions in their ``pyproject.toml``::

    [project.entry-points."shardq.commands"]
    node = "shardq_node.cli:NODE"

so ``pip install shardq`` yields the command with the client sub-commands alone, and the
SDK never imports server code. ``SERVER_COMMANDS`` names which distribution brings which
server sub-command, so the command can say what to install when one is missing.

Must not: import a server package by name; an entry point is loaded only through
``importlib.metadata``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points

#: The entry-point group the server distributions register their sub-commands in.
GROUP = "shardq.commands"

#: Server sub-command -> the distribution that brings it, in the order ``--help`` lists them.
SERVER_COMMANDS: dict[str, str] = {
    "node": "shardq-node",
    "operator": "shardq-operator",
    "gateway": "shardq-gateway",
    "up": "shardq-operator",
    "scale": "shardq-operator",
    "topology": "shardq-operator",
    "failover": "shardq-operator",
    "controller": "shardq-operator",
    "rebalance": "shardq-operator",
}


@dataclass(frozen=True)
class SubCommand:
    """One ``shardq`` sub-command (what a ``shardq.commands`` entry point names)."""

    name: str
    help: str
    #: adds the sub-command's flags (and positional arguments) to its parser
    add_arguments: Callable[[argparse.ArgumentParser], None]
    #: runs it; the return value is the process's exit status
    run: Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Missing:
    """A server sub-command that cannot run here, and why."""

    name: str
    distribution: str
    #: None: the distribution is not installed; else why its entry point failed to load
    error: str | None = None

    def short(self) -> str:
        """What ``--help`` says next to its name."""
        if self.error is not None:
            return f"[{self.distribution} failed to load]"
        return f"[needs {self.distribution}, not installed]"

    def message(self) -> str:
        if self.error is not None:
            return (f"shardq {self.name}: its code in {self.distribution} failed to load "
                    f"({self.error})")
        return (f"shardq {self.name}: this sub-command comes with the {self.distribution} "
                f"distribution, which is not installed here (the shardq package alone is the "
                f"client). Install it (pip install {self.distribution}) or run the shardq "
                f"container image, which has every server.")


def discover() -> tuple[dict[str, SubCommand], dict[str, Missing]]:
    """The installed server sub-commands by name, and the known ones that cannot run here."""
    found: dict[str, SubCommand] = {}
    missing: dict[str, Missing] = {}
    for ep in entry_points(group=GROUP):
        distribution = ep.dist.name if ep.dist is not None else SERVER_COMMANDS.get(ep.name, "?")
        try:
            command = ep.load()
        except ImportError as exc:  # a dependency of that distribution is not installed
            missing[ep.name] = Missing(ep.name, distribution, f"{type(exc).__name__}: {exc}")
            continue
        if not isinstance(command, SubCommand) or command.name != ep.name:
            missing[ep.name] = Missing(ep.name, distribution,
                                       f"{ep.value} is not the SubCommand {ep.name!r}")
            continue
        found[ep.name] = command
    for name, distribution in SERVER_COMMANDS.items():
        if name not in found and name not in missing:
            missing[name] = Missing(name, distribution)
    return found, missing
