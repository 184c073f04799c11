"""The shared test helpers: eventually() and the skip-on-a-laptop, fail-in-CI check."""

from __future__ import annotations

import itertools

import pytest

from .. import helpers
from ..helpers import eventually, eventually_sync, needs_binary, require


async def test_eventually_returns_the_first_truthy_value_of_a_plain_or_async_predicate() -> None:
    counter = itertools.count()
    assert await eventually(lambda: max(0, next(counter) - 2), 5, 0) == 1

    async def answer() -> dict[str, int]:
        return {"n": 7}

    assert await eventually(answer, 5, 0) == {"n": 7}


async def test_eventually_fails_naming_what_it_awaited_and_the_last_value() -> None:
    with pytest.raises(AssertionError) as failed:
        await eventually(lambda: [], 0.05, 0.01, what="the queue to fill",
                         hint=lambda: "queue: q")
    text = str(failed.value)
    assert "waiting for the queue to fill" in text
    assert "last value seen: []" in text and text.endswith("queue: q")


async def test_eventually_names_a_lambda_by_its_source_and_counts_ignored_errors_as_not_yet(
) -> None:
    def flaky() -> int:
        raise ConnectionError("refused")

    with pytest.raises(AssertionError, match=r"ConnectionError\('refused'\)"):
        await eventually(flaky, 0.05, 0.01, ignore=(ConnectionError,))
    with pytest.raises(AssertionError, match="lambda: 1 > 2"):
        await eventually(lambda: 1 > 2, 0.05, 0.01)
    with pytest.raises(ValueError):  # an error not ignored is the test's error, at once
        await eventually(lambda: int("x"), 5, 0.01)


def test_eventually_sync_returns_the_value_or_fails_with_the_last_one() -> None:
    counter = itertools.count()
    assert eventually_sync(lambda: next(counter) >= 3, 5, 0) is True
    with pytest.raises(AssertionError, match="last value seen: 0"):
        eventually_sync(lambda: 0, 0.05, 0.01, what="zero to turn into something")


def test_require_skips_on_a_laptop_and_fails_in_ci_with_the_same_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require(True, "never shown")
    monkeypatch.setattr(helpers, "CI", False)
    with pytest.raises(pytest.skip.Exception, match="no tmpfs here"):
        require(False, "no tmpfs here")
    monkeypatch.setattr(helpers, "CI", True)
    with pytest.raises(pytest.fail.Exception, match="CI must run this test: no tmpfs here"):
        require(False, "no tmpfs here")
    with pytest.raises(pytest.fail.Exception, match="no-such-tool-here is not installed"):
        needs_binary("no-such-tool-here")
    assert needs_binary("no-such-tool-here", "sh").endswith("/sh")
