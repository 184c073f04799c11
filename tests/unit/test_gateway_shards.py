"""``GET /shards`` (gateway/shards.py): the topology's shards merged with each member's STATUS.

Only the merge is pure; tests/integration/test_dashboard.py runs the whole route against a
replicated local cluster.
"""

from __future__ import annotations

from typing import Any

from shardq.wire.slots import SLOTS
from shardq.wire.topology import NodeInfo, Shard, Topology
from shardq_gateway.shards import shard_rows


def topology() -> Topology:
    names = ["a", "b", "c", "d"]
    return Topology(
        epoch=7, nodes=[NodeInfo(n, f"10.0.0.1:{6800 + i}", f"10.0.0.1:{6900 + i}")
                        for i, n in enumerate(names)],
        owners=["s0"] * 1000 + ["s1"] * (SLOTS - 1000),
        shards={"s0": Shard(members=["a", "b", "c"], primary="a", term=3, learners=["d"]),
                "s1": Shard(members=["x"], primary="", term=2)})


def primary_status(**more: Any) -> dict[str, Any]:
    return {"ok": True, "role": "primary", "term": 3, "lsn": 120, "members_in_sync": 2,
            "quorum_lost_s": 0.0, "followers": [
                {"name": "b", "live": True, "acked": 120, "lag_records": 0, "lag_seconds": 0.0},
                {"name": "c", "live": False, "acked": 100, "lag_records": 20,
                 "lag_seconds": 4.5},
                {"name": "d", "live": False, "acked": 0, "lag_records": 120,
                 "lag_seconds": 1.25},
            ], **more}


def test_each_member_has_its_own_role_and_the_lag_its_primary_sees() -> None:
    rows = shard_rows(topology(), {
        "a": primary_status(),
        "b": {"ok": True, "role": "follower", "term": 3, "lsn": 120},
        "c": "cannot connect to 10.0.0.1:6802: refused",
        "d": {"ok": True, "role": "learner", "term": 3, "lsn": 0},
    })
    assert [r["name"] for r in rows] == ["s0", "s1"]
    s0 = rows[0]
    assert {k: s0[k] for k in ("term", "primary", "slots", "members", "members_in_sync",
                               "primary_answered", "quorum_lost_seconds")} == {
        "term": 3, "primary": "a", "slots": 1000, "members": 3, "members_in_sync": 2,
        "primary_answered": True, "quorum_lost_seconds": 0.0}
    by_name = {m["name"]: m for m in s0["nodes"]}
    assert list(by_name) == ["a", "b", "c", "d"]
    assert by_name["a"] == {"name": "a", "tcp": "10.0.0.1:6800", "http": "10.0.0.1:6900",
                            "voter": True, "role": "primary", "term": 3, "lsn": 120,
                            "error": None, "in_sync": True, "lag_records": 0,
                            "lag_seconds": 0.0}
    assert (by_name["b"]["role"], by_name["b"]["in_sync"], by_name["b"]["lag_records"]) \
        == ("follower", True, 0)
    c = by_name["c"]
    assert (c["role"], c["error"], c["in_sync"], c["lag_records"], c["lag_seconds"]) == (
        None, "cannot connect to 10.0.0.1:6802: refused", False, 20, 4.5)
    d = by_name["d"]
    assert (d["voter"], d["role"], d["in_sync"], d["lag_records"]) == (False, "learner", False,
                                                                        120)
    s1 = rows[1]
    assert (s1["slots"], s1["primary"], s1["members_in_sync"], s1["primary_answered"]) == (
        SLOTS - 1000, "", None, False)
    assert s1["nodes"][0]["error"] == "not asked: the topology has no address for it"


def test_lag_comes_only_from_the_primary_of_the_shards_term() -> None:
    # a deposed primary (an older term) may still report followers: its view is not used
    rows = shard_rows(topology(), {"a": primary_status(term=2), "b": "no answer within 1s"})
    s0 = rows[0]
    assert s0["primary_answered"] is False and s0["members_in_sync"] is None
    for member in s0["nodes"]:
        assert (member["in_sync"], member["lag_records"], member["lag_seconds"]) \
            == (None, None, None), member
    assert s0["nodes"][0]["role"] == "primary" and s0["nodes"][0]["term"] == 2


def test_a_member_the_primary_has_no_link_to_is_not_in_sync() -> None:
    status = primary_status(followers=[])
    rows = shard_rows(topology(), {"a": status, "b": {"ok": True, "role": "none", "term": 3}})
    b = rows[0]["nodes"][1]
    assert (b["role"], b["in_sync"], b["lag_records"]) == ("none", False, None)
