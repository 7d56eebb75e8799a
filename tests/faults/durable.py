"""Helpers for the durable-state tests (issue 8): tiny HTTP services, admin calls, a bounded
`tunneld serve` run that is expected to refuse, and waits with deadlines."""

from __future__ import annotations

import os
import shutil
import subprocess
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.procs import (
    BIN,
    Processes,
    ThreadedHTTPService,
    admin_client,
    is_connected,
    preview_get,
    wait_for,
)


class Service(ThreadedHTTPService):
    """A service in the sandbox: answers ``port <n>`` on 127.0.0.1:<port 0>."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = f"port {self.server.server_address[1]}".encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(Handler)


def admin(p: Processes) -> httpx.Client:
    return admin_client(p, timeout=30)


def preview(p: Processes, url: str) -> httpx.Response:
    return preview_get(p, url)


def wait(predicate: Any, timeout: float = 30, what: str = "condition") -> Any:
    return wait_for(predicate, timeout, what)


connected = is_connected


def state_dir(p: Processes) -> Path:
    """The state directory procs.start_edge gives every edge of this test."""
    return p.tmp / "state"


def without_root_powers(argv: list[str]) -> list[str]:
    """Run ``argv`` so that file permissions apply: root ignores them unless it drops
    CAP_DAC_OVERRIDE (a non-root runner needs nothing)."""
    if os.geteuid() != 0:
        return argv
    setpriv = shutil.which("setpriv")
    assert setpriv, "running as root needs setpriv (util-linux) to test permissions"
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner", "--", *argv]


def serve_refused(p: Processes, *args: str, root_powers: bool = True) -> tuple[int, str]:
    """Run `tunneld serve` expecting it to refuse to start: (exit code, output). A tunneld that
    starts instead is killed after 20 s and fails the caller's exit-code assertion."""
    argv = [
        str(BIN / "tunneld"), "serve", "--public-port", "0", "--agent-port", "0",
        "--admin-port", "0", "--state-dir", str(state_dir(p)), *args,
    ]  # fmt: skip
    if not root_powers:
        argv = without_root_powers(argv)
    env = p.env(TUNNELD_ADMIN_TOKEN=p.admin_token, TUNNELD_SECRET=p.secret)
    try:
        out = subprocess.run(argv, env=env, capture_output=True, timeout=20)
    except subprocess.TimeoutExpired as exc:
        return -1, (exc.stderr or b"").decode(errors="replace")
    return out.returncode, (out.stdout + out.stderr).decode(errors="replace")
