"""An orchestrator's expose of the agent's own control API port is refused, not acknowledged.

The edge does not know the agent's API port (``--api-port``): it used to store the exposure, push
it to the agent, get its ``ok`` and answer 200 with a preview URL whose every stream the agent
then reset. The agent now answers that ``expose`` with ``error`` ``INVALID_PORT``; the edge
removes the exposure (from its store too) and answers 400 ``INVALID_PORT``. An exposure of that
port the edge already holds (made while the agent was offline, or stored before) reaches the
agent in its welcome: the agent logs it, does not serve it, and unexposes it, so the edge removes
it from its list and store.

Real processes and sockets (an edge, an agent, an HTTP origin, the ``tunnel-agent`` CLI), and a
scripted edge for the agent's reply itself.
"""

from __future__ import annotations

import asyncio
import http.server
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.core import Agent, AgentConfig
from protocol import control
from protocol.events import ControlReceived, StreamReset
from tests.e2e.procs import Processes, admin_client, is_connected, preview_get, wait_for

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


def test_an_exposure_of_the_api_port_made_offline_is_removed_when_the_agent_connects(
    tmp_path: Path, origin: int
) -> None:
    """Exposed while the agent was offline (the edge cannot know the port then): 200 and
    stored. The agent's welcome carries it; the agent says so in its log, never serves it and
    unexposes it, so the edge's list, its store (a restarted edge) and the preview URL no longer
    have it, while another port exposed offline with it stays and is served."""
    procs = Processes(tmp_path)
    try:
        procs.start_edge()
        port = _free_port()
        with admin_client(procs) as admin:
            offline = admin.post("/v1/sandboxes/sb1/ports", json={"port": port})
            assert offline.status_code == 200, offline.text
            other = admin.post("/v1/sandboxes/sb1/ports", json={"port": origin})
            assert other.status_code == 200, other.text
        agent, api_port = procs.start_agent("sb1", extra=["--api-port", str(port)])
        assert api_port == port
        wait_for(lambda: is_connected(procs, "sb1"), what="the agent to connect")

        def listed() -> list[int]:
            with admin_client(procs) as admin:
                return [p["port"] for p in admin.get("/v1/sandboxes/sb1/ports").json()["ports"]]

        wait_for(lambda: listed() == [origin], what=f"port {port} to leave the list")
        warning = (
            f"the edge lists port {port} as exposed, but it is this agent's own control API: "
            "not served (preview requests to it are refused); asking the edge to remove that "
            "exposure"
        )
        assert warning in procs.output(agent)
        wait_for(
            lambda: f"the edge removed its exposure of port {port}" in procs.output(agent),
            what="the agent's note of the removal",
        )
        assert procs.edge is not None
        assert f"sandbox sb1: port {port} unexposed by the agent" in procs.output(procs.edge)

        gone = preview_get(procs, offline.json()["exposedAt"], "/v1/ports")
        assert gone.status_code == 404, gone.text  # the URL is gone, never the local API
        page = preview_get(procs, other.json()["exposedAt"])
        assert (page.status_code, page.text) == (200, "hello from the origin")
        assert procs.stop(agent, signal.SIGTERM) == 0

        # Removed from the store too: a restarted edge (same state directory) has only the
        # other port.
        assert procs.stop(procs.edge) == 0
        procs.start_edge()
        assert listed() == [origin]
    finally:
        procs.close()


# 256 control characters, 6 bytes each once JSON-escaped: ~40 such exposures fill a welcome
# (tests/faults/test_durable_welcome_worst_case.py), the rest follow it as expose requests.
_LONG_NAME = "\u0001" * 256


def test_an_api_port_exposure_past_the_welcome_is_removed_when_the_agent_refuses_it(
    tmp_path: Path,
) -> None:
    """Too many exposures for one welcome: the edge sends the rest as expose requests, and the
    agent answers the one of its API port (stored while it was offline) with INVALID_PORT. The
    edge removes that exposure (its list and its store) and logs why, once; every other port
    stays."""
    procs = Processes(tmp_path)
    try:
        procs.start_edge()
        api_port = _free_port()
        others = list(range(1100, 1160))
        assert api_port > others[-1]  # it sorts last: past the welcome
        with admin_client(procs) as admin:
            for port in [*others, api_port]:
                r = admin.post("/v1/sandboxes/sb1/ports", json={"port": port, "name": _LONG_NAME})
                assert r.status_code == 200, r.text
        agent, _ = procs.start_agent("sb1", extra=["--api-port", str(api_port)])
        wait_for(lambda: is_connected(procs, "sb1"), what="the agent to connect")

        def listed() -> list[int]:
            with admin_client(procs) as admin:
                return [p["port"] for p in admin.get("/v1/sandboxes/sb1/ports").json()["ports"]]

        wait_for(lambda: listed() == others, what=f"port {api_port} to leave the list")
        assert procs.edge is not None
        edge_log = procs.output(procs.edge)
        assert "follow as expose requests" in edge_log
        refused = (
            f"sandbox sb1: the agent refused the expose of port {api_port} (INVALID_PORT: "
            f"Invalid port number: {api_port}."
        )
        assert edge_log.count(refused) == 1, edge_log
        assert "not acknowledged" not in edge_log  # a refusal, handled: not a failure
        assert "this agent's own control API; refused" in procs.output(agent)
        assert procs.stop(agent, signal.SIGTERM) == 0

        assert procs.stop(procs.edge) == 0  # and not in the store either
        procs.start_edge()
        assert listed() == others
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


@pytest.mark.anyio
async def test_the_agent_unexposes_its_api_port_when_the_welcome_lists_it() -> None:
    """On the wire: a welcome that lists the local API's port (an exposure made while the agent
    was offline) is answered with the agent's own ``unexpose`` of it, the one way after a
    welcome to have the edge drop it; the other port is served as usual."""
    edge = HostileEdge()
    server = await asyncio.get_running_loop().create_server(lambda: edge, "127.0.0.1", 0)
    agent = Agent(AgentConfig("127.0.0.1", server.sockets[0].getsockname()[1], "sb1", "t"))
    api = await agent.serve_local_api("127.0.0.1", 0)  # bound before it connects, as `run` does
    edge.exposures = HostileEdge([api.port, 8000]).exposures  # what its welcome lists
    try:
        await agent.connect_once()
        assert agent.exposures == {8000}
        request = None
        while request is None:  # bounded by the events' timeout
            event = await _next_control(edge)
            if isinstance(event.message, control.Unexpose):
                request = event.message
        assert request.port == api.port
        assert list(edge.exposures) == [8000]  # the scripted edge dropped it and said ok
        assert agent.exposures == {8000}
    finally:
        await agent.stop()
        await api.close()
        server.close()
        if edge.transport is not None:
            edge.transport.close()
        await server.wait_closed()


async def _next_control(edge: HostileEdge) -> ControlReceived:
    async with asyncio.timeout(10):
        while True:
            event = await edge.events.get()
            if isinstance(event, ControlReceived):
                return event
