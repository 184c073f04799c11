"""The mechanisms the servers and the client share: the token check (shardq_server.auth), the
MOVED/TRYAGAIN retry policy (shardq.wire.retry) and the slot cache (shardq.wire.slots)."""

from __future__ import annotations

import pytest

from shardq.errors import InvalidRequest, InvalidToken, Moved, TryAgain
from shardq.wire.protocol import error_answer
from shardq.wire.retry import FIRST_DELAY, GROWTH, MAX_DELAY, MOVED, TRYAGAIN, Retry, kind_of
from shardq.wire.retry import refusal as refused
from shardq.wire.slots import SlotCache, slot_of
from shardq_server.auth import Auth, Tokens


def test_a_token_matches_any_configured_one_and_nothing_else() -> None:
    tokens = Tokens(["alpha", "beta"])
    assert tokens.match("alpha") and tokens.match("beta")
    assert not tokens.match("alph") and not tokens.match("") and not tokens.match(None)
    assert not tokens.match(b"alpha") and not Tokens([]).match("alpha")


def test_auth_tells_the_cluster_token_from_a_client_token_and_refuses_the_rest() -> None:
    auth = Auth(("client",), "cluster")
    assert auth.required and not auth.open
    assert auth.check("cluster") is True
    assert auth.check("client") is False
    with pytest.raises(InvalidToken):
        auth.check("neither")
    with pytest.raises(InvalidToken):
        auth.check(7)
    with pytest.raises(InvalidRequest, match="missing field 'token'"):
        auth.check(None)


def test_without_client_tokens_any_token_is_a_client_token_and_none_is_needed() -> None:
    assert Auth().open and not Auth().required and Auth().check("anything") is False
    cluster_only = Auth((), "cluster")
    assert not cluster_only.required and not cluster_only.open
    assert cluster_only.check("cluster") is True and cluster_only.check("other") is False


def test_refusals_read_from_answer_lines_as_a_node_writes_them() -> None:
    assert refused(error_answer(Moved(12).text, 5)) == (MOVED, 12)
    assert refused(error_answer(Moved(12, "node-1").text)) == (TRYAGAIN, 0)
    assert refused(error_answer(TryAgain().text)) == (TRYAGAIN, 0)
    assert refused(error_answer("Invalid: nope")) is None
    assert refused(b'{"ok":true,"id":1}') is None
    assert kind_of(Moved(3)) == MOVED and kind_of(Moved(3, "")) == TRYAGAIN
    assert kind_of(TryAgain()) == TRYAGAIN


def test_pauses_grow_to_their_ceiling_and_moved_first_rereads_at_once() -> None:
    retry = Retry(budget=60.0)
    assert retry.moved_pause() == 0.0  # the topology is read again at once
    pauses = [retry.moved_pause() or 0.0 for _ in range(12)]
    assert pauses[0] == pytest.approx(FIRST_DELAY * GROWTH)
    assert pauses == sorted(pauses)
    assert pauses[-1] == MAX_DELAY
    retry.restart()
    assert retry.first and retry.pause() == FIRST_DELAY and not retry.first


def test_a_spent_budget_gives_no_more_pauses() -> None:
    retry = Retry(budget=-1.0)
    assert retry.spent()
    assert retry.pause() is None and retry.moved_pause() is None


def test_the_slot_cache_agrees_with_slot_of_and_starts_over_past_its_size() -> None:
    cache = SlotCache(size=3)
    names = [f"q{i}" for i in range(10)]
    assert [cache.slot_of(n) for n in names] == [slot_of(n) for n in names]
    assert len(cache.known) <= 4
