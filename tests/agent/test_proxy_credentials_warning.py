"""``--proxy`` with credentials: the agent warns, and never shows them (docs/agent.md, Behind an
HTTP proxy): "Prefer ``HTTPS_PROXY`` or ``TUNNEL_AGENT_PROXY`` for credentials: ``--proxy`` is
visible in ``ps`` like any argument (the agent logs a warning when it carries credentials)",
and each line names the proxy "never the credentials".

A real ``tunnel-agent run`` process (the proxy and the edge refuse connections: only the start-up
lines matter), stopped with SIGTERM once it logged its first failed attempt.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
PASSWORD = "s3cret-pw"
WARNING = "--proxy carries credentials on the command line"


@contextmanager
def refusing() -> Iterator[int]:
    """A loopback port that refuses connections for as long as the block runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def run_agent(tmp_path: Path, args: list[str], env: dict[str, str]) -> str:
    """Start ``tunnel-agent run``, wait for its first failed attempt, stop it; its output."""
    base = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    base = {k: v for k, v in base.items() if not k.startswith("TUNNEL_AGENT_")}
    base.update(TUNNEL_AGENT_TOKEN="t", PYTHONUNBUFFERED="1", **env)
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "tunnel-agent"), "run", "--sandbox-id", "sb1", "--api-port", "0", *args],
            env=base,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 15
        while "retrying in" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return log.read_text(errors="replace")


def test_credentials_in_proxy_are_warned_about_and_never_shown(tmp_path: Path) -> None:
    with refusing() as edge, refusing() as proxy:
        url = f"http://user:{PASSWORD}@127.0.0.1:{proxy}"
        out = run_agent(tmp_path, ["--server", f"127.0.0.1:{edge}", "--proxy", url], {})
    assert out.count(WARNING) == 1, out
    assert f"edge 127.0.0.1:{edge}: via proxy 127.0.0.1:{proxy} (from --proxy)" in out, out
    assert PASSWORD not in out and "user:" not in out, out


@pytest.mark.parametrize("variable", ["TUNNEL_AGENT_PROXY", "HTTP_PROXY"])
def test_credentials_in_the_environment_are_not_warned_about(tmp_path: Path, variable: str) -> None:
    with refusing() as edge, refusing() as proxy:
        url = f"http://user:{PASSWORD}@127.0.0.1:{proxy}"
        out = run_agent(tmp_path, ["--server", f"127.0.0.1:{edge}"], {variable: url})
    assert WARNING not in out, out
    assert f"edge 127.0.0.1:{edge}: via proxy 127.0.0.1:{proxy} (from {variable})" in out, out
    assert PASSWORD not in out and "user:" not in out, out


def test_an_unusable_proxy_from_the_environment_is_named_by_its_variable(tmp_path: Path) -> None:
    """ "the agent exits 2 naming the variable or flag": TUNNEL_AGENT_PROXY, not --proxy."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(TUNNEL_AGENT_TOKEN="t", TUNNEL_AGENT_PROXY=f"https://user:{PASSWORD}@proxy:3128")
    done = subprocess.run(
        [str(BIN / "tunnel-agent"), "run", "--sandbox-id", "sb1", "--server", "127.0.0.1:7000"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "TUNNEL_AGENT_PROXY: 'https://***@proxy:3128'" in done.stderr, done.stderr
    assert "--proxy" not in done.stderr.splitlines()[-1], done.stderr
    assert PASSWORD not in done.stderr
