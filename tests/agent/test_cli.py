"""``tunnel-agent`` against a real local API server running in a background thread."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import cli
from agent.cli import AgentClient, main
from agent.errors import AgentError
from agent.local_api import LocalAPI

from .test_local_api import FakeController

# run in an environment without TUNNEL_AGENT_* (tests/agent/conftest.py)
pytestmark = pytest.mark.usefixtures("clean_agent_env")

REPO = Path(__file__).resolve().parents[2]


class ServerThread:
    """A LocalAPI on its own event loop in a thread, so the blocking CLI can call it."""

    def __init__(self, controller: FakeController) -> None:
        self.controller = controller
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.port = 0
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        async with LocalAPI(self.controller, port=0) as api:
            self.port = api.port
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        assert self._ready.wait(10), "local API did not start"
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        assert not self._thread.is_alive()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def controller() -> FakeController:
    return FakeController()


@pytest.fixture
def server(controller: FakeController) -> Iterator[ServerThread]:
    with ServerThread(controller) as s:
        yield s


@pytest.fixture
def dead_url() -> str:
    """A loopback URL where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- client commands -------------------------------------------------------------------------


def test_expose_prints_url(
    server: ServerThread, controller: FakeController, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, "expose", "8000", "--name", "api", "--api", server.url)
    assert (code, out, err) == (0, "http://8000-sb1-tok8000.localhost:8080/\n", "")
    assert controller.last_call() == ("expose", 8000, "api", None)


