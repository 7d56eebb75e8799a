"""``tunnel-agent`` as a new user types it: Ctrl-C, bad files and bad ports end with a documented
exit code and a clear line, never a Python traceback; ``--help`` states the defaults. Each case
runs the installed ``tunnel-agent`` as a subprocess in an environment without the agent's
variables."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.cli import EXIT_USAGE
from tests.cli_help import help_entries

from .conftest import AGENT_ENV, assert_exited_130_cleanly, stderr_of_interrupted

AGENT = str(Path(sys.executable).parent / "tunnel-agent")
RUN_TIMEOUT = 15.0


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in AGENT_ENV}
    env.update(extra)
    return env


def agent(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [AGENT, *args],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"tunnel-agent {' '.join(args)} still running: {exc.stderr!r:.600}")


def _run_args(edge_port: int) -> list[str]:
    return ["run", "--server", f"127.0.0.1:{edge_port}", "--sandbox-id", "sb1", "--api-port", "0"]


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_ctrl_c_during_a_client_command_exits_130_without_a_traceback(tmp_path: Path) -> None:
    """``tunnel-agent wait`` blocks for up to --timeout: Ctrl-C is how a user ends it early."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(RUN_TIMEOUT)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"  # accepts, never answers
        with (tmp_path / "stderr").open("w+") as err:
            proc = subprocess.Popen(
                [AGENT, "wait", "8000", "--timeout", "60", "--api", url],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=_env(),
            )
            try:
                conn, _ = listener.accept()  # the command is now inside its request
                with conn:
                    proc.send_signal(signal.SIGINT)
                    status = proc.wait(RUN_TIMEOUT)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(5)
            err.seek(0)
            stderr = err.read()
    assert "Traceback" not in stderr, stderr
    assert status == 130, (status, stderr)  # as shells report SIGINT (docs/agent.md)


# Runs `tunnel-agent` as its console script does, and raises SIGINT in the process on entering
# the function named argv[1] (``co_qualname``), or at the latest on the first read of the answer
# (where a user's Ctrl-C usually lands); the function it stopped at is written to argv[2].
_INTERRUPT_AT = """
import signal, sys
target, marker = sys.argv[1], sys.argv[2]
def interrupt(frame, event, arg):
    name = frame.f_code.co_qualname
    if name in (target, "SocketIO.readinto"):
        sys.settrace(None)
        with open(marker, "w") as f:
            f.write(name)
        signal.raise_signal(signal.SIGINT)
from agent.cli import main
sys.argv = ["tunnel-agent", *sys.argv[3:]]
sys.settrace(interrupt)
sys.exit(main())
"""

# The client command's way to its request, in order; the http.client ones are where a
# KeyboardInterrupt left half-built objects whose destructors printed "Exception ignored in:
# <socket.SocketIO ...> AttributeError: ... '_sock'" (and 'HTTPResponse' ... 'fp') at exit.
_INTERRUPT_POINTS = (
    "build_parser",
    "_cmd_wait",
    "AgentClient.__init__",
    "AgentClient._connect",
    "HTTPConnection.__init__",
    "create_connection",
    "HTTPConnection.putrequest",
    "HTTPConnection.endheaders",
    "HTTPConnection.send",
    "HTTPConnection.getresponse",
    "HTTPResponse.__init__",
    "socket.makefile",
    "SocketIO.__init__",
    "HTTPResponse.begin",
    "HTTPResponse._read_status",
    "SocketIO.readinto",
)


