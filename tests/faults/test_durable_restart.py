"""Issue 8, acceptance 1: exposures survive a kill -9 of tunneld.

Three ports exposed through the admin API (one with a custom token), tunneld killed with SIGKILL
and started again on the same state directory: the list is identical, tokens included; the old
preview URLs answer 503 SANDBOX_NOT_CONNECTED (not 404) until the agent is back, then 200.
"""

from __future__ import annotations

import signal

from tests.e2e.procs import Processes
from tests.e2e.test_processes import Forwarder

from .durable import Service, admin, connected, preview, wait


def test_exposures_tokens_and_urls_survive_kill_9(tmp_path) -> None:
    procs = Processes(tmp_path, "uvloop")
    forwarder = Forwarder(None)
    services = [Service() for _ in range(3)]
    try:
        # --url-port 80: the URL does not carry the public port, which changes on restart
        procs.start_edge("--url-port", "80")
        forwarder.target = procs.ports["agent"]
        agent, _ = procs.start_agent_at(f"127.0.0.1:{forwarder.port}", "sb1")
        wait(lambda: connected(procs, "sb1"), what="agent connected")
        bodies = [
            {"port": services[0].port, "token": "keep_me", "name": "web"},
            {"port": services[1].port, "name": "api"},
            {"port": services[2].port},
        ]
        with admin(procs) as a:
            for body in bodies:
                r = a.post("/v1/sandboxes/sb1/ports", json=body)
                assert r.status_code == 200, r.text
            before = a.get("/v1/sandboxes/sb1/ports").json()["ports"]
        assert len(before) == 3
        assert any("-sb1-keep_me.localhost/" in p["exposedAt"] for p in before)
        for p in before:
            assert preview(procs, p["exposedAt"]).text == f"port {p['port']}"

        forwarder.target = None  # the agent cannot reach the new edge until we say so
        assert procs.stop(procs.edge, signal.SIGKILL) == -signal.SIGKILL
        procs.start_edge("--url-port", "80")

        with admin(procs) as a:
            after = a.get("/v1/sandboxes/sb1/ports").json()["ports"]
        assert after == before
        for p in after:
            r = preview(procs, p["exposedAt"])
            assert r.status_code == 503, r.text
            assert r.json()["code"] == "SANDBOX_NOT_CONNECTED"

        forwarder.target = procs.ports["agent"]
        wait(lambda: connected(procs, "sb1"), what="agent reconnected")
        for p in after:
            wait(
                lambda p=p: preview(procs, p["exposedAt"]).status_code == 200,
                timeout=5,
                what=f"{p['exposedAt']} served again",
            )
            assert preview(procs, p["exposedAt"]).text == f"port {p['port']}"
        assert agent.poll() is None
        log = procs.output(procs.edge)
        assert "loaded 3 exposures of 1 sandboxes" in log
        assert "Traceback" not in log
    finally:
        procs.close()
        forwarder.close()
        for s in services:
            s.close()
