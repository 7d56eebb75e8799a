"""What tests/agent/test_packaging.py and test_sandbox_image.py share: the zipapp, built once per
session by tools/build_agent.py (what ``make agent`` runs), and a TLS edge's certificate files."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "tools" / "build_agent.py"


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
