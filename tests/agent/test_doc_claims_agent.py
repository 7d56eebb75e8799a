"""Claims of docs/agent.md that no other test checked: ``run``'s required settings, the CLI's
timeouts and exit codes, and the local API's error table and limits as the doc states them."""

from __future__ import annotations

import argparse
import re
import socket
from collections.abc import Callable
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


# -- the numbers and tables of 'Running it', 'CLI' and 'Waiting for a port' ---------------------


def _flat(text: str) -> str:
    return " ".join(text.split())


def _run_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            run: argparse.ArgumentParser = action.choices["run"]
            return run
    raise AssertionError("no subcommands")


def _flag_rows() -> list[tuple[list[str], str, str]]:
    """``| `--flag ARG`[, `--other`] | `ENV` | default | ... |`` rows of 'Running it'."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Running it", 1)[1].split("\n\n", 2)[2]
    out = []
    for line in section.splitlines():
        if not line.startswith("| `--"):
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        out.append((re.findall(r"`(--[a-z-]+)", cells[0]), cells[1].strip("`"), cells[2]))
    return out


def test_the_run_flag_table_is_runs_parser(
    fake_core: list[argparse.Namespace], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every flag of the table is one of ``run``'s, its default column is the parser's default
    (with no variable set), and every variable of the Env column sets what its flag sets."""
    rows = _flag_rows()
    assert len(rows) >= 9  # the scan sees the table at all
    run = _run_parser()
    options = {opt: a for a in run._actions for opt in a.option_strings}
    documented = set()
    # a value for each flag's destination, and how run's result shows it
    values = {
        "server": "127.0.0.1:7000",
        "sandbox_id": "sb-from-env",
        "token_file": "token-from-env",
        "proxy": "http://127.0.0.1:3128",
        "log_level": "warning",
    }
    seen: dict[str, Callable[[argparse.Namespace], object]] = {
        "server": lambda a: a.server,
        "sandbox_id": lambda a: a.sandbox_id,
        "token_file": lambda a: a.token,
        "proxy": lambda a: f"http://{cli.proxy_choices(a)[0].proxy}",
        "log_level": lambda a: a.log_level,
    }
    envs = {}
    for flags, env, default in rows:
        for flag in flags:
            assert flag in options, flag
            documented.add(flag)
        action = options[flags[0]]
        if default == "(required)":
            assert action.default is None, flags
        elif default == "off":
            assert action.default in (False, None), flags
        elif default.startswith("`") and default.count("`") == 2:
            assert str(action.default) == default.strip("`"), flags
        if env:
            assert env in vars(cli).values(), env  # one of cli's ENV_* names
            envs[env] = action.dest
    assert set(envs.values()) == set(values)
    for env, dest in envs.items():
        monkeypatch.setenv(env, values[dest])
    assert main(["run"]) == 0
    for dest, shown in seen.items():
        assert shown(fake_core[0]) == values[dest], dest
    # every option of run that takes part in the user's setup is in the table
    hidden = {"-h", "--help", "--token"}  # --token exists only to be refused
    assert set(options) - hidden == documented


def test_the_reconnect_numbers_are_the_cores() -> None:
    from agent import core

    text = _flat(DOC.read_text(encoding="utf-8"))
    match = re.search(r"first after ~([0-9.]+) s, doubling with jitter up to (\d+) s", text)
    timeout = re.search(r"bounded by a (\d+) s connect timeout", text)
    failover = re.search(r"bounded by the (\d+) s connect timeout", text)
    assert match and timeout and failover
    assert float(match.group(1)) == core.BACKOFF_FIRST
    assert float(match.group(2)) == core.BACKOFF_CAP
    assert float(timeout.group(1)) == float(failover.group(1)) == core.CONNECT_TIMEOUT
    config = core.AgentConfig("127.0.0.1", 7000, "sb1", "t")
    assert config.connect_timeout == core.CONNECT_TIMEOUT
    replaced = re.search(r"`GO_AWAY REPLACED`\) it waits (\d+)\u2013(\d+) s", text)
    assert replaced and float(replaced.group(2)) == 2 * core.BACKOFF_CAP  # the wait's cap


