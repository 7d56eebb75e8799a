"""Claims of docs/agent.md that no other test checked: ``run``'s required settings, the CLI's
timeouts and exit codes, and the local API's error table and limits as the doc states them."""

from __future__ import annotations

import argparse
import re
import socket
from pathlib import Path

import pytest

from agent import cli, local_api
from agent.cli import main
from agent.errors import DEFAULT_STATUS, STATUS_BY_CODE, status_for
from agent.local_api import LocalAPI
from protocol import hostnames

from .test_local_api import FakeController

# run in an environment without TUNNEL_AGENT_* (tests/agent/conftest.py)
pytestmark = pytest.mark.usefixtures("clean_agent_env")

DOC = Path(__file__).resolve().parents[2] / "docs" / "agent.md"


# -- run: required settings --------------------------------------------------------------------


def test_run_without_a_sandbox_id_is_a_usage_error(
    fake_core: list[argparse.Namespace],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without an id the agent used to start and retry forever with ``sandbox_id=None``."""
    monkeypatch.setenv("TUNNEL_AGENT_TOKEN", "t")
    assert main(["run", "--server", "127.0.0.1:7000"]) == 2
    err = capsys.readouterr().err
    assert "usage: tunnel-agent" in err
    assert "--sandbox-id ID is required (or set TUNNEL_AGENT_SANDBOX_ID)" in err
    assert fake_core == []
    monkeypatch.setenv("TUNNEL_AGENT_SANDBOX_ID", "sb1")  # the env variable is enough
    assert main(["run", "--server", "127.0.0.1:7000"]) == 0
    assert fake_core[0].sandbox_id == "sb1"


def test_a_bad_log_level_in_the_environment_is_a_usage_error(
    fake_core: list[argparse.Namespace],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--log-level`` takes debug/info/warning/error, from the flag or TUNNEL_AGENT_LOG_LEVEL;
    argparse checks choices on the command line only, so a bad variable was silently 'info'."""
    monkeypatch.setenv("TUNNEL_AGENT_TOKEN", "t")
    argv = ["run", "--server", "127.0.0.1:7000", "--sandbox-id", "sb1"]
    monkeypatch.setenv("TUNNEL_AGENT_LOG_LEVEL", "verbose")
    assert main(argv) == 2
    assert "TUNNEL_AGENT_LOG_LEVEL: expected one of debug, info, warning, error, got 'verbose'" in (
        capsys.readouterr().err
    )
    assert fake_core == []
    monkeypatch.setenv("TUNNEL_AGENT_LOG_LEVEL", "WARNING")  # case does not matter
    assert main(argv) == 0
    assert fake_core[0].log_level == "warning"
    assert main([*argv, "--log-level", "verbose"]) == 2  # the flag: argparse's own check


def test_abbreviated_options_are_refused(
    fake_core: list[argparse.Namespace],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """'abbreviated options are off, so --token can never be taken as --token-file'."""
    monkeypatch.setenv("TUNNEL_AGENT_TOKEN", "t")
    assert main(["run", "--serv", "127.0.0.1:7000", "--sandbox-id", "sb1"]) == 2
    assert main(["run", "--server", "127.0.0.1:7000", "--sandbox-id", "sb1", "--token-f", "x"]) == 2
    assert "unrecognized arguments: --token-f" in capsys.readouterr().err
    assert fake_core == []


# -- client commands: timeouts and exit codes ---------------------------------------------------


def test_client_commands_use_a_10_s_timeout_and_wait_its_timeout_plus_10(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[float] = []

    class Recording(cli.AgentClient):
        def __init__(self, base_url: str, timeout: float) -> None:
            seen.append(timeout)
            raise ValueError("stop here")  # parser.error: exit 2, no request made

    monkeypatch.setattr(cli, "AgentClient", Recording)
    assert main(["status"]) == 2
    assert main(["wait", "8000", "--timeout", "42"]) == 2
    assert seen == [10.0, 52.0]


def test_a_request_without_an_answer_exits_1_with_agent_timeout(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """'A request that connects but gets no answer within 10 s exits 1 with code AGENT_TIMEOUT'
    (the 10 s shortened here)."""

    class Quick(cli.AgentClient):
        def __init__(self, base_url: str, timeout: float) -> None:
            super().__init__(base_url, 0.3)

    monkeypatch.setattr(cli, "AgentClient", Quick)
    with socket.socket() as listener:  # accepts (the kernel does), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        assert main(["status", "--api", url]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"error: the tunnel agent at {url} did not answer within 0.3 s (AGENT_TIMEOUT)\n"


def test_a_connect_nothing_answers_exits_3_unreachable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """'3: nothing answers at the API address', a black-holed one too: the connect times out
    (its SYN dropped: a listener with a full accept queue), which is not a stuck agent."""

    class Quick(cli.AgentClient):
        def __init__(self, base_url: str, timeout: float) -> None:
            super().__init__(base_url, 0.3)

    monkeypatch.setattr(cli, "AgentClient", Quick)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        fillers = []
        try:
            for _ in range(8):  # fill the accept queue: later SYNs are dropped, unanswered
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(address)
                fillers.append(filler)
            url = f"http://127.0.0.1:{address[1]}"
            assert main(["status", "--api", url]) == 3
        finally:
            for filler in fillers:
                filler.close()
    out, err = capsys.readouterr()
    assert out == "" and "cannot reach the tunnel agent at" in err and url in err


# -- the local API's error table -----------------------------------------------------------------


def _doc_error_table() -> dict[str, int]:
    """``| `CODE`[, `CODE`] | STATUS | When |`` rows of 'Local HTTP API', plus 'anything else'."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Local HTTP API", 1)[1].split("### Waiting for a port", 1)[0]
    table: dict[str, int] = {}
    for line in section.splitlines():
        match = re.fullmatch(r"\| ((?:`[A-Z_]+`(?:, )?)+|anything else) \| (\d{3}) \|.*", line)
        if match:
            for code in re.findall(r"`([A-Z_]+)`", match.group(1)) or ["*"]:
                table[code] = int(match.group(2))
    return table


def test_the_documented_error_table_is_agent_errors_status_table() -> None:
    """docs/agent.md: 'The status table lives in agent/errors.py (status_for(code))'."""
    doc = _doc_error_table()
    assert doc.pop("*") == DEFAULT_STATUS == status_for("SOMETHING_THE_EDGE_SAID") == 502
    # INVALID_OPTION is refused by the shared validator before the core is called
    assert doc.pop("INVALID_OPTION") == hostnames.InvalidOptionError.status == 400
    table = dict(STATUS_BY_CODE)
    # only the code of the agent's reply to the edge's watch_port, never a local API answer
    assert table.pop("PORT_NOT_READY") == 504
    assert doc == table


def test_the_local_apis_documented_limits_are_its_defaults() -> None:
    """'Head ≤ 16 KiB, body ≤ 64 KiB, the whole request within 10 s of its first byte (an idle
    keep-alive connection is simply closed after 10 s), at most 64 connections'."""
    api = LocalAPI(FakeController(), port=0)
    limits = api.http.limits
    assert (limits.max_head_bytes, limits.max_body_bytes) == (16 * 1024, 64 * 1024)
    assert (limits.request_timeout, limits.idle_timeout) == (10.0, 10.0)
    assert limits.max_connections == local_api.MAX_CONNECTIONS == 64
    assert limits.linger_seconds == 1.0  # 'drains for up to 1 s'
    assert (local_api.DEFAULT_HOST, local_api.DEFAULT_PORT) == ("127.0.0.1", 3000)
