"""The pure parts of replication: where two logs agree, the commit rule, the store's CAS."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardq.wire.slots import SLOTS
from shardq.wire.topology import NodeInfo, Shard, Topology
from shardq_node.replication_wire import skip_frames
from shardq_node.shipping import common_point, term_at
from shardq_node.wal import frames, read_frames
from shardq_operator.controller import _choose
from shardq_operator.store import Conflict, FileStore, MemoryStore, update


def test_term_at_names_the_term_that_wrote_a_position() -> None:
    terms = [(1, 1), (3, 50), (4, 90)]
    assert term_at(terms, 10) == (1, 1)
    assert term_at(terms, 50) == (3, 50)
    assert term_at(terms, 89) == (3, 50)
    assert term_at(terms, 1000) == (4, 90)
    assert term_at([], 7) == (0, 1)


def test_logs_of_one_term_agree_up_to_the_shorter() -> None:
    assert common_point([(1, 1)], 100, [(1, 1)], 80) == 80
    assert common_point([(1, 1)], 30, [(1, 1)], 80) == 30


def test_a_deposed_primarys_tail_is_cut_where_the_new_term_began() -> None:
    # the old primary wrote 50..60 in term 1 that nobody got; the new one began term 2 at 50
    old = [(1, 1)]
    new = [(1, 1), (2, 50)]
    assert common_point(new, 70, old, 60) == 49
    assert common_point(old, 60, new, 70) == 49


def test_three_terms_of_divergence_find_the_last_shared_position() -> None:
    mine = [(1, 1), (2, 40), (5, 80)]
    theirs = [(1, 1), (2, 40), (3, 60)]
    assert common_point(mine, 100, theirs, 75) == 59
    assert common_point([(2, 1)], 10, [(1, 1)], 10) == 0


def test_skip_frames_drops_whole_records() -> None:
    data = frames([[1, 0, "a"], [2, 0, "b"], [3, 0, "c"]])
    rest = skip_frames(data, 2)
    assert [p for _, p in read_frames(rest)] == [b'[3,0,"c"]']


def test_the_election_takes_the_highest_term_then_position_and_honours_a_tie() -> None:
    votes = {"a": (2, 10), "b": (3, 5), "c": (3, 5)}
    assert _choose(votes, None) == "b"
    assert _choose(votes, "c") == "c"
    assert _choose(votes, "a") == "b"


def _topology() -> Topology:
    return Topology(epoch=1, nodes=[NodeInfo("a", "x:1")], owners=["s"] * SLOTS,
                    shards={"s": Shard(["a", "b", "c"], "a", 1)})


@pytest.mark.parametrize("kind", ["memory", "file"])
async def test_two_writers_racing_on_one_version_never_both_win(kind: str, tmp_path: Path
                                                                ) -> None:
    store = MemoryStore(_topology()) if kind == "memory" else FileStore(str(tmp_path / "t.json"))
    if kind == "file":
        await store.cas(0, _topology())
    version, topo = await store.read()
    assert topo is not None
    first, second = topo.copy(), topo.copy()
    first.shards["s"].primary = "b"
    second.shards["s"].primary = "c"
    await store.cas(version, first)
    with pytest.raises(Conflict):
        await store.cas(version, second)
    _, now = await store.read()
    assert now is not None and now.shards["s"].primary == "b"


async def test_update_redoes_a_change_on_the_winners_topology(tmp_path: Path) -> None:
    store = FileStore(str(tmp_path / "t.json"))
    await store.cas(0, _topology())
    calls = 0

    def bump(t: Topology) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:  # another coordinator writes between our read and our write
            other = t.copy()
            other.shards["s"].term = 7
            store._cas(store._read()[0], other.wire())
        t.shards["s"].learners.append("d")
        return True

    written = await update(store, bump)
    assert written is not None and calls == 2
    assert written.shards["s"].term == 7 and written.shards["s"].learners == ["d"]
