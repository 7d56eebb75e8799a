"""Real ``tunneld`` and ``tunnel-agent`` processes for the tests that are about processes.

A child's stdout and stderr go to a log file in the test's tmp directory, never to a pipe: nobody
reads a pipe while the child runs, so a child that logs more than the pipe buffer would block in
``write()`` and the test would hang on something that is not the behaviour under test.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

BIN = Path(sys.executable).parent


def wait_for_file(
    path: Path, proc: subprocess.Popen[bytes], timeout: float = 15, log: Path | None = None
) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        if proc.poll() is not None:
            out = log.read_text(errors="replace") if log is not None and log.exists() else ""
            raise RuntimeError(f"process exited with {proc.returncode}: {out}")
        time.sleep(0.02)
    raise TimeoutError(f"{path} did not appear")


# The agent honours the proxy variables (agent/proxy.py); a developer's or CI's own proxy must
# not reroute the suite's loopback edges. Tests that want a proxy set their own.
PROXY_VARIABLES = (
    "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
    "no_proxy", "NO_PROXY", "TUNNEL_AGENT_PROXY",
)  # fmt: skip


class Processes:
    """tunneld + agents as child processes; every process is killed on close()."""

    def __init__(self, tmp: Path, loop: str = "uvloop", *extra_args: str) -> None:
        self.tmp = tmp
        self.loop = loop
        self.admin_token = secrets.token_urlsafe(16)
        self.secret = secrets.token_urlsafe(16)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, Path] = {}  # pid -> the file holding the child's stdout and stderr
        self.extra_args = extra_args
        self.ports: dict[str, int] = {}
        self.edge: subprocess.Popen[bytes] | None = None

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        for name in PROXY_VARIABLES:  # children too: no outside proxy on loopback edges
            env.pop(name, None)
        env["TUNNEL_LOOP"] = self.loop
        env["PYTHONUNBUFFERED"] = "1"
        env["TUNNELD_NODE_PORT"] = "0"  # a cluster node's link listener (Redis store): any port
        env.update(extra)
        return env

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{name}-{len(self.procs)}.log"
        with log.open("wb") as out:  # the child holds its own descriptor; ours closes here
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        self.logs[proc.pid] = log
        return proc

    def start_edge(self, *args: str, env: dict[str, str] | None = None) -> dict[str, int]:
        ports_file = self.tmp / f"edge-{len(self.procs)}.json"
        self.edge = self._spawn(
            "edge",
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
                "--state-dir",  # one per test, kept across restarts; never the user's own
                str(self.tmp / "state"),
                *self.extra_args,
                *args,
            ],
            env or self.env(TUNNELD_ADMIN_TOKEN=self.admin_token, TUNNELD_SECRET=self.secret),
        )
        self.ports = wait_for_file(ports_file, self.edge, log=self.logs[self.edge.pid])
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
        self, sandbox_id: str = "sb1", scheme: str = "", extra: Sequence[str] = ()
    ) -> tuple[subprocess.Popen[bytes], int]:
        return self.start_agent_at(f"{scheme}127.0.0.1:{self.ports['agent']}", sandbox_id, extra)

    def start_agent_at(
        self, server: str, sandbox_id: str = "sb1", extra: Sequence[str] = ()
    ) -> tuple[subprocess.Popen[bytes], int]:
        """An agent dialling ``server`` (``[ws://|wss://]host:port``); ``extra``: more of
        ``tunnel-agent run``'s options."""
        ports_file = self.tmp / f"agent-{len(self.procs)}.json"
        proc = self._spawn(
            "agent",
            [
                str(BIN / "tunnel-agent"),
                "run",
                "--server",
                server,
                "--sandbox-id",
                sandbox_id,
                "--api-port",
                "0",
                *extra,
            ],
            self.env(
                TUNNEL_AGENT_TOKEN=self.token(sandbox_id), TUNNEL_AGENT_PORTS_FILE=str(ports_file)
            ),
        )
        api_port = wait_for_file(ports_file, proc, log=self.logs[proc.pid])["api"]
        return proc, api_port

    def stop(
        self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15
    ) -> int:
        if proc.poll() is None:
            proc.send_signal(sig)
        return proc.wait(timeout)

    def output(self, proc: subprocess.Popen[bytes]) -> str:
        """What the child wrote to stdout and stderr so far (all of it once it exited)."""
        return self.logs[proc.pid].read_text(errors="replace")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


# -- helpers for tests that drive these processes over HTTP ---------------------------------------
def admin_client(p: Processes, timeout: float = 10) -> httpx.Client:
    """An admin API client of ``p``'s edge, with its token."""
    return httpx.Client(
        base_url=f"http://127.0.0.1:{p.ports['admin']}",
        headers={"authorization": f"Bearer {p.admin_token}"},
        timeout=timeout,
    )


def preview_get(p: Processes, url: str, path: str = "/") -> httpx.Response:
    """GET ``path`` through ``url``'s preview host on ``p``'s current public port."""
    host = url.split("//", 1)[1].split("/", 1)[0]
    return httpx.get(
        f"http://127.0.0.1:{p.ports['public']}{path}", headers={"host": host}, timeout=10
    )


def wait_for(predicate: Any, timeout: float = 15, what: str = "condition") -> Any:
    """Poll ``predicate`` until it is truthy (returned) or ``timeout`` passes (AssertionError)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def is_connected(p: Processes, sandbox: str) -> bool:
    """True when ``p``'s edge lists ``sandbox`` as connected."""
    with admin_client(p) as admin:
        sandboxes = admin.get("/v1/sandboxes").json()["sandboxes"]
    return any(s["id"] == sandbox and s["connected"] for s in sandboxes)


class ThreadedHTTPService:
    """An HTTP service on 127.0.0.1 (port 0) that ``handler`` (a BaseHTTPRequestHandler class)
    answers, each request on a thread of its own, until ``close``."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