def test_expose_json_and_token(
    server: ServerThread, controller: FakeController, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(
        capsys, "--api", server.url, "expose", "8000", "--token", "mytok", "--json"
    )
    assert code == 0
    assert json.loads(out) == {
        "port": 8000,
        "exposedAt": "http://8000-sb1-mytok.localhost:8080/",
        "name": None,
    }
    assert controller.last_call() == ("expose", 8000, None, "mytok")


def test_api_from_env(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TUNNEL_AGENT_API", server.url)
    code, out, _ = run_cli(capsys, "status")
    assert code == 0
    assert out == "sandbox  sb1\nedge     connected\n"


def test_ports_table_and_json(server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "ports", "--api", server.url) == (0, "PORT  NAME  URL\n", "")
    run_cli(capsys, "expose", "8000", "--name", "backend", "--api", server.url)
    run_cli(capsys, "expose", "5173", "--api", server.url)
    code, out, _ = run_cli(capsys, "ports", "--api", server.url)
    assert code == 0
    assert out.splitlines() == [
        "PORT  NAME     URL",
        "5173  -        http://5173-sb1-tok5173.localhost:8080/",
        "8000  backend  http://8000-sb1-tok8000.localhost:8080/",
    ]
    code, out, _ = run_cli(capsys, "ports", "--json", "--api", server.url)
    assert code == 0
    assert json.loads(out) == [
        {"port": 5173, "exposedAt": "http://5173-sb1-tok5173.localhost:8080/", "name": None},
        {"port": 8000, "exposedAt": "http://8000-sb1-tok8000.localhost:8080/", "name": "backend"},
    ]


def test_unexpose(
    server: ServerThread, controller: FakeController, capsys: pytest.CaptureFixture[str]
) -> None:
    run_cli(capsys, "expose", "8000", "--api", server.url)
    code, out, _ = run_cli(capsys, "unexpose", "8000", "--api", server.url)
    assert (code, out) == (0, "port 8000 is no longer exposed\n")
    assert controller.exposures == {}


def test_status(
    server: ServerThread, controller: FakeController, capsys: pytest.CaptureFixture[str]
) -> None:
    controller.is_connected = False
    code, out, _ = run_cli(capsys, "status", "--api", server.url)
    assert (code, out) == (0, "sandbox  sb1\nedge     not connected\n")
    code, out, _ = run_cli(capsys, "status", "--json", "--api", server.url)
    assert json.loads(out) == {"sandboxId": "sb1", "connected": False}


def test_api_error_exit_1(
    server: ServerThread, controller: FakeController, capsys: pytest.CaptureFixture[str]
) -> None:
    # The agent's own API port is its refusal (the CLI cannot know that port): exit 1 and the
    # same code for `expose` and `wait` (`wait` exited 2 for it, `expose` 1; then `wait` said
    # INVALID_PORT_NUMBER, the legacy container's code, and `expose` INVALID_PORT).
    refused = (
        f"error: Invalid port number: {server.port}. Must be 1024-65535, excluding 3000 and "
        f"{server.port} (the tunnel agent's control API). (INVALID_PORT)\n"
    )
    for command in ("expose", "wait"):
        code, out, err = run_cli(capsys, command, str(server.port), "--api", server.url)
        assert (code, out, err) == (1, "", refused), command
    # Unexposing it is not refused: the edge's admin API can expose any port of the sandbox
    # (it does not know the agent's API port), and the sandbox must be able to remove that.
    code, out, err = run_cli(capsys, "unexpose", str(server.port), "--api", server.url)
    assert (code, out, err) == (0, f"port {server.port} is no longer exposed\n", "")
    assert controller.calls == [("unexpose", server.port)]
    controller.calls.clear()
    controller.fail_with = AgentError("STORE_UNAVAILABLE", "The edge could not save the change.")
    code, out, err = run_cli(capsys, "unexpose", "8000", "--api", server.url)
    assert (code, out) == (1, "")
    assert err == "error: The edge could not save the change. (STORE_UNAVAILABLE)\n"
    controller.fail_with = None
    assert controller.calls == [("unexpose", 8000)]


@pytest.mark.parametrize("command", ["expose", "unexpose", "wait"])
@pytest.mark.parametrize("port", ["1", "80", "1023", "3000"])
def test_a_port_the_agent_never_serves_exits_2_before_any_request(
    server: ServerThread,
    controller: FakeController,
    capsys: pytest.CaptureFixture[str],
    command: str,
    port: str,
) -> None:
    """``expose 80`` exited 1 (the agent's refusal) and ``wait 80`` 2: the rule (1024-65535, not
    3000) is known here, so every command that takes a PORT refuses it the same way, before
    asking the agent."""
    code, out, err = run_cli(capsys, command, port, "--api", server.url)
    assert (code, out) == (2, "")
    why = (
        "is below 1024 (privileged ports, for system services)"
        if port != "3000"
        else "is the sandbox control plane's port (the agent's local API by default)"
    )
    assert err.splitlines()[-1] == (
        f"tunnel-agent {command}: error: argument PORT: {port} {why}: the agent exposes and "
        "watches ports 1024-65535 only, except 3000 and its own API port"
    )
    assert controller.calls == []
    controller.is_connected = False
    code, out, err = run_cli(capsys, "ports", "--api", server.url)
    assert (code, out) == (1, "")
    assert err == "error: The agent is not connected to the edge. (EDGE_NOT_CONNECTED)\n"
    code, _, err = run_cli(capsys, "expose", "8000", "--api", server.url)
    assert code == 1
    assert err.endswith("(EDGE_NOT_CONNECTED)\n")


@pytest.mark.parametrize("argv", [["status"], ["ports"], ["expose", "8000"], ["unexpose", "8000"]])
def test_unreachable_exit_3(
    dead_url: str, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, *argv, "--api", dead_url)
    assert (code, out) == (3, "")
    assert err == (
        f"error: cannot reach the tunnel agent at {dead_url} — is `tunnel-agent run` running?\n"
    )


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["expose"],
        ["expose", "abc"],
        ["nope"],
        ["ports", "--api", "ftp://127.0.0.1:3000"],
        ["ports", "--api", "http://127.0.0.1:99999"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert out == ""
    assert "usage: tunnel-agent" in err


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    assert "tunnel-agent expose 8000 --name api" in out
    for command in ("run", "expose", "unexpose", "ports", "status"):
        code, out, _ = run_cli(capsys, command, "--help")
        assert code == 0
        assert "example" in out
    _, out, _ = run_cli(capsys, "run", "--help")
    assert "TUNNEL_AGENT_TOKEN" in out
    assert "ps" in out


def test_help_explains_every_option() -> None:
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in {"": parser, **subparsers.choices}.items():
        for action in sub._actions:
            refused_token = name == "run" and "--token" in action.option_strings
            if action.dest in ("help", "command") or refused_token:
                continue  # run --token exists only to refuse it, and says why
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
            assert len(action.help) > 10, (name, action.dest, action.help)


def test_client_commands_do_not_load_the_core() -> None:
    code = (
        "import sys, agent.cli\n"
        "assert agent.cli.main(['--help']) == 0\n"
        "loaded = {'agent.core', 'agent.local_api', 'asyncio', 'relay.loop'} & set(sys.modules)\n"
        "sys.exit(f'loaded: {sorted(loaded)}' if loaded else 0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=env
    )
    assert done.returncode == 0, done.stderr


# -- run -------------------------------------------------------------------------------------


def test_run_passes_flags_to_core(
    fake_core: list[argparse.Namespace], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNNEL_AGENT_TOKEN", "s3cret\n")
    code = main(
        [
            "run",
            "--server",
            "edge.example.com:7000",
            "--sandbox-id",
            "abc123",
            "--api-port",
            "0",
            "--tls-ca",
            "/etc/ca.pem",
            "--log-level",
            "debug",
        ]
    )
    assert code == 0
    (args,) = fake_core
    assert args.server == "edge.example.com:7000"
    assert args.sandbox_id == "abc123"
    assert args.token == "s3cret"
    assert (args.api_host, args.api_port) == ("127.0.0.1", 0)
    assert (args.tls, args.tls_ca, args.tls_server_name) == (True, "/etc/ca.pem", None)
    assert args.log_level == "debug"


def test_run_from_env_and_token_file(
    fake_core: list[argparse.Namespace], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TUNNEL_AGENT_SERVER", "127.0.0.1:7000")
    monkeypatch.setenv("TUNNEL_AGENT_SANDBOX_ID", "sb-1")
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert main(["run", "--token-file", str(token_file)]) == 0
    (args,) = fake_core
    assert (args.server, args.sandbox_id, args.token) == ("127.0.0.1:7000", "sb-1", "from-file")
    assert (args.api_host, args.api_port, args.tls, args.log_level) == (
        "127.0.0.1",
        3000,
        False,
        "info",
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run"], "--server HOST:PORT is required"),
        (["run", "--server", "nohostport"], "expected HOST:PORT"),
        (["run", "--server", "h:1", "--sandbox-id", "Bad_ID"], "Sandbox ID"),
        (["run", "--server", "h:1"], "no agent token"),
        (["run", "--server", "h:1", "--token-file", "/nonexistent/x"], "cannot read --token-file"),
        (["run", "--server", "h:1", "--token", "s3cret"], "--token is not accepted"),
        (["run", "--server", "h:1", "--token=s3cret"], "--token is not accepted"),
    ],
)
def test_run_usage_errors(
    fake_core: list[argparse.Namespace],
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err
    assert "s3cret" not in err
    assert fake_core == []


# -- as a real process -----------------------------------------------------------------------


def _python_m(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TUNNEL_AGENT_API", None)
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *argv],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        cwd=REPO,
        timeout=30,
        check=False,
    )


def test_subprocess_exit_codes(server: ServerThread, dead_url: str) -> None:
    done = _python_m("expose", "8000", "--api", server.url)
    assert (done.returncode, done.stdout) == (0, "http://8000-sb1-tok8000.localhost:8080/\n")
    done = _python_m("expose", "80", "--api", server.url)
    assert (done.returncode, done.stdout) == (2, "")
    assert "argument PORT: 80 is below 1024" in done.stderr
    done = _python_m("expose", str(server.port), "--api", server.url)  # the agent's refusal
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.endswith("(the tunnel agent's control API). (INVALID_PORT)\n")
    done = _python_m("ports", "--api", dead_url)
    assert done.returncode == 3
    assert "cannot reach the tunnel agent" in done.stderr
    done = _python_m("expose")
    assert done.returncode == 2


def test_agent_timeout_is_an_api_error() -> None:
    # A listener that accepts but never answers: the agent is running but stuck.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        client = AgentClient(url, timeout=0.2)
        with pytest.raises(Exception, match=r"did not answer within 0\.2 s") as info:
            client.request("GET", "/v1/status")
    assert getattr(info.value, "code", None) == "AGENT_TIMEOUT"
