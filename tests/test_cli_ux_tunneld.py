"""``tunneld`` as a new user types it: bad input ends with exit 2 and one clear line on stderr,
never a traceback, a hang, or a daemon that starts anyway; ``--help`` states the defaults.

Every case runs the installed ``tunneld`` as a subprocess, with every listener on port 0 and a
state directory of its own, so a case that wrongly starts the daemon fails on the timeout
instead of taking anyone's port.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli_help import help_entries

BIN = Path(sys.executable).parent
TUNNELD = str(BIN / "tunneld")
# An answer is immediate for all of these; a daemon that started instead is still running then.
RUN_TIMEOUT = 15.0


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNELD_")}
    env.update(TUNNELD_ADMIN_TOKEN="admintok", TUNNELD_SECRET="s3cret", **extra)
    return env


def tunneld(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [TUNNELD, *args],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            env=_env() if env is None else env,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:  # the child was killed by subprocess.run
        pytest.fail(
            f"tunneld {' '.join(args)} was still running after {RUN_TIMEOUT:g} s: the bad input "
            f"was accepted (stderr: {exc.stderr!r:.600})"
        )


def serve_args(tmp_path: Path, *args: str) -> list[str]:
    return [
        "serve",
        "--public-port",
        "0",
        "--agent-port",
        "0",
        "--admin-port",
        "0",
        "--state-dir",
        str(tmp_path / "state"),
        *args,
    ]


def assert_refused(out: subprocess.CompletedProcess[str], status: int, *needles: str) -> None:
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == status, (out.returncode, out.stderr)
    for needle in needles:
        assert needle in out.stderr, (needle, out.stderr)


# -- serve: configuration values -----------------------------------------------------------


@pytest.mark.parametrize(
    "flags, environ, needle",
    [
        (["--grace-period", "-5"], {}, "grace_period must be a number of seconds >= 0, not -5.0"),
        (["--grace-period", "nan"], {}, "grace_period must be a number of seconds >= 0, not nan"),
        ([], {"TUNNELD_HEAD_TIMEOUT": "-1"}, "head_timeout must be a number of seconds > 0"),
        ([], {"TUNNELD_CONTROL_TIMEOUT": "inf"}, "control_timeout must be a number of seconds > 0"),
        ([], {"TUNNELD_IDLE_TIMEOUT": "-0.5"}, "idle_timeout must be a number of seconds >= 0"),
        (["--url-port", "70000"], {}, "url_port must be 0-65535, not 70000"),
        (["--url-port", "-1"], {}, "url_port must be 0-65535, not -1"),
    ],
    ids=[
        "grace-negative",
        "grace-nan",
        "head-negative",
        "control-inf",
        "idle-negative",
        "url-port-70000",
        "url-port-negative",
    ],
)
def test_a_negative_or_non_finite_timeout_or_an_out_of_range_url_port_is_refused(
    tmp_path: Path, flags: list[str], environ: dict[str, str], needle: str
) -> None:
    out = tunneld(*serve_args(tmp_path, *flags), env=_env(**environ))
    assert_refused(out, 2, "tunneld: configuration error: ", needle)


def test_a_timeout_from_the_config_file_is_checked_too(tmp_path: Path) -> None:
    config = tmp_path / "t.toml"
    config.write_text("handshake_timeout = 0\n")
    out = tunneld(*serve_args(tmp_path, "-c", str(config)))
    assert_refused(out, 2, "handshake_timeout must be a number of seconds > 0, not 0.0")


@pytest.mark.parametrize("key, value", [("admin_token_file", "5"), ("secret_file", '["x"]')])
def test_a_secret_file_setting_that_is_not_a_path_is_a_configuration_error(
    tmp_path: Path, key: str, value: str
) -> None:
    config = tmp_path / "t.toml"
    config.write_text(f"{key} = {value}\n")
    out = tunneld(*serve_args(tmp_path, "-c", str(config)))
    assert_refused(out, 2, f"tunneld: configuration error: {key} must be the path of a file")


def test_an_unreadable_agent_listener_certificate_is_a_configuration_error_naming_it(
    tmp_path: Path,
) -> None:
    """As for the public and admin pairs: exit 2 and the file's name, not exit 1 and a bare
    ``[Errno 2] No such file or directory`` from the listener."""
    missing = tmp_path / "agent-cert.pem"
    out = tunneld(*serve_args(tmp_path, "--tls-cert", str(missing), "--tls-key", str(missing)))
    assert_refused(out, 2, f"tunneld: configuration error: cannot read tls_cert file {missing}")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    out = tunneld(*serve_args(tmp_path, "--tls-cert", str(garbage), "--tls-key", str(garbage)))
    assert_refused(out, 2, f"tls: cannot load certificate {garbage} with key {garbage}")


# -- demo ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--public-port", "70000"], "argument --public-port: expected a TCP port 0-65535"),
        (["--public-port", "-1"], "argument --public-port: expected a TCP port 0-65535"),
        (["--service-port", "70000"], "argument --service-port: expected a TCP port 0-65535"),
        (["--service-port", "80"], "argument --service-port: expected a port 1024-65535 other"),
        (["--service-port", "3000"], "argument --service-port: expected a port 1024-65535 other"),
    ],
    ids=["public-70000", "public-negative", "service-70000", "service-80", "service-3000"],
)
def test_demo_refuses_a_port_it_cannot_use_before_starting(flags: list[str], needle: str) -> None:
    out = tunneld("demo", "--public-port", "0", *flags)
    assert_refused(out, 2, "tunneld demo: error: ", needle)


# -- inspect / replay ------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_inspect_without_a_token_names_only_what_it_reads() -> None:
    """inspect and replay have no --token-file: the message must not offer it."""
    url = f"http://127.0.0.1:{_closed_port()}"
    env = {k: v for k, v in _env().items() if k != "TUNNELD_ADMIN_TOKEN"}
    for args in (["inspect", "sb1"], ["replay", "sb1", "1"]):
        out = tunneld(*args, "--admin-url", url, env=env)
        assert_refused(
            out, 2, "no admin token: set TUNNELD_ADMIN_TOKEN or TUNNELD_ADMIN_TOKEN_FILE"
        )
        assert "--token-file" not in out.stderr


def test_inspect_and_replay_refuse_a_malformed_sandbox_id_as_a_usage_error() -> None:
    url = f"http://127.0.0.1:{_closed_port()}"  # never asked: the id is checked first
    for args in (["inspect", "Bad_Id"], ["replay", "Bad_Id", "1"]):
        out = tunneld(*args, "--admin-url", url)
        assert_refused(out, 2, f"tunneld {args[0]}: ", "Invalid sandbox ID: 'Bad_Id'")
        assert "Cannot reach" not in out.stderr


def test_replay_refuses_a_malformed_connect_before_asking_tunneld() -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    out = tunneld("replay", "sb1", "1", "--connect", "nope", "--admin-url", url)
    assert_refused(out, 2, "tunneld replay: --connect must be HOST:PORT, not 'nope'")


@pytest.fixture
def admin_url(tmp_path: Path) -> Iterator[str]:
    """The admin API of a running ``tunneld serve`` (memory store, every port 0)."""
    ports_file = tmp_path / "ports.json"
    args = serve_args(tmp_path, "--store", "memory", "--ports-file", str(ports_file))
    with (tmp_path / "tunneld.log").open("w") as log:
        proc = subprocess.Popen([TUNNELD, *args], stdout=subprocess.DEVNULL, stderr=log, env=_env())
        try:
            deadline = time.monotonic() + RUN_TIMEOUT
            while not ports_file.exists() and proc.poll() is None:
                assert time.monotonic() < deadline, "tunneld never wrote its ports file"
                time.sleep(0.05)
            assert proc.poll() is None, (tmp_path / "tunneld.log").read_text()
            yield f"http://127.0.0.1:{json.loads(ports_file.read_text())['admin']}"
        finally:
            proc.terminate()
            try:
                proc.wait(RUN_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _expose(admin_url: str, sandbox: str, port: int, **options: object) -> None:
    request = urllib.request.Request(
        f"{admin_url}/v1/sandboxes/{sandbox}/ports",
        data=json.dumps({"port": port, **options}).encode(),
        headers={"authorization": "Bearer admintok", "content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=RUN_TIMEOUT) as response:
        assert response.status == 200


def test_inspect_says_inspection_is_off_and_how_to_turn_it_on(admin_url: str) -> None:
    """It printed nothing and exited 0 (the SDK dropped the answer's ``"inspect": false``), and
    ``--follow`` waited for requests that are never recorded. Exit 1, as when there is nothing
    else to show (``replay`` of a request never recorded)."""
    _expose(admin_url, "sb1", 8000)
    _expose(admin_url, "sb1", 8001)
    for follow in ([], ["--follow"]):
        out = tunneld("inspect", "sb1", *follow, "--admin-url", admin_url)
        assert_refused(out, 1)
        assert out.stdout == ""
        assert out.stderr == (
            "tunneld inspect: request inspection is off for sandbox sb1's ports 8000, 8001: no "
            "request is recorded. Turn it on with `tunneld inspect sb1 --enable` (every port, "
            "until tunneld restarts) or expose the port with inspection (`tunnel-agent expose "
            "8000 --inspect`, or the SDK's expose_port(8000, inspect=True))\n"
        )
    out = tunneld("inspect", "sb2", "--admin-url", admin_url)
    assert_refused(out, 1, "request inspection is off for sandbox sb2 (it has no exposed HTTP ")
    assert_refused(
        tunneld("replay", "sb1", "1", "--admin-url", admin_url), 1, "No recorded request"
    )
    # on for one port (the exposure records it, the sandbox switch stays off), or for the sandbox
    _expose(admin_url, "sb1", 8002, inspect=True)
    out = tunneld("inspect", "sb1", "--admin-url", admin_url)
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")
    out = tunneld("inspect", "sb2", "--enable", "--admin-url", admin_url)
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")
    out = tunneld("inspect", "sb2", "--admin-url", admin_url)
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")


# -- --help ----------------------------------------------------------------------------------


def _help_entries(*command: str) -> dict[str, str]:
    return help_entries([TUNNELD, *command], _env(), RUN_TIMEOUT)


def _subcommands() -> list[tuple[str, ...]]:
    """Every command of ``tunneld``, nested ones (exposures export) included: a command added
    later is checked without being listed here."""
    import argparse

    from tunneld.cli import build_parser

    def walk(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> list[tuple[str, ...]]:
        found = [path] if path else []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found += walk(sub, (*path, name))
        return found

    return walk(build_parser(), ())


def test_the_help_check_covers_every_command() -> None:
    assert set(_subcommands()) >= {
        ("serve",), ("demo",), ("token",), ("inspect",), ("replay",), ("port-forward",),
        ("exposures", "export"), ("exposures", "import"),
    }  # fmt: skip


@pytest.mark.parametrize("command", _subcommands(), ids=lambda c: "-".join(c))
def test_help_states_the_default_of_every_option_that_takes_a_value(
    command: tuple[str, ...],
) -> None:
    """A switch's default is off; a ``FOO-key`` option's is its certificate's. Every other
    option says what happens when it is not given."""
    missing = []
    for option, text in _help_entries(*command).items():
        takes_value = bool(re.match(r"\S+ [A-Z{]", text))
        if option == "-h" or not takes_value or re.search(r"\bkey of --", text):
            continue
        if "default" not in text.lower():
            missing.append(text)
    assert missing == []


def test_serve_help_examples_continue_their_lines_as_a_shell_would() -> None:
    out = subprocess.run(
        [TUNNELD, "serve", "--help"], capture_output=True, text=True, timeout=RUN_TIMEOUT
    )
    example = next(line for line in out.stdout.splitlines() if "--public-redirect-port 80" in line)
    assert example.endswith("\\"), example  # not "... 80       --public-tls-cert ..." on one line


# -- Ctrl-C at start-up ------------------------------------------------------------------------

# Holds the import of tunneld.inspect_cli (which build_parser does) until the test sends SIGINT:
# a deterministic stand-in for a Ctrl-C that lands while the parser is being built.
_HOLD_IMPORT = """\
import importlib.abc, os, sys, time

class _Hold(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "tunneld.inspect_cli":
            sys.meta_path.remove(self)
            open(os.environ["UX_HOLD_MARK"], "w").close()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                time.sleep(0.05)
        return None

sys.meta_path.insert(0, _Hold())
"""


def test_ctrl_c_while_the_parser_is_built_exits_130_without_a_traceback(tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_HOLD_IMPORT)
    mark = tmp_path / "held"
    env = _env(UX_HOLD_MARK=str(mark), PYTHONPATH=str(hook))
    with (tmp_path / "stderr").open("w+") as err:
        proc = subprocess.Popen(
            [TUNNELD, *serve_args(tmp_path)], stdout=subprocess.DEVNULL, stderr=err, env=env
        )
        try:
            deadline = time.monotonic() + RUN_TIMEOUT
            while not mark.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert mark.exists(), "the import hook never ran"
            proc.send_signal(signal.SIGINT)
            status = proc.wait(RUN_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        err.seek(0)
        stderr = err.read()
    assert "Traceback" not in stderr, stderr
    assert status == 130, (status, stderr)


# -- serve: a port in use --------------------------------------------------------------------


@pytest.mark.parametrize("listener", ["agent", "agent with TLS", "public", "admin"])
def test_a_port_in_use_names_the_listener_and_its_settings(tmp_path: Path, listener: str) -> None:
    """ "address already in use" alone does not say which of three ports to change."""
    import trustme

    name = listener.split()[0]
    args = serve_args(tmp_path)
    if listener == "agent with TLS":  # the listener that binds by itself (tunneld/listen.py)
        cert = trustme.CA().issue_cert("edge.test")
        cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
        cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
        args += ["--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem")]
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    args[args.index(f"--{name}-port") + 1] = str(port)
    try:
        out = tunneld(*args)
    finally:
        taken.close()
    assert_refused(
        out,
        1,
        f"cannot start: cannot open the {name} listener on 127.0.0.1:{port} "
        f"({name}_host, {name}_port): ",
        "address already in use",
    )