@pytest.mark.parametrize("point", _INTERRUPT_POINTS)
def test_ctrl_c_at_any_point_of_a_client_command_exits_130_without_a_traceback(
    tmp_path: Path, point: str
) -> None:
    """Ctrl-C lands wherever the command happens to be: each case raises SIGINT on entering one
    function of its way to the request (no timing involved), against an API that never answers."""
    marker = tmp_path / "stopped-at"
    root = Path(__file__).resolve().parents[2]
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # the kernel completes the connect; nothing reads or answers
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        wait_args = ["wait", "8000", "--timeout", "60", "--api", url]
        proc = subprocess.Popen(
            # -X dev: Python 3.11/3.12 print a destructor's error only in development mode
            [sys.executable, "-X", "dev", "-c", _INTERRUPT_AT, point, str(marker), *wait_args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=root,  # `-c` imports agent/ from here
        )
        stderr = stderr_of_interrupted(proc, RUN_TIMEOUT, f"tunnel-agent wait, SIGINT at {point}")
    assert marker.read_text() == point  # the interrupt landed where this case means it to
    assert_exited_130_cleanly(proc, stderr)


def test_a_missing_tls_ca_file_is_a_usage_error_naming_it(tmp_path: Path, closed_port: int) -> None:
    missing = tmp_path / "ca.pem"
    out = agent(*_run_args(closed_port), "--tls-ca", str(missing), env=_env(TUNNEL_AGENT_TOKEN="t"))
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == EXIT_USAGE, out.stderr
    assert f"error: --tls-ca {missing}: cannot load a CA bundle from it (No such file" in out.stderr


def test_a_tls_ca_file_without_a_certificate_is_a_usage_error_naming_it(
    tmp_path: Path, closed_port: int
) -> None:
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    out = agent(*_run_args(closed_port), "--tls-ca", str(garbage), env=_env(TUNNEL_AGENT_TOKEN="t"))
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == EXIT_USAGE, out.stderr
    assert f"error: --tls-ca {garbage}: cannot load a CA bundle from it" in out.stderr


def test_a_token_file_that_is_not_text_is_a_usage_error(tmp_path: Path, closed_port: int) -> None:
    binary = tmp_path / "token"
    binary.write_bytes(b"\xff\xfe\x00token")
    out = agent(*_run_args(closed_port), "--token-file", str(binary), env=_env())
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == EXIT_USAGE, out.stderr
    assert f"error: --token-file {binary} is not UTF-8 text" in out.stderr


# -- a PORT that is no TCP port: a usage error, before any connection ----------------------------


class _CountingApi:
    """A stand-in for the agent's local API on 127.0.0.1: counts the connections it gets and
    answers each request as the agent answers a port it refuses (400 INVALID_PORT, with the
    ``error`` of /v1/ports and the ``message`` of /api/port-watch)."""

    def __init__(self) -> None:
        self.connections = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.settimeout(RUN_TIMEOUT)
                try:
                    data = b""
                    while b"\r\n\r\n" not in data and len(data) < 65536:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    text = "Invalid port number. Must be 1024-65535, excluding 3000."
                    body = json.dumps({"error": text, "message": text, "code": "INVALID_PORT"})
                    conn.sendall(
                        b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                        % (len(body), body.encode())
                    )
                except OSError:
                    pass

    def __enter__(self) -> _CountingApi:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(RUN_TIMEOUT)
        self._sock.close()


@pytest.mark.parametrize("value", ["0", "65536", "70000", "-1", "abc", "99999999999999999999"])
@pytest.mark.parametrize("command", ["expose", "unexpose", "wait"])
def test_a_port_that_is_no_tcp_port_is_a_usage_error_before_any_connection(
    command: str, value: str
) -> None:
    """``expose 70000`` exited 1, as if the agent or the edge had refused it, and ``wait 0``
    exited 2 only after asking the agent: bad input is caught here, exit 2, nothing sent."""
    with _CountingApi() as api:
        out = agent(command, value, "--api", api.url, env=_env())
    assert "Traceback" not in out.stderr, out.stderr
    assert (out.returncode, out.stdout) == (EXIT_USAGE, ""), out.stderr
    errors = [line for line in out.stderr.splitlines() if "error" in line]
    assert errors == [
        f"tunnel-agent {command}: error: argument PORT: expected a TCP port number 1-65535, "
        f"got {value!r}"
    ], out.stderr
    assert api.connections == 0


@pytest.mark.parametrize("value", ["80", "1", "1023", "3000"])
@pytest.mark.parametrize("command", ["expose", "unexpose", "wait"])
def test_a_port_the_agent_never_serves_is_a_usage_error_before_any_connection(
    command: str, value: str
) -> None:
    """``expose 80`` exited 1 after asking the agent, ``wait 80`` 2: the rule (1024-65535, not
    3000) is known here, so every command with a PORT refuses it alike: exit 2, saying why and
    what is allowed, nothing sent."""
    with _CountingApi() as api:
        out = agent(command, value, "--api", api.url, env=_env())
    assert "Traceback" not in out.stderr, out.stderr
    assert (out.returncode, out.stdout) == (EXIT_USAGE, ""), out.stderr
    why = (
        "is the sandbox control plane's port (the agent's local API by default)"
        if value == "3000"
        else "is below 1024 (privileged ports, for system services)"
    )
    errors = [line for line in out.stderr.splitlines() if "error" in line]
    assert errors == [
        f"tunnel-agent {command}: error: argument PORT: {value} {why}: the agent exposes and "
        "watches ports 1024-65535 only, except 3000 and its own API port"
    ], out.stderr
    assert api.connections == 0


@pytest.mark.parametrize("path", ["health", "/a b", "/\u00e9t\u00e9", "/" + "x" * 2048])
def test_a_wait_path_the_agent_refuses_is_a_usage_error_before_any_connection(path: str) -> None:
    """``wait --http`` takes what the agent probes (agent.portwatch.check_path): an absolute ASCII
    path, no spaces, at most 2048 characters; anything else is refused here, exit 2."""
    with _CountingApi() as api:
        out = agent("wait", "8000", "--http", path, "--api", api.url, env=_env())
    assert (out.returncode, out.stdout) == (EXIT_USAGE, ""), out.stderr
    assert (
        "error: argument --http: expected an absolute ASCII path without spaces, e.g. /health "
        "(at most 2048 characters), got " in out.stderr
    )
    assert api.connections == 0


def test_the_wait_path_limit_is_the_agents() -> None:
    from agent import cli, portwatch

    assert cli.WAIT_MAX_PATH == portwatch.MAX_PATH_LENGTH
    for path in ("/", "/health?x=1", "/" + "x" * 2047):
        assert portwatch.check_path(cli._probe_path(path)) == path


@pytest.mark.parametrize(
    "argv",
    [
        ["expose", "8000"],
        ["expose", "1024"],
        ["unexpose", "65535"],
        ["wait", "8000"],
        ["wait", "8000", "--http", "/" + "x" * 2047],
    ],
)
def test_a_refusal_by_the_agent_exits_1_for_every_command(argv: list[str]) -> None:
    """The stand-in of the tests above does count: a port the CLI cannot fault goes to the agent,
    and the agent's refusal (400 INVALID_PORT here) is an error the agent reported: exit 1, for
    ``wait`` as for ``expose`` (``wait`` exited 2 for it, as if it were a usage error)."""
    with _CountingApi() as api:
        out = agent(*argv, "--api", api.url, env=_env())
    assert (out.returncode, out.stdout, api.connections) == (1, "", 1), out.stderr
    assert out.stderr == (
        "error: Invalid port number. Must be 1024-65535, excluding 3000. (INVALID_PORT)\n"
    )


def test_an_api_url_with_port_0_is_a_usage_error() -> None:
    """``--api http://127.0.0.1:0`` went to port 80 (``port or 80``)."""
    for args in (["ports", "--api", "http://127.0.0.1:0"], ["status"]):
        out = agent(*args, env=_env(TUNNEL_AGENT_API="http://127.0.0.1:0"))
        assert "Traceback" not in out.stderr, out.stderr
        assert out.returncode == EXIT_USAGE, out.stderr
        assert "--api: expected an http://HOST:PORT URL, port 1-65535, got " in out.stderr


def test_expose_70000_against_a_running_agent_is_a_usage_error(
    tmp_path: Path, closed_port: int
) -> None:
    """The case as reported, with a real agent (its edge unreachable: the local API serves
    anyway): 2 for a PORT that is no port or one the agent never serves (80), 1 for the port
    the agent refuses (its own API port), for `expose` and `wait` alike."""
    ports_file = tmp_path / "agent.json"
    env = _env(TUNNEL_AGENT_TOKEN="t", TUNNEL_AGENT_PORTS_FILE=str(ports_file))
    with (tmp_path / "agent.log").open("w") as log:
        proc = subprocess.Popen(
            [AGENT, *_run_args(closed_port)], stdout=subprocess.DEVNULL, stderr=log, env=env
        )
        try:
            deadline = time.monotonic() + RUN_TIMEOUT
            while not ports_file.exists() and proc.poll() is None:
                assert time.monotonic() < deadline, "the agent never wrote its ports file"
                time.sleep(0.05)
            assert proc.poll() is None, (tmp_path / "agent.log").read_text()
            url = f"http://127.0.0.1:{json.loads(ports_file.read_text())['api']}"
            out = agent("expose", "70000", "--api", url, env=_env())
            assert (out.returncode, out.stdout) == (EXIT_USAGE, ""), out.stderr
            assert "argument PORT: expected a TCP port number 1-65535, got '70000'" in out.stderr
            for command in ("expose", "wait"):
                out = agent(command, "80", "--api", url, env=_env())
                assert (out.returncode, out.stdout) == (EXIT_USAGE, ""), out.stderr
                assert "argument PORT: 80 is below 1024 (privileged ports" in out.stderr
                api_port = url.rsplit(":", 1)[1]
                out = agent(command, api_port, "--api", url, env=_env())
                assert (out.returncode, out.stdout) == (1, ""), out.stderr
                assert out.stderr.startswith(
                    f"error: Invalid port number: {api_port}. Must be 1024-65535, excluding 3000 "
                    f"and {api_port} (the tunnel agent's control API). (INVALID_PORT"
                ), out.stderr
        finally:
            proc.terminate()
            try:
                proc.wait(RUN_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


# -- --help ----------------------------------------------------------------------------------


def _subcommands() -> list[str]:
    from agent.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices)


def _help_entries(*command: str) -> dict[str, str]:
    return help_entries([AGENT, *command], _env(), RUN_TIMEOUT)


@pytest.mark.parametrize(
    "command", [[], *([c] for c in _subcommands())], ids=lambda c: "-".join(c) or "top"
)
def test_help_states_the_default_of_every_option_that_takes_a_value(command: list[str]) -> None:
    """As ``tunneld``'s (tests/test_cli_ux_tunneld.py): a switch's default is off; an option
    that must be given says it is required; every other one says what happens without it."""
    missing = []
    for option, text in _help_entries(*command).items():
        takes_value = bool(re.match(r"\S+ [A-Z{]", text))
        if option == "-h" or not takes_value:
            continue
        if "default" not in text.lower() and "required" not in text.lower():
            missing.append(text)
    assert missing == []
