"""What the agent tests share: the zipapp, built once per session by tools/build_agent.py (what
``make agent`` runs), and a TLS edge's certificate files (test_packaging.py, test_sandbox_image.py);
``run`` with the agent core stubbed out, and an environment without the agent's variables (the CLI
tests)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from agent import cli

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "tools" / "build_agent.py"

# The environment variables the agent's CLI reads.
AGENT_ENV = (
    "TUNNEL_AGENT_API",
    "TUNNEL_AGENT_SERVER",
    "TUNNEL_AGENT_SANDBOX_ID",
    "TUNNEL_AGENT_TOKEN",
    "TUNNEL_AGENT_LOG_LEVEL",
    "TUNNEL_AGENT_PROXY",
)


@pytest.fixture
def clean_agent_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """None of ``AGENT_ENV`` set, whatever the environment the tests run in has."""
    for name in AGENT_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_core(monkeypatch: pytest.MonkeyPatch) -> list[argparse.Namespace]:
    """The arguments each ``run`` would start the agent with; the agent is never started."""
    calls: list[argparse.Namespace] = []

    def run_from_args(args: argparse.Namespace) -> int:
        calls.append(args)
        return 0

    monkeypatch.setattr(cli, "run_from_args", run_from_args)
    return calls


@pytest.fixture(scope="session")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, str(BUILD), "--what", "pyz", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    path = out / "tunnel-agent.pyz"
    assert f"{path}: " in done.stdout  # it reports the size
    return path


@dataclass(frozen=True)
class TlsFiles:
    cert: Path  # the edge's certificate chain
    key: Path
    ca: Path  # the CA that signed it, for the agent


def tls_files(directory: Path, name: str) -> TlsFiles:
    """A new trustme CA and a certificate for ``name`` (a host name or an IP address), as files."""
    ca = trustme.CA()
    issued = ca.issue_cert(name)
    files = TlsFiles(directory / "cert.pem", directory / "key.pem", directory / "ca.pem")
    issued.private_key_and_cert_chain_pem.write_to_path(str(files.cert))
    issued.private_key_pem.write_to_path(str(files.key))
    ca.cert_pem.write_to_path(str(files.ca))
    return files


def stderr_of_interrupted(proc: subprocess.Popen[str], timeout: float, what: str) -> str:
    """The stderr of ``proc``, a ``tunnel-agent`` sent SIGINT, once it has ended (killed and the
    test failed if it is still running ``timeout`` s later)."""
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=5)
        pytest.fail(f"{what}: still running {timeout:g} s after SIGINT")
    return str(stderr)


def assert_exited_130_cleanly(proc: subprocess.Popen[str], stderr: str) -> None:
    """Ctrl-C's end: exit 130 (as shells report SIGINT), no traceback, no destructor's error."""
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert proc.returncode == 130, (proc.returncode, stderr)
