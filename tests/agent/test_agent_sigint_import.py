"""Ctrl-C while ``tunnel-agent`` is still importing its modules exits 130 without a traceback.

Each case starts the program the way a user does (the console script that pyproject.toml's
``[project.scripts]`` makes, ``python -m agent``, or ``tunnel-agent.pyz``) with a
``sitecustomize`` that raises SIGINT in the process the moment one chosen module starts to be
imported (a meta-path finder asked for it), so no timing is involved. Before agent/entry.py the
console script imported agent.cli, and with it argparse, http.client, ssl, email, json, orjson
and protocol/, before any handler: a Ctrl-C then printed a KeyboardInterrupt traceback, once a
TypeError from a half-imported ssl, and once crashed Python 3.13 (exit -11).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.signal_hooks import console_script

from .conftest import AGENT_ENV, assert_exited_130_cleanly, stderr_of_interrupted

ROOT = Path(__file__).resolve().parents[2]  # the tree under test (also in a copy of it)
RUN_TIMEOUT = 20.0

# Installed at start by Python (site imports sitecustomize after the .pth files): SIGINT when
# TARGET starts to be imported, the name written to MARKER first. A target imported already
# (by the interpreter's start or site) is reported as such, since it cannot be interrupted.
_SITECUSTOMIZE = """
import os, signal, sys

_target = os.environ["SIGINT_IMPORT_TARGET"]
_marker = os.environ["SIGINT_IMPORT_MARKER"]


class _InterruptOnImport:
    fired = False

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == _target and not cls.fired:
            cls.fired = True
            with open(_marker, "w") as f:
                f.write(name)
            signal.raise_signal(signal.SIGINT)
        return None


if _target in sys.modules:
    with open(_marker, "w") as f:
        f.write("imported before sitecustomize: " + _target)
else:
    sys.meta_path.insert(0, _InterruptOnImport)
"""

# Imported by a client command (`wait`) before it sends its request: at module level of
# agent.cli, which the console script used to import before any handler.
CLIENT_MODULES = (
    "agent.cli",
    "argparse",
    "http.client",
    "email.parser",
    "ssl",
    "socket",
    "json",
    "typing",
    "protocol",
    "protocol.frames",
    "orjson",
)
# Imported by `run` only, before its event loop takes SIGINT over (a clean stop).
RUN_MODULES = (
    "asyncio",
    "logging",
    "relay.loop",
    "h11",
    "wsproto",
    "agent.core",
    "agent.local_api",
)


@pytest.fixture(scope="module")
def hooks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("sigint-hooks")
    (directory / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    return directory


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _interrupted_at_import(
    program: list[str], python_path: list[Path], target: str, args: list[str], tmp_path: Path
) -> None:
    marker = tmp_path / "interrupted-at"
    env = {k: v for k, v in os.environ.items() if k not in AGENT_ENV and k != "PYTHONPATH"}
    env.update(
        PYTHONPATH=os.pathsep.join(map(str, python_path)),
        SIGINT_IMPORT_TARGET=target,
        SIGINT_IMPORT_MARKER=str(marker),
        TUNNEL_AGENT_TOKEN="t",  # for `run`
    )
    proc = subprocess.Popen(
        # -X dev: Python 3.11/3.12 print a destructor's error only in development mode
        [sys.executable, "-X", "dev", *program, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    stderr = stderr_of_interrupted(proc, RUN_TIMEOUT, f"SIGINT at the import of {target}")
    assert marker.is_file(), f"{target} was never imported (exit {proc.returncode}): {stderr}"
    assert marker.read_text() == target  # the interrupt landed where this case means it to
    assert_exited_130_cleanly(proc, stderr)


def _command(target: str, port: int) -> list[str]:
    if target in RUN_MODULES:
        return ["run", "--server", f"127.0.0.1:{port}", "--sandbox-id", "sb1", "--api-port", "0"]
    return ["wait", "8000", "--timeout", "5", "--api", f"http://127.0.0.1:{port}"]


@pytest.mark.parametrize("target", CLIENT_MODULES + RUN_MODULES)
def test_console_script_exits_130_on_ctrl_c_during_an_import(
    tmp_path: Path, hooks: Path, closed_port: int, target: str
) -> None:
    script = console_script(tmp_path, "tunnel-agent")
    _interrupted_at_import(
        [str(script)], [hooks, ROOT], target, _command(target, closed_port), tmp_path
    )


@pytest.mark.parametrize("target", CLIENT_MODULES + RUN_MODULES)
def test_python_m_agent_exits_130_on_ctrl_c_during_an_import(
    tmp_path: Path, hooks: Path, closed_port: int, target: str
) -> None:
    _interrupted_at_import(
        ["-m", "agent"], [hooks, ROOT], target, _command(target, closed_port), tmp_path
    )


@pytest.mark.parametrize("target", ("agent.cli", "http.client", "ssl", "orjson", "asyncio"))
def test_pyz_exits_130_on_ctrl_c_during_an_import(
    tmp_path: Path, hooks: Path, closed_port: int, pyz: Path, target: str
) -> None:
    # Only the hooks on the path: the archive's own agent/ (its sys.path[0]) is what runs.
    _interrupted_at_import([str(pyz)], [hooks], target, _command(target, closed_port), tmp_path)
