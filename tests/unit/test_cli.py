"""The ``shardq`` command (DESIGN §8): the server sub-commands come from the
``shardq.commands`` entry points of the installed server distributions, the flags are
environment variables too, and a sub-command whose distribution is missing says what to
install. In the workspace every distribution is installed."""

from __future__ import annotations

import pytest

from shardq.cli import build_parser, main
from shardq.cli.subcommands import SERVER_COMMANDS, Missing, discover


def test_every_server_sub_command_is_registered_by_its_distribution() -> None:
    found, missing = discover()
    assert missing == {}
    assert set(found) == set(SERVER_COMMANDS)


def test_help_lists_the_contracts_sub_commands_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert ("{node,operator,gateway,up,scale,topology,failover,controller,rebalance,"
            "push,pull,stats,queues,cron,queue}") in out
    assert "not installed" not in out


def test_the_contracts_flags_parse_and_read_their_environment_variables(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDQ_PORT", "7000")
    monkeypatch.setenv("SHARDQ_FSYNC", "everysec")
    parser = build_parser()
    node = parser.parse_args(["node", "--host", "0.0.0.0", "--http-port", "0", "--data-dir",
                              "d", "--token", "t", "--cluster-token", "c", "--name", "n"])
    assert (node.port, node.fsync, node.host, node.data_dir, node.name) == (
        7000, "everysec", "0.0.0.0", "d", "n")
    gateway = parser.parse_args(["gateway", "--port", "1", "--seed", "a:1,b:2"])
    assert (gateway.port, gateway.seed) == (1, "a:1,b:2")
    up = parser.parse_args(["up", "--nodes", "2", "--replicas", "3"])
    assert (up.nodes, up.replicas, up.port, up.fsync) == (2, 3, 7000, "everysec")
    failover = parser.parse_args(["failover", "shard-1", "--to", "m"])
    assert (failover.shard, failover.to) == ("shard-1", "m")
    push = parser.parse_args(["push", "q", "{}", "--priority", "5"])
    assert (push.queue, push.priority, push.address) == ("q", 5, "127.0.0.1:6789")


def test_a_missing_server_distribution_is_named_in_help_and_when_run(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    found, _ = discover()
    without_node = {name: c for name, c in found.items() if name != "node"}
    lacking = {"node": Missing("node", "shardq-node")}
    monkeypatch.setattr("shardq.cli.discover", lambda: (without_node, lacking))

    assert main(["node", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "shardq node: this sub-command comes with the shardq-node distribution" in err
    assert "pip install shardq-node" in err
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "node                [needs shardq-node, not installed]" in out
    assert "  node: pip install shardq-node" in out
