"""A hostile (or broken) edge cannot make the agent run out of file descriptors.

Every stream the agent dials holds a descriptor, and an edge may open up to its session's stream
limit (32768) at once, while a sandbox's RLIMIT_NOFILE is often 1024. Before the local connection
limit, a real ``tunnel-agent run`` with RLIMIT_NOFILE 256 dialled streams until ``socket()``
failed with EMFILE: its local control API then answered nothing (uvloop closed every accepted
connection; asyncio logged a traceback per ``accept()`` retry, thousands a second), and
the streams past the limit were reset CONNECT_FAILED ("nothing is listening on the port").

docs/agent.md, What the agent dials: the agent holds at most ``--max-connections`` local
connections (default: the soft RLIMIT_NOFILE minus 160, at least a quarter of it, at most 4096);
a stream past it is reset with REFUSED_STREAM before any dial, with a rate-limited warning, the
link and the local API keep working, and the edge answers a public client 503 ``SANDBOX_BUSY``.

Real sockets on 127.0.0.1: a scripted edge (the sans-IO session), a service that holds every
connection open, and the agent as a real process (``test_agent_process_*``) or in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from agent.core import (
    FD_RESERVE,
    MAX_CONNECTIONS_CAP,
    Agent,
    AgentConfig,
    default_max_connections,
)
from protocol import control
from protocol.errors import ResetCode
from protocol.events import ControlReceived, StreamAccepted, StreamReset
from relay.budget import LOG_BURST
from tests.e2e.conftest import wait_until
from tests.e2e.procs import PROXY_VARIABLES

from .conftest import Stack, raw_request
from .hostile_edge import HostileEdge, hostile_edge

pytestmark = pytest.mark.anyio

NOFILE = 256  # the agent process's RLIMIT_NOFILE (soft and hard)
STREAMS = 400  # more than NOFILE: without a limit, the agent runs out of descriptors
HELLO = b"hello again"


class Holder:
    """A service that accepts every connection and holds it open, echoing what it reads."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=1024)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while data := await reader.read(65536):
                writer.write(data)
        except ConnectionError:
            pass
        finally:
            writer.close()

    def close(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        if self.server is not None:
            self.server.close()


async def _outcomes(edge: HostileEdge, sids: list[int], timeout: float = 20) -> list[object]:
    """The first StreamAccepted / StreamReset of every stream of ``sids``."""
    wanted = set(sids)
    seen: dict[int, object] = {}
    async with asyncio.timeout(timeout):
        while len(seen) < len(wanted):
            event = await edge.events.get()
            if isinstance(event, (StreamAccepted, StreamReset)):
                sid = event.stream_id
                if sid in wanted and sid not in seen:
                    seen[sid] = event
    return list(seen.values())


async def _echo(edge: HostileEdge, port: int, attempts: int = 200) -> bytes:
    """Open streams to ``port`` until one is accepted (the agent frees its slots as the held
    connections close), then read back the echo of what it sent."""
    for _ in range(attempts):
        sid = edge.open(port, data=HELLO)
        event = await edge.outcome(sid)
        if isinstance(event, StreamAccepted):
            return await edge.read_stream(sid, limit=len(HELLO))
        assert isinstance(event, StreamReset), event
        assert event.code == ResetCode.REFUSED_STREAM, event
        await asyncio.sleep(0.05)
    raise AssertionError(f"no stream accepted in {attempts} attempts")


def _reset_all(edge: HostileEdge, sids: list[int]) -> None:
    for sid in sids:  # a no-op for the refused ones: they are gone already
        edge.session.reset_stream(sid, ResetCode.CANCEL)
    edge.flush()


def _limits(soft: int, hard: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return apply


def _start(
    tmp_path: Path, edge_port: int, soft: int, hard: int, *extra: str, loop: str = "uvloop"
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    ports_file = tmp_path / "agent.json"
    log_file = tmp_path / "agent.log"
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}
    env.update(
        TUNNEL_AGENT_TOKEN="t",
        TUNNEL_AGENT_PORTS_FILE=str(ports_file),
        TUNNEL_LOOP=loop,
        PYTHONUNBUFFERED="1",
    )
    argv = [sys.executable, "-m", "agent", "run", "--server", f"127.0.0.1:{edge_port}"]
    argv += ["--sandbox-id", "sb1", "--api-port", "0", *extra]
    with log_file.open("wb") as out:
        proc = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_limits(soft, hard)
        )
    return proc, ports_file, log_file


async def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.terminate()
    try:
        return await asyncio.to_thread(proc.wait, 15)
    finally:
        if proc.poll() is None:
            proc.kill()
            await asyncio.to_thread(proc.wait, 10)


async def _stop_all(
    proc: subprocess.Popen[bytes], holder: Holder, server: asyncio.Server, edge: HostileEdge
) -> None:
    """The end of a test with an agent process: it, the service, the edge's server and link."""
    await _stop(proc)
    holder.close()
    server.close()
    if edge.transport is not None:
        edge.transport.close()


def _wait_for_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        assert proc.poll() is None, f"the agent exited with {proc.returncode}"
        time.sleep(0.02)
    raise TimeoutError(f"{path} did not appear")


async def _hello(edge: HostileEdge, timeout: float = 15) -> None:
    async with asyncio.timeout(timeout):
        while True:
            event = await edge.events.get()
            if isinstance(event, ControlReceived) and isinstance(event.message, control.Hello):
                return


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the test's loop: any one will do
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])  # the agent process's
async def test_agent_process_refuses_streams_past_its_connection_limit_and_keeps_serving(
    tmp_path: Path, loop: str
) -> None:
    holder = Holder()
    port = await holder.start()
    edge = HostileEdge([port])
    server = await asyncio.get_running_loop().create_server(lambda: edge, "127.0.0.1", 0)
    edge_port = server.sockets[0].getsockname()[1]
    proc, ports_file, log_file = _start(tmp_path, edge_port, NOFILE, NOFILE, loop=loop)
    limit = default_max_connections(NOFILE)
    assert limit == NOFILE - FD_RESERVE
    try:
        api_port = (await asyncio.to_thread(_wait_for_file, ports_file, proc))["api"]
        await _hello(edge)
        sids = [edge.open(port, flush=False) for _ in range(STREAMS)]
        edge.flush()
        outcomes = await _outcomes(edge, sids)

        # While the edge holds its streams: the local API answers, the agent is alive.
        async with httpx.AsyncClient(timeout=10) as client:
            status = await client.get(f"http://127.0.0.1:{api_port}/v1/status")
        assert status.status_code == 200, status.text
        assert status.json()["connected"] is True
        assert proc.poll() is None

        # The first `limit` streams were dialled; the rest refused before any dial, as
        # REFUSED_STREAM (the edge's 503 SANDBOX_BUSY), not as a failed connect.
        accepted = [e for e in outcomes if isinstance(e, StreamAccepted)]
        refused = [e for e in outcomes if isinstance(e, StreamReset)]
        assert len(accepted) == limit, (len(accepted), {getattr(e, "code", None) for e in refused})
        assert {e.code for e in refused} == {ResetCode.REFUSED_STREAM}
        assert len(refused) == STREAMS - limit

        # Once the edge closes its streams, the agent serves new ones again.
        _reset_all(edge, sids)
        assert await _echo(edge, port) == HELLO
        async with httpx.AsyncClient(timeout=10) as client:
            again = await client.get(f"http://127.0.0.1:{api_port}/v1/status")
        assert again.status_code == 200, again.text
        assert await _stop(proc) == 0
    finally:
        await _stop_all(proc, holder, server, edge)
    output = log_file.read_text(errors="replace")
    assert "Traceback" not in output, output[-3000:]
    assert "Too many open files" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if "refused (REFUSED_STREAM)" in line]
    assert lines, output[-3000:]
    assert f"{limit} local connections open, the limit (--max-connections)" in lines[0]
    assert len(lines) <= LOG_BURST + 30, len(lines)  # a burst, then at most one a second
    assert "not logged one by one" in output
    assert f"at most {limit} local connections at a time (file descriptor limit {NOFILE})" in output


