"""Real ``tunneld`` and ``tunnel-agent`` processes for the tests that are about processes."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def wait_for_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise RuntimeError(f"process exited with {proc.returncode}: {out}")
        time.sleep(0.02)
    raise TimeoutError(f"{path} did not appear")


class Processes:
    """tunneld + agents as child processes; every process is killed on close()."""

    def __init__(self, tmp: Path, loop: str = "uvloop", *extra_args: str) -> None:
        self.tmp = tmp
        self.loop = loop
        self.admin_token = secrets.token_urlsafe(16)
        self.secret = secrets.token_urlsafe(16)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.extra_args = extra_args
        self.ports: dict[str, int] = {}
        self.edge: subprocess.Popen[bytes] | None = None

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["TUNNEL_LOOP"] = self.loop
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra)
        return env

    def start_edge(self, *args: str, env: dict[str, str] | None = None) -> dict[str, int]:
        ports_file = self.tmp / f"edge-{len(self.procs)}.json"
        self.edge = subprocess.Popen(
            [
                str(BIN / "tunneld"),
                "serve",
                "--public-port",
                "0",
                "--agent-port",
                "0",
                "--admin-port",
                "0",
                "--ports-file",
                str(ports_file),
                "--grace-period",
                "5",
                *self.extra_args,
                *args,
            ],
            env=env or self.env(TUNNELD_ADMIN_TOKEN=self.admin_token, TUNNELD_SECRET=self.secret),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(self.edge)
        self.ports = wait_for_file(ports_file, self.edge)
        return self.ports

    def token(self, sandbox_id: str) -> str:
        out = subprocess.run(
            [str(BIN / "tunneld"), "token", sandbox_id],
            env=self.env(TUNNELD_SECRET=self.secret),
            capture_output=True,
            check=True,
            timeout=30,
        )
        return out.stdout.decode().strip()

    def start_agent(
        self, sandbox_id: str = "sb1", scheme: str = ""
    ) -> tuple[subprocess.Popen[bytes], int]:
        ports_file = self.tmp / f"agent-{len(self.procs)}.json"
        proc = subprocess.Popen(
            [
                str(BIN / "tunnel-agent"),
                "run",
                "--server",
                f"{scheme}127.0.0.1:{self.ports['agent']}",
                "--sandbox-id",
                sandbox_id,
                "--api-port",
                "0",
            ],
            env=self.env(
                TUNNEL_AGENT_TOKEN=self.token(sandbox_id), TUNNEL_AGENT_PORTS_FILE=str(ports_file)
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        api_port = wait_for_file(ports_file, proc)["api"]
        return proc, api_port

    def stop(
        self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15
    ) -> int:
        if proc.poll() is None:
            proc.send_signal(sig)
        return proc.wait(timeout)

    def output(self, proc: subprocess.Popen[bytes]) -> str:
        assert proc.poll() is not None, "read output only after the process exited"
        return proc.stdout.read().decode() if proc.stdout else ""

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            if proc.stdout:
                proc.stdout.close()
