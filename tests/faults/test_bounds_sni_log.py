"""Bound: the TLS passthrough listener's lines about connections it closes before their hand-over
are rate-limited (tunneld/tcpexpose.py ``SniListener.closed_log``, relay/budget.py
``RateLimitedLog``).

A ClientHello whose record header announces more than 16 KiB is reset as soon as the header is
read: it costs a client 9 bytes and no wait, so one line per such connection would let anyone
write the edge's log as fast as it can connect. The same goes, more slowly, for a client that
sends no ClientHello within ``head_timeout`` and one whose fallback TLS handshake fails. The three
lines share one budget: a burst of ``LOG_BURST``, then ``LOG_RATE`` a second, the rest counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.budget import LOG_BURST, LOG_RATE
from tests.e2e.conftest import wait_until
from tunneld.sni import MAX_HELLO_LENGTH

from .conftest import Stack, closed_within
from .test_bounds_sni import Recorder, client_hello, start_passthrough

pytestmark = pytest.mark.anyio

DOMAIN = "preview.test"
TOKEN = "sni1token"
HEAD_TIMEOUT = 1.0
IO_TIMEOUT = 10.0
OVERSIZED = 400  # oversized ClientHellos, CONCURRENCY at a time
CONCURRENCY = 20  # well under max_connections_per_ip (256): none is refused for the limit
SILENT = 3  # connections that never send a byte (closed at head_timeout)
GARBAGE = 3  # connections whose bytes are not TLS (the fallback handshake fails)
# Not TLS at all: the listener hands it to the edge's TLS, whose handshake fails at once.
NOT_TLS = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
# A record header that announces a ClientHello one byte over the limit: the listener resets it.
HUGE = b"\x16\x03\x01\x40\x00\x01" + (MAX_HELLO_LENGTH + 1).to_bytes(3, "big")

CLOSED = (
    "ClientHello over",
    "no ClientHello in time",
    "public TLS connection lost while handed on",
)


@pytest.fixture
async def passthrough(tmp_path: Path) -> AsyncIterator[Stack]:
    stack = await start_passthrough(tmp_path, HEAD_TIMEOUT)
    try:
        yield stack
    finally:
        await stack.close()


async def _send_and_wait_for_close(port: int, data: bytes, timeout: float) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if data:
            writer.write(data)
        await closed_within(reader, timeout)
    finally:
        writer.transport.abort()


async def test_a_flood_of_oversized_client_hellos_logs_a_bounded_number_of_lines(
    passthrough: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "tunneld.tcp")
    stack = passthrough
    assert stack.edge is not None and stack.edge.tcp is not None
    port = stack.edge.public_port
    service = await Recorder().start()
    try:
        await stack.agent("sb1")
        await stack.expose("sb1", service.port, protocol="tls", token=TOKEN)
        loop = asyncio.get_running_loop()
        started = loop.time()

        # the two slower kinds first, while the burst lasts: each is logged
        silent = HEAD_TIMEOUT + IO_TIMEOUT
        await asyncio.gather(
            *(_send_and_wait_for_close(port, b"", silent) for _ in range(SILENT)),
            *(_send_and_wait_for_close(port, NOT_TLS, IO_TIMEOUT) for _ in range(GARBAGE)),
        )
        # then the cheap one, as fast as the client can connect
        for _ in range(OVERSIZED // CONCURRENCY):
            await asyncio.gather(
                *(_send_and_wait_for_close(port, HUGE, IO_TIMEOUT) for _ in range(CONCURRENCY))
            )
        await wait_until(
            lambda: stack.edge.tcp.peeking == 0,  # type: ignore[union-attr]
            timeout=IO_TIMEOUT,
            what="no peeking connection left",
        )
        elapsed = loop.time() - started

        messages = [r.getMessage() for r in caplog.records if r.name == "tunneld.tcp"]
        lines = [m for m in messages if any(text in m for text in CLOSED)]
        # every kind was logged while the budget lasted...
        for text in CLOSED:
            assert any(text in m for m in lines), (text, messages[:20])
        # ...then a burst and at most one line a second, not one per connection
        assert len(lines) <= LOG_BURST + LOG_RATE * elapsed + 1, (len(lines), elapsed)
        assert len(lines) < OVERSIZED
        assert any("not logged one by one" in m for m in messages), messages[-5:]

        # and the listener still routes the tls exposure
        hello = client_hello(f"{service.port}-sb1-{TOKEN}.{DOMAIN}")
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(hello)
            await wait_until(
                lambda: len(service.received) >= len(hello),
                timeout=IO_TIMEOUT,
                what="the hello to reach the sandbox's service",
            )
            assert bytes(service.received) == hello
        finally:
            writer.transport.abort()
    finally:
        service.close()