async def test_the_limit_counts_dials_and_open_connections_and_frees_a_slot_as_each_ends() -> None:
    holder = Holder()
    port = await holder.start()
    try:
        async with hostile_edge([port], max_connections=3) as (edge, agent):
            assert agent.max_connections == 3
            # Opened in one write: dials in flight count, so the 4th and 5th are refused.
            sids = [edge.open(port, flush=False) for _ in range(5)]
            edge.flush()
            outcomes = await _outcomes(edge, sids)
            assert [type(e).__name__ for e in outcomes].count("StreamAccepted") == 3
            assert [e.code for e in outcomes if isinstance(e, StreamReset)] == [
                ResetCode.REFUSED_STREAM
            ] * 2
            assert agent.local_connections == 3
            # A port the agent never dials is still refused as such, not as busy.
            sid = edge.open(3000)
            event = await edge.outcome(sid)
            assert isinstance(event, StreamReset) and event.code == ResetCode.PORT_NOT_ALLOWED
            # One stream ends: its slot is free again once its socket is gone.
            accepted = [e.stream_id for e in outcomes if isinstance(e, StreamAccepted)]
            _reset_all(edge, accepted[:1])
            assert await _echo(edge, port) == HELLO
    finally:
        holder.close()


async def test_failed_dials_give_their_slot_back() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = int(s.getsockname()[1])
    holder = Holder()
    port = await holder.start()
    try:
        async with hostile_edge([port, dead], max_connections=2) as (edge, agent):
            for _ in range(5):  # more failures than slots
                event = await edge.outcome(edge.open(dead))
                assert isinstance(event, StreamReset) and event.code == ResetCode.CONNECT_REFUSED
            assert agent.local_connections == 0
            assert await _echo(edge, port, attempts=1) == HELLO
    finally:
        holder.close()


