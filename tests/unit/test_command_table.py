"""The one command table (shardq.wire.commands) is what every part routes and checks by."""

from __future__ import annotations

import pytest

from shardq.wire import commands as C
from shardq.wire import protocol as P
from shardq_gateway.metrics import _KNOWN
from shardq_gateway.routes import ROUTES
from shardq_node import cluster, runtime
from shardq_node.commands import CLIENT, Commands


def test_every_command_has_one_row_and_every_part_derives_from_it() -> None:
    internal = {n for n, c in C.TABLE.items() if c.route is C.Route.INTERNAL}
    assert set(CLIENT) | internal == set(C.TABLE)
    assert set(ROUTES) == set(C.TABLE) - internal  # the gateway routes every client command
    assert set(C.TABLE) == _KNOWN  # and labels its metrics by them
    assert internal == cluster.INTERNAL
    assert {n for n, c in C.TABLE.items() if not c.writes} == runtime.READ_ONLY
    for name in C.QUEUE_ROUTED | C.ID_ROUTED | C.IDS_ROUTED:
        assert C.TABLE[name].route in (C.Route.QUEUE, C.Route.ID, C.Route.IDS)
    for name in CLIENT:
        assert callable(getattr(Commands, name.lower()))


def test_the_protocols_commands_are_the_public_rows() -> None:
    assert C.COMMANDS[:4] == ("PUSH", "PUSHB", "PULL", "PULLB")
    assert "RELEASE" not in C.COMMANDS and "FENCE" not in C.COMMANDS
    assert {"GETJOB", "TOUCH", "TOPOLOGY", "AUTH"} <= set(C.COMMANDS)


@pytest.mark.parametrize(("cmd", "req", "error"), [
    ("PUSH", {}, "Invalid: missing field 'queue'"),
    ("ACK", {"id": "5"}, "Invalid: field 'id'"),
    ("ACKB", {"ids": 3}, "Invalid: field 'ids'"),
    ("CRON", {"queue": "q"}, "Invalid: missing field 'name'"),
])
def test_a_rows_validator_refuses_what_cannot_be_routed(cmd: str, req: P.Request,
                                                        error: str) -> None:
    with pytest.raises(P.InvalidRequest) as refused:
        C.TABLE[cmd].validate({"cmd": cmd, **req})
    assert str(refused.value).startswith(error)


def test_only_the_replication_commands_and_local_reads_are_answered_by_a_follower() -> None:
    assert {"AUTH", "TOPOLOGY", "STATS", "METRICS", "LISTQUEUES",
                             "SETTOPOLOGY", "STATUS", "FENCE", "FOLLOW", "HANDOFF"} == C.FOLLOWER_OK
    assert not C.FOLLOWER_OK & {n for n, c in C.TABLE.items() if c.writes}
