"""The fault proxy itself, with real sockets: each fault does what it says, and nothing more."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import pytest

from .faultproxy import FaultProxy

pytestmark = pytest.mark.anyio


class Echo:
    """An echo server on 127.0.0.1 port 0 (or a source of ``stream`` bytes, never reading)."""

    def __init__(self, stream: int = 0) -> None:
        self.stream = stream
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> Echo:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            if self.stream:
                block = b"x" * 65536
                for _ in range(self.stream // len(block)):
                    writer.write(block)
                    await writer.drain()
                return
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.transport.abort()
        await asyncio.wait_for(self.server.wait_closed(), 5)


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    server = await Echo().start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def proxy(echo: Echo) -> AsyncIterator[FaultProxy]:
    p = await FaultProxy("127.0.0.1", echo.port, seed=7).start()
    try:
        yield p
    finally:
        await p.close()


async def _connect(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", proxy.port), 5)


async def _roundtrip(proxy: FaultProxy, payload: bytes, timeout: float = 10) -> bytes:
    reader, writer = await _connect(proxy)
    try:
        writer.write(payload)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


async def test_pass_forwards_both_ways_and_counts(proxy: FaultProxy) -> None:
    payload = bytes(range(256)) * 4000
    assert await _roundtrip(proxy, payload) == payload
    assert proxy.accepted == 1
    assert proxy.bytes_up == len(payload) and proxy.bytes_down == len(payload)
    assert proxy.corrupted == 0


async def test_stall_holds_bytes_until_resumed(proxy: FaultProxy) -> None:
    reader, writer = await _connect(proxy)
    try:
        await proxy.wait_until(lambda: proxy.connections == 1)
        proxy.stall()
        writer.write(b"hello")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(5), 0.5)
        assert proxy.bytes_up == 0
        proxy.pass_through()
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
    finally:
        writer.close()


async def test_drop_resets_current_connections_and_keeps_accepting(proxy: FaultProxy) -> None:
    reader, writer = await _connect(proxy)
    try:
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        assert proxy.drop() == 1
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert proxy.dropped == 1
    assert await _roundtrip(proxy, b"again") == b"again"


async def test_refuse_resets_new_connections_until_accept(proxy: FaultProxy) -> None:
    proxy.refuse()
    reader, writer = await _connect(proxy)
    try:
        with pytest.raises(ConnectionResetError):
            writer.write(b"x")
            await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert proxy.refused == 1 and proxy.accepted == 0
    proxy.accept()
    assert await _roundtrip(proxy, b"ok") == b"ok"


async def test_delay_holds_each_chunk(proxy: FaultProxy) -> None:
    proxy.delay(0.3)
    started = time.monotonic()
    assert await _roundtrip(proxy, b"slow") == b"slow"
    assert time.monotonic() - started >= 0.5  # delayed on the way up and on the way down


async def test_throttle_limits_the_rate(proxy: FaultProxy) -> None:
    proxy.throttle(100_000)
    payload = b"t" * 60_000
    started = time.monotonic()
    assert await _roundtrip(proxy, payload) == payload
    assert time.monotonic() - started >= 0.5  # 60 kB at 100 kB/s (both ways overlap)


async def test_corrupt_within_flips_exactly_one_byte(proxy: FaultProxy) -> None:
    proxy.corrupt(within=50_000, direction="up")
    payload = bytes(100_000)
    echoed = await _roundtrip(proxy, payload)
    assert len(echoed) == len(payload)
    diffs = [i for i in range(len(payload)) if echoed[i] != payload[i]]
    assert len(diffs) == 1 and diffs[0] < 50_000
    assert proxy.corrupted == 1
    # one-shot: the next transfer is clean
    assert await _roundtrip(proxy, payload) == payload


async def test_corrupt_is_reproducible_with_a_seed(echo: Echo) -> None:
    results = []
    for _ in range(2):
        async with FaultProxy("127.0.0.1", echo.port, seed=42) as p:
            p.corrupt(within=1000, direction="down")
            results.append(await _roundtrip(p, bytes(1000)))
    assert results[0] == results[1] != bytes(1000)


async def test_corrupt_with_probability_one_flips_every_chunk(proxy: FaultProxy) -> None:
    proxy.corrupt(probability=1.0, direction="down")
    echoed = await _roundtrip(proxy, bytes(20_000))
    assert len(echoed) == 20_000 and echoed != bytes(20_000)
    assert proxy.corrupted >= 1
    with pytest.raises(ValueError):
        proxy.corrupt()


async def test_drop_every_resets_connections_periodically(proxy: FaultProxy) -> None:
    proxy.drop_every(0.2)
    for _ in range(2):
        reader, writer = await _connect(proxy)
        try:
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
    assert proxy.dropped >= 2
    proxy.stop_drop_every()


async def test_a_reader_that_stops_bounds_what_the_proxy_forwards() -> None:
    source = await Echo(stream=64 * 1024 * 1024).start()
    proxy = await FaultProxy("127.0.0.1", source.port).start()
    try:
        _reader, writer = await _connect(proxy)
        await proxy.wait_until(lambda: proxy.bytes_down > 0)
        previous = -1
        deadline = time.monotonic() + 10
        while proxy.bytes_down != previous and time.monotonic() < deadline:  # until it settles
            previous = proxy.bytes_down
            await asyncio.sleep(0.3)
        # kernel socket buffers on loopback + stream limits, far from the 64 MiB offered
        assert proxy.bytes_down < 24 * 1024 * 1024
        writer.close()
    finally:
        await proxy.close()
        await source.close()


async def test_close_cancels_every_task(echo: Echo) -> None:
    proxy = await FaultProxy("127.0.0.1", echo.port).start()
    reader, writer = await _connect(proxy)
    await proxy.wait_until(lambda: proxy.connections == 1)
    proxy.stall()
    proxy.drop_every(60)
    await proxy.close()
    assert not [t for t in proxy._tasks if not t.done()]
    assert proxy._dropper is None
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(1), 5)
    writer.close()


async def test_close_ends_a_connection_whose_upstream_connect_is_pending() -> None:
    # The target's accept queue is full (listen(0) and one connection queued), so the kernel drops
    # the proxy's SYN and its upstream connect hangs. close() must still end the accepted client
    # connection: on Python 3.12+ Server.wait_closed() waits for it (a TimeoutError after 5 s
    # here), and before it was a socket left open, a ResourceWarning in some later test.
    with socket.socket() as target, socket.socket() as queued:
        target.bind(("127.0.0.1", 0))
        target.listen(0)
        queued.settimeout(5)
        queued.connect(target.getsockname())
        proxy = await FaultProxy(*target.getsockname()).start()
        reader, writer = await _connect(proxy)
        try:
            await proxy.wait_until(lambda: proxy.accepted == 1)
            await asyncio.wait_for(proxy.close(), 10)
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(reader.readexactly(1), 5)
        finally:
            writer.close()


async def test_faulty_stack_carries_the_agent_link_through_the_proxy(faulty_stack) -> None:
    origin = await faulty_stack.origin()
    agent = await faulty_stack.agent("sb1")
    exposed = await faulty_stack.expose("sb1", origin.port)
    async with faulty_stack.client(exposed["exposedAt"]) as client:
        r = await client.get("/")
        assert r.status_code == 200 and r.content == b"hello from origin"
        assert faulty_stack.proxy.accepted == 1 and faulty_stack.proxy.bytes_down > 0
        agent.connected_event.clear()
        faulty_stack.proxy.drop()  # the agent reconnects through the proxy
        await asyncio.wait_for(agent.connected_event.wait(), 10)
        await faulty_stack.proxy.wait_until(lambda: faulty_stack.proxy.accepted >= 2)