def test_the_wait_defaults_and_limits_are_the_clis_and_the_agents(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from agent import portwatch

    text = _flat(DOC.read_text(encoding="utf-8"))
    match = re.search(
        r"`--timeout` defaults to (\d+) s \(at most (\d+)\), `--interval` to ([0-9.]+) s", text
    )
    status = re.search(r"one code or a range, default `(\d+)-(\d+)`", text)
    assert match and status
    timeout, most, interval = float(match.group(1)), float(match.group(2)), float(match.group(3))
    args = cli.build_parser().parse_args(["wait", "8000"])
    assert (args.timeout, args.interval) == (timeout, interval)
    assert most == cli.WAIT_MAX_SECONDS == portwatch.MAX_WATCH_SECONDS
    assert cli.build_parser().parse_args(["wait", "8000", "--timeout", str(most)]).timeout == most
    assert main(["wait", "8000", "--timeout", str(most + 0.5)]) == 2
    assert "expected seconds in (0, 300]" in capsys.readouterr().err
    # without --status the CLI sends none: the agent's default range applies
    low, high = int(status.group(1)), int(status.group(2))
    assert (low, high) == (portwatch.DEFAULT_STATUS_MIN, portwatch.DEFAULT_STATUS_MAX)


def test_the_port_watch_table_is_the_agents() -> None:
    """'Waiting for a port': the field table's defaults and bounds, the 5 s probe timeout and
    the 64 watches, as agent/portwatch.py has them."""
    from agent import portwatch

    text = DOC.read_text(encoding="utf-8")
    section = text.split("### Waiting for a port", 1)[1].split("### Cloudflare legacy", 1)[0]
    fields = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 3:
            fields[cells[0]] = (cells[1], cells[2])
    interval = re.search(r"clamped to (\d+)-([\d,]+)", fields["`interval`"][1])
    assert interval
    assert int(fields["`interval`"][0]) == portwatch.DEFAULT_INTERVAL_MS
    assert int(interval.group(1)) == portwatch.MIN_INTERVAL_MS
    assert int(interval.group(2).replace(",", "")) == portwatch.MAX_INTERVAL_MS
    most = re.search(r"at most ([\d,]+)", fields["`timeout`"][1])
    assert most
    default_ms = int(fields["`timeout`"][0].replace(",", ""))
    assert default_ms == int(most.group(1).replace(",", "")) == portwatch.MAX_WATCH_SECONDS * 1000
    assert fields["`statusMin`, `statusMax`"][0] == (
        f"{portwatch.DEFAULT_STATUS_MIN}, {portwatch.DEFAULT_STATUS_MAX}"
    )
    assert fields["`mode`"][0] == f'`"{portwatch.MODES[0]}"`'
    spec = portwatch.spec_from_json({"port": 8000})
    assert (
        spec.timeout * 1000 == default_ms and spec.interval * 1000 == portwatch.DEFAULT_INTERVAL_MS
    )
    flat = _flat(section)
    probe = re.search(r"with a (\d+) s timeout \(Cloudflare's\)", flat)
    watches = re.search(r"at most (\d+) watches run at once per agent", flat)
    assert probe and watches
    assert float(probe.group(1)) == portwatch.PROBE_TIMEOUT
    assert int(watches.group(1)) == portwatch.MAX_WATCHES == portwatch.PortWatches().limit
    assert f"TOO_MANY_WATCHES` | 429 | {watches.group(1)}" in text  # the error table agrees


def test_refused_stream_warnings_are_a_burst_then_one_a_second(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """'What the agent dials': refusals are logged 'a burst of 10, then one a second, the
    others counted in one line', through the agent's own limiter."""
    import logging

    from agent.core import Agent, AgentConfig

    text = _flat(DOC.read_text(encoding="utf-8"))
    match = re.search(r"a burst of (\d+), then one a second", text)
    assert match
    burst = int(match.group(1))
    agent = Agent(AgentConfig("127.0.0.1", 7000, "sb1", "t"))
    caplog.set_level(logging.WARNING, logger="tunnel.agent")
    for n in range(burst + 5):
        agent.refused_streams.log(0.0, "refused %d", n)
    agent.refused_streams.log(1.0, "refused %s", "after a second")
    got = [r.getMessage() for r in caplog.records if r.name == "tunnel.agent"]
    assert got[:burst] == [f"refused {n}" for n in range(burst)]
    assert got[burst].startswith("too many warnings about streams to ports the agent refuses")
    assert got[burst + 1 :] == [
        "5 more warnings about streams to ports the agent refuses were not logged",
        "refused after a second",
    ]


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    """The local API runs on asyncio's loop or uvloop (as test_local_api.py)."""
    return request.param


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["X_Forwarded_For", "x-forwarded_host", "FORWARDED"])
async def test_forwarded_headers_spelt_with_underscores_are_refused_too(name: str) -> None:
    """Security: 'any request carrying `X-Forwarded-*` or `Forwarded` (also spelt with `_`)' is
    refused with 403 FORBIDDEN: WSGI/CGI stacks read X_Forwarded_For as X-Forwarded-For."""
    from .test_local_api import raw_exchange

    assert "(also spelt with `_`)" in DOC.read_text(encoding="utf-8")
    controller = FakeController()
    async with LocalAPI(controller, port=0) as api:
        request = (
            b"GET /v1/status HTTP/1.1\r\nhost: localhost\r\n"
            + name.encode()
            + b": 203.0.113.9\r\nconnection: close\r\n\r\n"
        )
        answer = await raw_exchange(api.port, request)
        plain = await raw_exchange(
            api.port, b"GET /v1/status HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n"
        )
    assert answer.startswith(b"HTTP/1.1 403 "), answer
    assert b'"code":"FORBIDDEN"' in answer
    assert plain.startswith(b"HTTP/1.1 200 "), plain  # the same request without it is served


def test_the_client_command_synopses_list_every_option() -> None:
    """CLI: '`expose PORT [--name N] ...`, `unexpose PORT`, ...': each command's options, as
    its parser has them (``--api`` and ``--help`` are every command's, described apart)."""
    text = _flat(DOC.read_text(encoding="utf-8").split("## CLI", 1)[1])
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    synopses = dict(re.findall(r"`(expose|unexpose|ports|status|wait) (PORT ?[^`]*|[^`]*)`", text))
    assert set(synopses) == set(commands.choices) - {"run"}
    for name, synopsis in synopses.items():
        sub = commands.choices[name]
        options = {o for a in sub._actions for o in a.option_strings} - {"-h", "--help", "--api"}
        assert set(re.findall(r"\[(--[a-z-]+)", synopsis)) == options, name
        positional = [a.metavar for a in sub._actions if not a.option_strings]
        outside = re.sub(r"\[[^]]*\]", "", synopsis).split()  # the words outside [...]
        assert outside == positional, name


@pytest.mark.anyio
async def test_a_port_watch_stops_counting_as_a_connection_once_its_stream_starts() -> None:
    """Limits: 'at most 64 connections (503 TOO_MANY_CONNECTIONS; a port watch stops counting
    once its stream starts)'. With a limit of 1: a live watch leaves room for a request, an idle
    keep-alive connection does not."""
    import anyio

    from .test_local_api import raw_exchange

    assert "a port watch stops counting once its stream starts" in _flat(
        DOC.read_text(encoding="utf-8")
    )
    status = b"GET /v1/status HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n"
    with socket.socket() as reserved:  # bound, never listening: the watch never ends by itself
        reserved.bind(("127.0.0.1", 0))
        body = b'{"port": %d, "mode": "tcp", "timeout": 60000}' % reserved.getsockname()[1]
        watch = (
            b"POST /api/port-watch HTTP/1.1\r\nhost: localhost\r\ncontent-type: "
            b"application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
        async with LocalAPI(FakeController(), port=0, max_connections=1) as api:
            async with await anyio.connect_tcp("127.0.0.1", api.port) as stream:
                await stream.send(watch)
                seen = b""
                with anyio.fail_after(10):
                    while b'"type":"watching"' not in seen:
                        seen += await stream.receive()
                during_watch = await raw_exchange(api.port, status)
            async with await anyio.connect_tcp("127.0.0.1", api.port) as idle:
                await idle.send(b"GET /v1/status HTTP/1.1\r\nhost: localhost\r\n\r\n")
                with anyio.fail_after(10):
                    assert (await idle.receive()).startswith(b"HTTP/1.1 200 ")
                while_idle = await raw_exchange(api.port, status)  # the slot is the idle one's
    assert during_watch.startswith(b"HTTP/1.1 200 "), during_watch
    assert while_idle.startswith(b"HTTP/1.1 503 "), while_idle
    assert b"TOO_MANY_CONNECTIONS" in while_idle


@pytest.mark.parametrize("flag", [["--tls-ca", "/etc/ca.pem"], ["--tls-server-name", "edge"]])
def test_tls_ca_and_tls_server_name_each_imply_tls(
    flag: list[str], fake_core: list[argparse.Namespace], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flag table: '`--tls`, `--tls-ca FILE`, `--tls-server-name NAME` ... the last two imply
    `--tls`': with either, a non-loopback --server is not refused as plaintext."""
    assert "the last two imply `--tls`" in DOC.read_text(encoding="utf-8")
    monkeypatch.setenv("TUNNEL_AGENT_TOKEN", "t")
    argv = ["run", "--server", "edge.example.com:7000", "--sandbox-id", "sb1"]
    assert main([*argv, *flag]) == 0
    assert fake_core[0].tls is True
    assert main(argv) == 2  # the same without it: plaintext off loopback
