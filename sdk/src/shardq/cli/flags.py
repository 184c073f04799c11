"""The ``shardq`` command's flag convention (DESIGN §8), for every sub-command's parser.

Every flag is also an environment variable: ``--data-dir`` is ``SHARDQ_DATA_DIR``,
``--port`` is ``SHARDQ_PORT``, and so on; a flag given on the command line wins. The
server distributions build their sub-commands' flags with ``flag`` too, so the rule holds
for every sub-command. Must not: import anything beyond the standard library.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any


def env_name(flag_name: str) -> str:
    """``--data-dir`` -> ``SHARDQ_DATA_DIR``."""
    return "SHARDQ_" + flag_name.lstrip("-").replace("-", "_").upper()


def flag(
    parser: argparse.ArgumentParser,
    name: str,
    default: Any = None,
    type: Callable[[str], Any] = str,
    help: str = "",
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> None:
    """Add ``--name`` whose default comes from ``SHARDQ_NAME`` when that is set."""
    environ = os.environ if env is None else env
    variable = env_name(name)
    if variable in environ:
        default = type(environ[variable])
    parser.add_argument(name, default=default, type=type,
                        help=f"{help} [env {variable}]".strip(), **kwargs)


def tokens(value: str) -> tuple[str, ...]:
    """A comma-separated list of tokens (``--token a,b``), empty items dropped."""
    return tuple(t for t in value.split(",") if t)


def boolean(value: str) -> bool:
    """A flag's or variable's yes/no: 1, true, yes (any case) are yes."""
    return value.lower() in ("1", "true", "yes")
