"""``--server`` as a list of edges: parsing, validation, the plaintext rule per entry, and the
``AgentConfig`` that ``tunnel-agent run`` builds from it (no network: the failover itself is in
tests/faults/test_agent_failover.py)."""

from __future__ import annotations

import argparse
import ssl

import pytest

from agent.cli import ServerEntry, agent_config, main, parse_servers, plaintext_refusal
from agent.core import AgentConfig, EdgeAddress


@pytest.fixture
def started(
    fake_core: list[argparse.Namespace], monkeypatch: pytest.MonkeyPatch
) -> list[argparse.Namespace]:
    """The arguments ``run`` would start the agent with (it is not started)."""
    monkeypatch.setenv("TUNNEL_AGENT_TOKEN", "t0ken")
    monkeypatch.delenv("TUNNEL_AGENT_SERVER", raising=False)
    return fake_core


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["run", "--sandbox-id", "sb1", *argv])
    return code, capsys.readouterr().err


# -- parsing -----------------------------------------------------------------------------------


def test_one_address_parses_as_before() -> None:
    assert parse_servers("edge.example.com:7000") == [
        ServerEntry("edge.example.com:7000", "", "edge.example.com", 7000)
    ]
    assert parse_servers("ws://127.0.0.1:7000/") == [
        ServerEntry("ws://127.0.0.1:7000/", "ws", "127.0.0.1", 7000)
    ]
    assert parse_servers("[::1]:7000")[0].host == "::1"


def test_a_list_keeps_its_order_schemes_and_spaces() -> None:
    entries = parse_servers("b.example:7000, wss://a.example:443 ,[2001:db8::1]:7001")
    assert [(e.scheme, e.host, e.port) for e in entries] == [
        ("", "b.example", 7000),
        ("wss", "a.example", 443),
        ("", "2001:db8::1", 7001),
    ]
    assert [e.text for e in entries] == [
        "b.example:7000",
        "wss://a.example:443",
        "[2001:db8::1]:7001",
    ]


@pytest.mark.parametrize(
    ("server", "named"),
    [
        ("a:7000,,b:7000", "empty entry (entry 2 of 3)"),
        ("a:7000,", "empty entry (entry 2 of 2)"),
        ("a:7000,b:70000", "'b:70000' (entry 2 of 2)"),
        ("a:7000,b", "'b' (entry 2 of 2)"),
        ("a:7000,ftp://b:7000", "'ftp://b:7000' (unknown scheme ftp://) (entry 2 of 2)"),
        ("a:7000,b:7000/v1", "'b:7000/v1'"),
        ("a:7000,bad host:7000", "'bad host:7000' (not a host name)"),
        ("[zz]:7000,a:7000", "'[zz]:7000' (not an IPv6 address) (entry 1 of 2)"),
        ("a:7000,b:7000,A:7000", "'A:7000' is listed twice"),
        ("a:0", "'a:0'"),
    ],
)
def test_every_entry_is_validated_and_the_bad_one_named(
    started: list[argparse.Namespace],
    capsys: pytest.CaptureFixture[str],
    server: str,
    named: str,
) -> None:
    code, err = run(capsys, "--server", server)
    assert code == 2
    assert "argument --server: expected HOST:PORT" in err or "listed twice" in err
    assert named in err, err
    assert started == []


