"""The agent's local API is never reachable through the tunnel, whatever port it listens on.

Row 7 of the hardening issue: with ``--api-port`` other than 3000, exposing that port used to hand
anyone with the preview URL the whole local API (every URL with its token, and expose/unexpose).
"""

from __future__ import annotations

import asyncio
import subprocess
import time

import httpx
import pytest

from agent.errors import AgentError
from protocol.errors import ResetCode
from protocol.events import StreamAccepted, StreamReset
from relay.httpapi import Request
from tests.e2e.conftest import wait_until
from tests.e2e.procs import BIN, Processes

from .hostile_edge import hostile_edge

pytestmark = pytest.mark.anyio

REQUEST = b"GET /v1/ports HTTP/1.1\r\nhost: localhost:3000\r\nconnection: close\r\n\r\n"


async def test_hostile_edge_cannot_open_a_stream_to_the_api_port() -> None:
    async with hostile_edge() as (edge, agent):
        api = await agent.serve_local_api("127.0.0.1", 0)
        try:
            for via in ("direct", "preview"):
                sid = edge.open(api.port, via, REQUEST)
                event = await edge.outcome(sid)
                assert isinstance(event, StreamReset), f"{via} stream to the API port accepted"
                assert event.code == ResetCode.PORT_NOT_ALLOWED
        finally:
            await api.close()


async def test_exposing_the_api_port_is_refused_by_the_local_api() -> None:
    async with hostile_edge() as (_edge, agent):
        api = await agent.serve_local_api("127.0.0.1", 0)
        port = api.port
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                response = await client.post("/v1/ports", json={"port": port})
                legacy = await client.post("/api/expose-port", json={"port": port})
            with pytest.raises(AgentError, match="Invalid port number") as refused:
                await agent.expose(port)
            assert refused.value.status == 400
        finally:
            await api.close()
    assert response.status_code == 400, response.text
    assert response.json() == {
        "error": f"Invalid port number: {port}. Must be 1024-65535, excluding 3000 and "
        f"{port} (the tunnel agent's control API).",
        "code": "INVALID_PORT",
    }
    assert legacy.status_code == 400
    assert legacy.json()["code"] == "INVALID_PORT_NUMBER"


@pytest.mark.parametrize(
    "header",
    [
        b"x-forwarded-for: 203.0.113.9",
        b"X-Forwarded-Host: 8000-sb1-abc.example.com",
        b"forwarded: for=203.0.113.9",
    ],
)
async def test_local_api_refuses_forwarded_requests(header: bytes) -> None:
    async with hostile_edge() as (_edge, agent):
        api = await agent.serve_local_api("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
            writer.write(REQUEST.replace(b"\r\n\r\n", b"\r\n" + header + b"\r\n\r\n"))
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
        finally:
            await api.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 "), answer
    assert b'"code":"FORBIDDEN"' in body and b"tunnel" in body


async def test_local_api_refuses_a_peer_that_is_one_of_the_agents_own_streams() -> None:
    """Defence in depth: even if a stream reached the API port, the API knows the peer socket."""
    async with hostile_edge() as (edge, agent):
        api = await agent.serve_local_api("127.0.0.1", 0)
        agent.api_port = None  # forget the port refusal, as a bug elsewhere might
        try:
            sid = edge.open(api.port, "direct", REQUEST.replace(b"ports", b"status"))
            assert isinstance(await edge.outcome(sid), StreamAccepted)
            answer = await edge.read_stream(sid)
        finally:
            await api.close()
    assert answer.startswith(b"HTTP/1.1 403 "), answer
    assert b'"code":"FORBIDDEN"' in answer


def test_agent_process_with_api_port_refuses_it_everywhere(tmp_path) -> None:
    """Real processes: `run --api-port 0`, then the CLI, the admin API and a preview URL."""
    procs = Processes(tmp_path)
    try:
        ports = procs.start_edge()
        _agent, api_port = procs.start_agent("sb1")
        api = f"http://127.0.0.1:{api_port}"
        cli = subprocess.run(
            [str(BIN / "tunnel-agent"), "--api", api, "expose", str(api_port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert cli.returncode == 1, cli
        assert f"Invalid port number: {api_port}." in cli.stderr
        assert "(INVALID_PORT)" in cli.stderr

        # The edge cannot know the agent's API port: it asks the agent, which refuses it, so the
        # admin API answers 400 and keeps nothing (a preview URL of an exposure the edge already
        # held: tests/faults/test_agent_api_port_admin_expose.py).
        with httpx.Client(
            base_url=f"http://127.0.0.1:{ports['admin']}",
            headers={"authorization": f"Bearer {procs.admin_token}"},
            timeout=10,
        ) as admin:
            deadline = time.monotonic() + 15
            while not any(s["connected"] for s in admin.get("/v1/sandboxes").json()["sandboxes"]):
                assert time.monotonic() < deadline, "the agent did not connect"
                time.sleep(0.05)
            exposed = admin.post("/v1/sandboxes/sb1/ports", json={"port": api_port})
            assert exposed.status_code == 400, exposed.text
            assert exposed.json()["code"] == "INVALID_PORT"
            assert "control API" in exposed.json()["error"]
            assert admin.get("/v1/sandboxes/sb1/ports").json() == {"ports": []}
    finally:
        procs.close()


async def test_a_client_sharing_a_streams_local_address_is_not_taken_for_the_tunnel() -> None:
    """Linux gives connections to different destinations the same ephemeral port, so a client
    of the API may come from the very (address, port) of a socket the agent dialled for a
    stream to a service. Only a socket dialled to the API's own port is the tunnel: with the
    address alone, an agent holding many streams answered its own CLI 403 FORBIDDEN at random
    (tests/faults/test_agent_fd_raise.py failed so in CI, 200 streams held)."""
    peers: list[tuple[str, int]] = []

    def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer.get_extra_info("peername")[:2])

    service = await asyncio.start_server(accepted, "127.0.0.1", 0)
    service_port = service.sockets[0].getsockname()[1]
    async with hostile_edge() as (edge, agent):
        api = await agent.serve_local_api("127.0.0.1", 0)
        try:
            agent.exposures.add(service_port)
            sid = edge.open(service_port, "direct", b"")
            assert isinstance(await edge.outcome(sid), StreamAccepted)
            await wait_until(lambda: peers, 10, "the service to accept the agent's socket")
            [local] = peers  # the agent's socket's own address, as a client of the API may have

            def request(peer: tuple[str, int]) -> Request:
                headers = [(b"host", b"localhost")]
                return Request("GET", "/v1/status", "/v1/status", "", headers, headers, b"", peer)

            assert api._refusal(request(local)) is None  # before: 403 FORBIDDEN, "tunnel"
            # A stream dialled to the API's own port is still the tunnel (as a bug elsewhere
            # might let one through: the refusal of that port forgotten).
            agent.api_port = None
            tunnel = edge.open(api.port, "direct", b"")
            assert isinstance(await edge.outcome(tunnel), StreamAccepted)
            [through] = [a for a, s in agent.dialled.items() if ("127.0.0.1", api.port) in s]
            refusal = api._refusal(request(through))
            assert refusal is not None and refusal.code == "FORBIDDEN"
            for stream in (sid, tunnel):
                edge.session.reset_stream(stream, ResetCode.CANCEL)
            edge.flush()
            await wait_until(lambda: not agent.dialled, 10, "the streams' sockets forgotten")
        finally:
            await api.close()
            service.close()
