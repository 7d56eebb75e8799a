"""docs/agent.md, 'Running it', **Stopping**: SIGTERM or SIGINT stops ``tunnel-agent run``: it logs
``stopping``, ends its session with ``GO_AWAY NORMAL`` (no new streams; the ones in flight get up
to 2 s to finish, then are cut), closes the local API and exits 0; and a local API address it
cannot listen on is one error line and exit 1. A real ``tunneld serve`` and real agents (one per
test: each is stopped), and a local service that answers when the test lets it."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import httpx
import pytest

from tests.e2e.procs import (
    BIN,
    Processes,
    ThreadedHTTPService,
    admin_client,
    preview_get,
    wait_for,
)


class Service(ThreadedHTTPService):
    """An HTTP service on 127.0.0.1: ``GET /held`` is answered once ``release`` is set."""

    def __init__(self) -> None:
        self.arrived = threading.Event()
        self.release = threading.Event()
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/held":
                    service.arrived.set()
                    service.release.wait(30)
                body = b"answered"
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(Handler)

    def close(self) -> None:
        self.release.set()
        super().close()


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    p = Processes(tmp_path_factory.mktemp("agent-doc-run"))
    try:
        p.start_edge()
        yield p
    finally:
        p.close()


@pytest.fixture
def service() -> Iterator[Service]:
    s = Service()
    try:
        yield s
    finally:
        s.close()


def _expose(api_port: int, port: int) -> str:
    r = httpx.post(f"http://127.0.0.1:{api_port}/v1/ports", json={"port": port}, timeout=10)
    assert r.status_code == 200, r.text
    url: str = r.json()["exposedAt"]
    return url


def _connected(p: Processes, sandbox: str) -> bool | None:
    with admin_client(p) as admin:
        for s in admin.get("/v1/sandboxes").json()["sandboxes"]:
            if s["id"] == sandbox:
                return bool(s["connected"])
    return None


def _start_held_request(p: Processes, url: str) -> tuple[threading.Thread, list[object]]:
    """GET /held through ``url`` in a thread; the list gets its response or its exception."""
    outcome: list[object] = []

    def get() -> None:
        try:
            outcome.append(preview_get(p, url, "/held"))
        except Exception as exc:  # the test looks at what it was
            outcome.append(exc)

    thread = threading.Thread(target=get, daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_agent_after_its_request_in_flight_and_it_exits_0(
    procs: Processes, service: Service, sig: signal.Signals
) -> None:
    sandbox = f"stop-{sig.name.lower()}"
    agent, api_port = procs.start_agent(sandbox)
    wait_for(lambda: _connected(procs, sandbox), 15, "the agent to connect")
    url = _expose(api_port, service.port)
    thread, outcome = _start_held_request(procs, url)
    assert service.arrived.wait(15), "the request did not reach the service"
    agent.send_signal(sig)
    wait_for(lambda: "stopping" in procs.output(agent), 15, "the agent to log 'stopping'")
    service.release.set()  # the service answers now, within the agent's drain
    thread.join(15)
    assert not thread.is_alive()
    response = outcome[0]
    assert isinstance(response, httpx.Response), response
    assert (response.status_code, response.content) == (200, b"answered")
    assert agent.wait(15) == 0
    out = procs.output(agent)
    assert "Traceback" not in out, out
    # the edge heard a GO_AWAY NORMAL from the agent, not a lost connection
    assert procs.edge is not None
    edge_log = procs.output(procs.edge)
    assert re.search(
        rf"sandbox {sandbox}\b.* ended after [0-9.]+s: NORMAL by the agent", edge_log
    ), edge_log[-3000:]
    wait_for(lambda: _connected(procs, sandbox) is False, 15, "the edge to list it disconnected")
    # the local API is closed
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", api_port)) != 0


def test_a_request_that_outlasts_the_drain_is_cut_and_the_agent_exits_0(
    procs: Processes, service: Service
) -> None:
    sandbox = "stop-held"
    agent, api_port = procs.start_agent(sandbox)
    wait_for(lambda: _connected(procs, sandbox), 15, "the agent to connect")
    url = _expose(api_port, service.port)
    thread, outcome = _start_held_request(procs, url)
    assert service.arrived.wait(15), "the request did not reach the service"
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(15) == 0  # the service never answers: the stream is cut, not waited on
    thread.join(15)
    assert not thread.is_alive()
    response = outcome[0]
    assert isinstance(response, httpx.Response), response  # an answer from the edge, not a hang
    assert response.status_code == 503, (response.status_code, response.text)
    assert response.json()["code"] == "SANDBOX_NOT_CONNECTED"
    assert "Traceback" not in procs.output(agent)


def test_a_local_api_address_it_cannot_listen_on_is_one_error_line_and_exit_1(
    procs: Processes,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [
                str(BIN / "tunnel-agent"),
                "run",
                "--server",
                f"127.0.0.1:{procs.ports['agent']}",
                "--sandbox-id",
                "stop-api-in-use",
                "--api-port",
                str(port),
            ],
            env=procs.env(TUNNEL_AGENT_TOKEN=procs.token("stop-api-in-use")),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode == 1, (done.stdout, done.stderr)
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, done.stderr
    assert f"cannot serve the local API on 127.0.0.1:{port}: " in errors[0]
    assert "address already in use" in errors[0].lower()
    assert "Traceback" not in done.stderr
    assert _connected(procs, "stop-api-in-use") is None  # it never reached the edge
