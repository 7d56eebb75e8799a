"""An orchestrator's expose of the agent's own control API port is refused, not acknowledged.

The edge does not know the agent's API port (``--api-port``): it used to store the exposure, push
it to the agent, get its ``ok`` and answer 200 with a preview URL whose every stream the agent
then reset. The agent now answers that ``expose`` with ``error`` ``INVALID_PORT``; the edge
removes the exposure (from its store too) and answers 400 ``INVALID_PORT``. An exposure of that
port the edge already holds (made while the agent was offline, or stored before) reaches the
agent in its welcome: the agent logs it and does not serve it.

Real processes and sockets (an edge, an agent, an HTTP origin, the ``tunnel-agent`` CLI), and a
scripted edge for the agent's reply itself.
"""

from __future__ import annotations

import asyncio
import http.server
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol import control
from protocol.events import ControlReceived, StreamReset
from tests.e2e.procs import BIN, Processes, admin_client, is_connected, preview_get, wait_for

from .hostile_edge import HostileEdge, hostile_edge


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello from the origin"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def origin() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _refusal(api_port: int) -> dict[str, str]:
    return {
        "code": "INVALID_PORT",
        "error": f"The agent refused: Invalid port number: {api_port}. Must be 1024-65535, "
        f"excluding 3000 and {api_port} (the tunnel agent's control API). "
        f"Port {api_port} is not exposed.",
    }


def test_admin_expose_of_the_agent_api_port_is_400_and_not_stored(
    tmp_path: Path, origin: int
) -> None:
    procs = Processes(tmp_path)
    try:
        procs.start_edge()
        agent, api_port = procs.start_agent("sb1")
        wait_for(lambda: is_connected(procs, "sb1"), what="the agent to connect")
        with admin_client(procs) as admin:
            refused = admin.post("/v1/sandboxes/sb1/ports", json={"port": api_port})
            assert refused.status_code == 400, refused.text
            assert refused.headers["content-type"].startswith("application/json")
            assert refused.json() == _refusal(api_port)
            assert admin.get("/v1/sandboxes/sb1/ports").json() == {"ports": []}
            # Again, with a name and a token: the same answer, still nothing stored.
            again = admin.post(
                "/v1/sandboxes/sb1/ports", json={"port": api_port, "name": "api", "token": "tk"}
            )
            assert (again.status_code, again.json()) == (400, _refusal(api_port))

            # A normal port still works, end to end.
            exposed = admin.post("/v1/sandboxes/sb1/ports", json={"port": origin})
            assert exposed.status_code == 200, exposed.text
            page = preview_get(procs, exposed.json()["exposedAt"])
            assert (page.status_code, page.text) == (200, "hello from the origin")
            listed = admin.get("/v1/sandboxes/sb1/ports").json()["ports"]
            assert [p["port"] for p in listed] == [origin]
        assert "this agent's own control API; refused" in procs.output(agent)

        # Nothing was stored either: a restarted edge (same state directory) has only the
        # normal port.
        assert procs.edge is not None
        assert procs.stop(procs.edge) == 0
        procs.start_edge()
        with admin_client(procs) as admin:
            listed = admin.get("/v1/sandboxes/sb1/ports").json()["ports"]
        assert [p["port"] for p in listed] == [origin]
    finally:
        procs.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_a_stored_exposure_of_the_api_port_is_logged_and_not_served(tmp_path: Path) -> None:
    """Exposed while the agent was offline (the edge cannot know the port then): the agent's
    welcome carries it; the agent says so in its log, refuses its preview streams, and the
    sandbox can remove it."""
    procs = Processes(tmp_path)
    try:
        procs.start_edge()
        port = _free_port()
        with admin_client(procs) as admin:
            offline = admin.post("/v1/sandboxes/sb1/ports", json={"port": port})
            assert offline.status_code == 200, offline.text
        agent, api_port = procs.start_agent("sb1", extra=["--api-port", str(port)])
        assert api_port == port
        wait_for(lambda: is_connected(procs, "sb1"), what="the agent to connect")
        warning = f"the edge lists port {port} as exposed, but it is this agent's own control API"
        wait_for(lambda: warning in procs.output(agent), what="the agent's warning")

        page = preview_get(procs, offline.json()["exposedAt"], "/v1/ports")
        assert page.status_code == 502, page.text  # never the local API's answer
        assert "exposedAt" not in page.text

        done = subprocess.run(
            [str(BIN / "tunnel-agent"), "--api", f"http://127.0.0.1:{port}", "unexpose", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert (done.returncode, done.stderr) == (0, ""), done
        with admin_client(procs) as admin:
            assert admin.get("/v1/sandboxes/sb1/ports").json() == {"ports": []}
        assert procs.stop(agent, signal.SIGTERM) == 0
    finally:
        procs.close()


@pytest.mark.anyio
async def test_the_agent_answers_an_edge_expose_of_its_api_port_with_an_error() -> None:
    async with hostile_edge() as (edge, agent):
        api = await agent.serve_local_api("127.0.0.1", 0)
        try:
            edge.tell(control.Expose(7, api.port))
            reply = None
            while reply is None:  # bounded by the events' timeout below
                event = await _next_control(edge)
                if isinstance(event.message, (control.Ok, control.Error)):
                    reply = event.message
            assert reply == control.Error(
                "INVALID_PORT",
                f"Invalid port number: {api.port}. Must be 1024-65535, excluding 3000 and "
                f"{api.port} (the tunnel agent's control API).",
                7,
            )
            assert api.port not in agent.exposures
            # A list reply that names it (this scripted edge kept the exposure it told) does not
            # make it served.
            assert [e.port for e in await agent.list_exposures()] == [api.port]
            assert api.port not in agent.exposures
            sid = edge.open(api.port, "preview", b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            assert isinstance(await edge.outcome(sid), StreamReset)
        finally:
            await api.close()


async def _next_control(edge: HostileEdge) -> ControlReceived:
    async with asyncio.timeout(10):
        while True:
            event = await edge.events.get()
            if isinstance(event, ControlReceived):
                return event
