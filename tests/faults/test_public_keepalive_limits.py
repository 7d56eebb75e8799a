"""Issue 7 row 12: idle keep-alive connections are closed, and public connections are capped.

An idle keep-alive connection (the last request complete, nothing moving either way) is closed
after ``keepalive_timeout`` instead of living for ``idle_timeout`` (1 h); long-lived traffic that
is merely silent (a request body in progress, a tunnel after 101) is not. ``max_connections`` and
``max_connections_per_ip`` answer 503 ``TOO_MANY_CONNECTIONS`` past the cap.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
import pytest

from tests.faults.conftest import Stack, get_and_close

pytestmark = pytest.mark.anyio


async def _exposed(stack: Stack) -> bytes:
    origin = await stack.origin()
    await stack.agent("sb1")
    exposed = await stack.expose("sb1", origin.port)
    return stack.host_of(exposed["exposedAt"]).encode()


async def _started(**config: object) -> Stack:
    return await Stack(**config).start()


async def test_idle_keepalive_connection_is_closed() -> None:
    stack = await _started(keepalive_timeout=0.5)  # idle_timeout stays 1 h
    try:
        host = await _exposed(stack)
        assert stack.edge is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.public_port)
        started = asyncio.get_running_loop().time()
        writer.write(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        assert b"hello from origin" in await asyncio.wait_for(reader.read(4096), 5)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # then closed by the edge
        assert asyncio.get_running_loop().time() - started < 10
        writer.close()
    finally:
        await stack.close()


async def test_keepalive_timer_restarts_with_each_request() -> None:
    stack = await _started(keepalive_timeout=2.0)
    try:
        host = await _exposed(stack)
        assert stack.edge is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.public_port)
        # 4 x 0.6 s > the timeout, but never 2 s idle (1.4 s of margin for a loaded machine)
        for _ in range(4):
            writer.write(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
            got = await asyncio.wait_for(reader.readuntil(b"hello from origin"), 5)
            assert got.startswith(b"HTTP/1.1 200")
            await asyncio.sleep(0.6)
        writer.close()
    finally:
        await stack.close()


async def test_silent_request_body_outlives_keepalive_timeout() -> None:
    stack = await _started(keepalive_timeout=0.3)
    try:
        host = await _exposed(stack)
        assert stack.edge is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.public_port)
        writer.write(
            b"POST /upload HTTP/1.1\r\nHost: " + host + b"\r\nContent-Length: 10\r\n\r\n12345"
        )
        await writer.drain()
        await asyncio.sleep(1.2)  # silent mid-body for 4x keepalive_timeout: not idle keep-alive
        writer.write(b"67890")
        got = await asyncio.wait_for(reader.readuntil(b"}"), 5)
        assert got.startswith(b"HTTP/1.1 200") and b'"length":10' in got
        writer.close()
    finally:
        await stack.close()


async def test_silent_tunnel_outlives_keepalive_timeout(stack: Stack) -> None:
    """After a 101 the connection is a tunnel: silence there is governed by idle_timeout only."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"
            )
            while data := await asyncio.wait_for(reader.read(65536), 10):
                writer.write(data)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    stack.config.keepalive_timeout = 0.3
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        await stack.agent("sb1")
        exposed = await stack.expose("sb1", server.sockets[0].getsockname()[1])
        host = stack.host_of(exposed["exposedAt"]).encode()
        assert stack.edge is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.public_port)
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: " + host + b"\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n"
        )
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(
            b"HTTP/1.1 101 "
        )
        await asyncio.sleep(1.2)  # silent for 4x keepalive_timeout
        writer.write(b"still there?")
        assert await asyncio.wait_for(reader.readexactly(12), 5) == b"still there?"
        writer.close()
    finally:
        server.close()