def test_default_limit_leaves_the_reserve_to_the_link_and_the_local_api() -> None:
    assert default_max_connections(1024) == 1024 - FD_RESERVE
    assert default_max_connections(256) == 256 - FD_RESERVE
    assert default_max_connections(128) == 32  # a quarter of a tiny limit
    assert default_max_connections(1 << 20) == MAX_CONNECTIONS_CAP
    assert default_max_connections(resource.RLIM_INFINITY) == MAX_CONNECTIONS_CAP


async def test_a_public_request_past_the_cap_gets_503_sandbox_busy(stack: Stack) -> None:
    """Through the real edge: the agent's REFUSED_STREAM reaches the client as 503."""
    holder = Holder()
    port = await holder.start()
    try:
        agent = await stack.agent("sb1", max_connections=1)
        exposed = await stack.expose("sb1", port)
        await wait_until(lambda: port in agent.exposures, 10, "the exposure at the agent")
        assert stack.edge is not None
        host = stack.host_of(exposed["exposedAt"]).encode()
        # The held service never answers: this request keeps the agent's one connection.
        _reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.public_port)
        writer.write(b"POST / HTTP/1.1\r\nhost: " + host + b"\r\ncontent-length: 10\r\n\r\n")
        await writer.drain()
        await wait_until(lambda: agent.local_connections == 1, 10, "the held connection")
        answer = await raw_request(
            stack.edge.public_port, b"GET / HTTP/1.1\r\nhost: " + host + b"\r\n\r\n"
        )
        writer.close()
    finally:
        holder.close()
    assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["code"] == "SANDBOX_BUSY"


async def test_a_lost_link_gives_every_slot_back_and_the_next_session_serves() -> None:
    """The cap is the agent's, across sessions: the connections of a lost session are closed,
    and their slots are free for the next session's streams."""
    holder = Holder()
    port = await holder.start()
    edges: list[HostileEdge] = []

    def new_edge() -> HostileEdge:
        edges.append(HostileEdge([port]))
        return edges[-1]

    server = await asyncio.get_running_loop().create_server(new_edge, "127.0.0.1", 0)
    config = AgentConfig("127.0.0.1", server.sockets[0].getsockname()[1], "sb1", "t")
    config.max_connections = 3
    agent = Agent(config)
    runner = asyncio.get_running_loop().create_task(agent.run())
    try:
        await asyncio.wait_for(agent.connected_event.wait(), 10)
        first = edges[0]
        sids = [first.open(port, flush=False) for _ in range(4)]
        first.flush()
        outcomes = await _outcomes(first, sids)
        assert [e.code for e in outcomes if isinstance(e, StreamReset)] == [
            ResetCode.REFUSED_STREAM
        ]
        assert agent.local_connections == 3
        assert first.transport is not None
        first.transport.abort()  # the link is lost with three connections held
        await wait_until(lambda: len(edges) == 2 and agent.connected, 10, "a new session")
        await wait_until(lambda: agent.local_connections == 0, 10, "the old connections closed")
        second = edges[1]
        sids = [second.open(port, data=HELLO, flush=False) for _ in range(3)]
        second.flush()
        outcomes = await _outcomes(second, sids)
        assert all(isinstance(e, StreamAccepted) for e in outcomes), outcomes
        assert await second.read_stream(sids[0], limit=len(HELLO)) == HELLO
    finally:
        await agent.stop()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        holder.close()
        server.close()
        for edge in edges:
            if edge.transport is not None:
                edge.transport.close()
