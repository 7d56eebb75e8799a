"""The agent's own API port gets one answer, whoever asks: the CLI, the local API, the admin API.

Real processes (an edge, an agent with ``--api-port 0``, the ``tunnel-agent`` CLI). ``expose`` and
``wait`` of that port are refused with 400 ``INVALID_PORT`` (exit 1 for the CLI): ``wait`` used to
say ``INVALID_PORT_NUMBER`` (the legacy container's code) where ``expose`` said ``INVALID_PORT``.
The admin API's expose of it is refused the same way (the agent refuses the edge's ``expose``).
``unexpose`` of it succeeds: the edge cannot know the agent's API port while the agent is
offline, so it may hold such an exposure, and the sandbox must be able to take it away again.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.e2e.procs import BIN, Processes, admin_client


def _cli(api: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "tunnel-agent"), "--api", api, *argv],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_the_api_port_gets_the_same_code_from_the_cli_and_the_admin_api(tmp_path: Path) -> None:
    procs = Processes(tmp_path)
    try:
        procs.start_edge()
        _agent, api_port = procs.start_agent("sb1")
        api = f"http://127.0.0.1:{api_port}"
        refused = (
            f"error: Invalid port number: {api_port}. Must be 1024-65535, excluding 3000 and "
            f"{api_port} (the tunnel agent's control API). (INVALID_PORT)\n"
        )
        for argv in (("expose", str(api_port)), ("wait", str(api_port), "--timeout", "1")):
            done = _cli(api, *argv)
            assert (done.returncode, done.stdout, done.stderr) == (1, "", refused), argv

        with admin_client(procs) as admin:
            deadline = time.monotonic() + 15
            while not any(s["connected"] for s in admin.get("/v1/sandboxes").json()["sandboxes"]):
                assert time.monotonic() < deadline, "the agent did not connect"
                time.sleep(0.05)
            waited = admin.post(
                f"/v1/sandboxes/sb1/ports/{api_port}/wait", json={"mode": "tcp", "timeout": 1}
            )
            assert waited.status_code == 400, waited.text
            assert waited.json()["code"] == "INVALID_PORT"
            assert "control API" in waited.json()["error"]

            # The edge does not know the port: the agent refuses its expose, with the same code.
            exposed = admin.post("/v1/sandboxes/sb1/ports", json={"port": api_port})
            assert exposed.status_code == 400, exposed.text
            assert exposed.json()["code"] == "INVALID_PORT"
            assert "control API" in exposed.json()["error"]
            done = _cli(api, "unexpose", str(api_port))
            assert (done.returncode, done.stdout, done.stderr) == (
                0,
                f"port {api_port} is no longer exposed\n",
                "",
            )
            assert admin.get("/v1/sandboxes/sb1/ports").json()["ports"] == []
    finally:
        procs.close()