def test_a_bad_list_in_the_environment_is_a_usage_error(
    started: list[argparse.Namespace],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TUNNEL_AGENT_SERVER", "127.0.0.1:7000,127.0.0.1:nope")
    code, err = run(capsys)
    assert code == 2
    assert "'127.0.0.1:nope' (entry 2 of 2)" in err
    assert started == []


def test_a_list_from_the_environment(
    started: list[argparse.Namespace], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNNEL_AGENT_SERVER", "127.0.0.1:7000,localhost:7001")
    assert main(["run", "--sandbox-id", "sb1"]) == 0
    (args,) = started
    config = agent_config(args)
    assert config.servers == (
        EdgeAddress("127.0.0.1", 7000),
        EdgeAddress("localhost", 7001),
    )


# -- the plaintext rule, per entry ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("server", "refused"),
    [
        ("127.0.0.1:7000,10.1.2.3:7000", "10.1.2.3:7000"),
        ("ws://edge.example.com:7000,127.0.0.1:7000", "ws://edge.example.com:7000"),
        ("127.0.0.1:7000,wss://10.1.2.3:7000", None),
        ("localhost:7000,[::1]:7001,ws://127.0.0.2:7002", None),
    ],
)
def test_plaintext_off_loopback_is_refused_for_each_entry(server: str, refused: str | None) -> None:
    refusal = plaintext_refusal(server, tls=False, insecure=False)
    if refused is None:
        assert refusal is None
    else:
        assert refusal is not None and refusal.startswith(f"--server {refused} is not a loopback")
    assert plaintext_refusal(server, tls=True, insecure=False) is None
    assert plaintext_refusal(server, tls=False, insecure=True) is None


def test_the_cli_names_the_plaintext_entry_and_does_not_start(
    started: list[argparse.Namespace], capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run(capsys, "--server", "127.0.0.1:7000,10.9.9.9:7000")
    assert code == 2
    assert "--server 10.9.9.9:7000 is not a loopback address" in err
    assert "--insecure-plaintext" in err
    assert started == []
    assert run(capsys, "--server", "127.0.0.1:7000,10.9.9.9:7000", "--insecure-plaintext")[0] == 0


# -- the AgentConfig run builds ------------------------------------------------------------------


def test_one_address_builds_the_same_config_as_before(started: list[argparse.Namespace]) -> None:
    assert main(["run", "--sandbox-id", "sb1", "--server", "127.0.0.1:7000"]) == 0
    config = agent_config(started[0])
    assert (config.server_host, config.server_port, config.tls, config.websocket) == (
        "127.0.0.1",
        7000,
        None,
        False,
    )
    assert config.servers == (EdgeAddress("127.0.0.1", 7000),)
    assert (config.sandbox_id, config.token) == ("sb1", "t0ken")


def test_with_tls_each_edge_is_checked_against_its_own_host(
    started: list[argparse.Namespace],
) -> None:
    server = "a.example.com:7000,b.example.com:7000"
    assert main(["run", "--sandbox-id", "sb1", "--tls", "--server", server]) == 0
    config = agent_config(started[-1])
    assert isinstance(config.tls, ssl.SSLContext)
    assert [config.tls_server_name(edge) for edge in config.servers] == [
        "a.example.com",
        "b.example.com",
    ]
    flags = ["--tls-server-name", "edge.internal"]
    assert main(["run", "--sandbox-id", "sb1", *flags, "--server", server]) == 0
    config = agent_config(started[-1])
    assert [config.tls_server_name(edge) for edge in config.servers] == ["edge.internal"] * 2


def test_schemes_apply_per_entry(started: list[argparse.Namespace]) -> None:
    server = "127.0.0.1:7000,wss://edge.example.com:443,ws://[::1]:7001"
    assert main(["run", "--sandbox-id", "sb1", "--server", server]) == 0
    config = agent_config(started[0])
    assert config.servers == (
        EdgeAddress("127.0.0.1", 7000, tls=False, websocket=False),
        EdgeAddress("edge.example.com", 443, tls=True, websocket=True),
        EdgeAddress("::1", 7001, tls=False, websocket=True),
    )
    assert isinstance(config.tls, ssl.SSLContext)  # for the wss:// entry only
    assert [config.tls_server_name(edge) for edge in config.servers] == [
        None,
        "edge.example.com",
        None,
    ]
    assert [str(edge) for edge in config.servers] == [
        "127.0.0.1:7000",
        "edge.example.com:443",
        "[::1]:7001",
    ]


def test_agent_config_without_a_list_has_one_edge() -> None:
    config = AgentConfig("127.0.0.1", 7000, "sb1", "t", websocket=True)
    assert config.servers == (EdgeAddress("127.0.0.1", 7000, tls=False, websocket=True),)
    with pytest.raises(ValueError, match="SSLContext"):
        AgentConfig("h", 1, "sb1", "t", servers=(EdgeAddress("h", 1, tls=True),))


def test_run_help_explains_the_list_and_the_failover_order(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["run", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "HOST:PORT[,HOST:PORT...]" in out
    assert "comma-separated list" in out
    assert "last worked" in out
    assert "tries the next address at once" in out
    assert "every address failed in a row" in out
    assert "GO_AWAY SHUTTING_DOWN" in out
    assert "--tls-server-name" in out
