"""Wait for a state by polling it, bounded in time (the fault tier's local ``eventually``).

``tests/helpers.py`` has no ``eventually()`` on this branch (another branch adds a shared
one); when both are on main, this one can give way to it.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")


@overload
async def eventually(check: Callable[[], Awaitable[T]], *, timeout: float, what: str,
                     interval: float = ...) -> T: ...


@overload
async def eventually(check: Callable[[], T], *, timeout: float, what: str,
                     interval: float = ...) -> T: ...


async def eventually(
    check: Callable[[], Any],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
) -> Any:
    """Call ``check`` (plain or async) until it returns something truthy, and return that.

    An exception from ``check`` counts as "not yet" and is shown if time runs out.
    Raises ``TimeoutError`` naming ``what`` and the last value or exception seen.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: object = None
    while True:
        try:
            value = check()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            last = value
        except Exception as exc:  # "not yet"; reported if time runs out
            last = exc
        if loop.time() >= deadline:
            raise TimeoutError(f"{what}: not reached within {timeout:g} s (last: {last!r})")
        await asyncio.sleep(interval)