async def test_connections_per_ip_are_capped() -> None:
    stack = await _started(max_connections_per_ip=2)
    opened: list[asyncio.StreamWriter] = []
    try:
        host = await _exposed(stack)
        assert stack.edge is not None
        port = stack.edge.public_port
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        opened.extend(w for _, w in held)
        await _wait_for(lambda: len(stack.edge.public_connections) == 2)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert orjson.loads(answer.split(b"\r\n\r\n", 1)[1]) == {
            "error": "Too many connections: the limit is 2 connections from 127.0.0.1.",
            "code": "TOO_MANY_CONNECTIONS",
        }
        # the held connections still work, and a freed slot is usable again
        r0, w0 = held[0]
        w0.write(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        assert b"hello from origin" in await asyncio.wait_for(r0.read(), 5)
        w0.close()
        await _wait_for(lambda: len(stack.edge.public_connections) == 1)
        answer = await get_and_close(port, host)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
    finally:
        for w in opened:
            w.close()
        await stack.close()


async def test_total_connections_are_capped_and_logged(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="tunneld.public")
    stack = await _started(max_connections=3)
    opened: list[asyncio.StreamWriter] = []
    try:
        host = await _exposed(stack)
        assert stack.edge is not None
        port = stack.edge.public_port
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        opened.extend(w for _, w in held)
        await _wait_for(lambda: len(stack.edge.public_connections) == 3)
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 503 ") and b"TOO_MANY_CONNECTIONS" in answer
        refusals = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(refusals) == 1  # one line, not one per refused connection
        assert "3 public connections in total" in refusals[0].getMessage()
        for _, w in held:
            w.close()
        await _wait_for(lambda: len(stack.edge.public_connections) == 0)
        assert (await get_and_close(port, host)).startswith(b"HTTP/1.1 200")
    finally:
        for w in opened:
            w.close()
        await stack.close()


async def _wait_for(predicate, timeout: float = 5) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


class _LengthlessOrigin:
    """A service that answers with a response without a length (it ends when the connection
    does), sends a first part, then stalls. ``finish_on_eof``: the client's EOF makes it send
    the rest and close (a server finishing its response); else it ignores the EOF and never
    closes."""

    def __init__(self, finish_on_eof: bool) -> None:
        self.finish_on_eof = finish_on_eof
        self.eof = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nfirst part;")
            await writer.drain()
            if await reader.read() == b"":  # the request came; the next thing is the EOF
                self.eof.set()
            if self.finish_on_eof:
                writer.write(b"second part")
                await writer.drain()
                writer.close()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the edge went away (the test failed, or it is over)

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.mark.parametrize("finish_on_eof", [False, True], ids=["service-stalls", "service-ends"])
async def test_an_idle_lengthless_response_is_never_cut_with_a_clean_close(
    finish_on_eof: bool,
) -> None:
    """A response without a length ends when the connection does, so a FIN from the edge in the
    middle of it makes a cut response look complete. When keepalive_timeout passes with nothing
    moving, the edge first ends the stream towards the service: a service that then finishes
    its response ends the connection (all of it, then FIN); one that does not is cut with RST
    one timeout later."""
    origin = _LengthlessOrigin(finish_on_eof)
    port = await origin.start()
    stack = await _started(keepalive_timeout=0.5)
    try:
        await stack.agent("sb1")
        host = stack.host_of((await stack.expose("sb1", port))["exposedAt"]).encode()
        assert stack.edge is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.public_port)
        writer.write(b"GET /stream HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        received = b""
        reset = False
        try:
            async with asyncio.timeout(10):
                while chunk := await reader.read(4096):
                    received += chunk
        except ConnectionResetError:
            reset = True
        try:
            await asyncio.wait_for(origin.eof.wait(), 5)
        except TimeoutError:
            raise AssertionError(
                f"the service never saw the end of the stream (the client got {received!r}, "
                f"{'a reset' if reset else 'a clean end'})"
            ) from None
        head, body = received.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200 OK")
        if finish_on_eof:
            assert (body, reset) == (b"first part;second part", False)  # whole, then FIN
        else:
            assert (body, reset) == (b"first part;", True)  # cut: a reset, never a clean end
        writer.close()
    finally:
        await stack.close()
        await origin.close()


async def test_an_idle_close_that_cannot_end_the_stream_cuts_with_rst() -> None:
    """close_idle's defensive branch: the stream cannot be ended towards the service (its
    session is over), so there is no service to wait for; the connection is cut with RST at
    once, never closed cleanly and never left open for a next call that would do the same.

    Every real end of a session resets its streams in the same callback, so the only moment
    close_idle can find a response mid-way on a dead session is the instant between the end
    (here the agent's GO_AWAY INTERNAL_ERROR, which ends the edge's session at once) and its
    teardown reaching the streams: the idle close is run exactly there, as the keep-alive
    timer or the idle sweep would if they fired then."""
    from protocol import events as ev
    from protocol.errors import GoAwayCode

    origin = _LengthlessOrigin(finish_on_eof=False)
    port = await origin.start()
    stack = await _started()  # keepalive_timeout 75 s, idle_timeout 1 h: only this test closes
    try:
        agent = await stack.agent("sb1")
        host = stack.host_of((await stack.expose("sb1", port))["exposedAt"]).encode()
        assert stack.edge is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.public_port)
        writer.write(b"GET /stream HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        received = await asyncio.wait_for(reader.readuntil(b"first part;"), 5)
        (conn,) = stack.edge.public_connections
        mux = conn.mux
        assert mux is not None
        seen: dict[str, bool] = {}
        teardown = mux._dispatch[ev.ConnectionTerminated]

        def idle_close_then_teardown(event: ev.ConnectionTerminated) -> None:
            if not seen:
                seen["session closed, stream still registered"] = (
                    mux.session.closed and mux.streams.get(conn.stream_id) is conn
                )
                conn.close_idle()
                assert conn.transport is not None
                seen["cut by close_idle itself"] = conn.transport.is_closing()
            teardown(event)

        mux._dispatch[ev.ConnectionTerminated] = idle_close_then_teardown
        assert agent.session is not None
        agent.session.session.close(GoAwayCode.INTERNAL_ERROR)
        agent.session.flush()
        reset = False
        try:
            async with asyncio.timeout(10):
                while chunk := await reader.read(4096):
                    received += chunk
        except ConnectionResetError:
            reset = True
        assert seen == {
            "session closed, stream still registered": True,
            "cut by close_idle itself": True,
        }
        assert (received.split(b"\r\n\r\n", 1)[1], reset) == (b"first part;", True)
        writer.close()
    finally:
        await stack.close()
        await origin.close()


async def test_an_idle_request_never_answered_is_closed_cleanly() -> None:
    """Before any response byte close_idle closes with a FIN: nothing was answered, so an
    empty reply cannot pass for a complete response, and the service's connection is ended."""
    eof = asyncio.Event()
    requests: list[bytes] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            requests.append(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10))
            await asyncio.wait_for(reader.read(), 10)  # never answers; waits for the end
            eof.set()
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            eof.set()
        finally:
            writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    stack = await _started(keepalive_timeout=0.5)
    try:
        await stack.agent("sb1")
        exposed = await stack.expose("sb1", server.sockets[0].getsockname()[1])
        host = stack.host_of(exposed["exposedAt"]).encode()
        assert stack.edge is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.public_port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        try:
            got = await asyncio.wait_for(reader.read(), 10)
        except ConnectionResetError:
            raise AssertionError("the unanswered idle connection was reset, not closed") from None
        assert got == b""
        await asyncio.wait_for(eof.wait(), 5)  # the service's connection ended too
        assert len(requests) == 1 and requests[0].startswith(b"GET /slow ")
        writer.close()
    finally:
        await stack.close()
        server.close()
