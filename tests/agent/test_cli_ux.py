"""``tunnel-agent`` as a new user types it: Ctrl-C and bad files end with a documented exit code
and a clear line, never a Python traceback; ``--help`` states the defaults. Each case runs the
installed ``tunnel-agent`` as a subprocess in an environment without the agent's variables."""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import EXIT_USAGE

from .conftest import AGENT_ENV

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


# -- --help ----------------------------------------------------------------------------------


def _subcommands() -> list[str]:
    from agent.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices)


def _help_entries(*command: str) -> dict[str, str]:
    out = subprocess.run(
        [AGENT, *command, "--help"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env={**_env(), "COLUMNS": "100"},
    )
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    options = out.stdout.split("\noptions:\n", 1)[1].split("\n\n", 1)[0]
    entries = re.split(r"\n(?=  -)", options.strip("\n"))
    return {e.split()[0].rstrip(","): " ".join(e.split()) for e in entries}


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
