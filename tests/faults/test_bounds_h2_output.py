"""Bound: an HTTP/2 client that does not read what it asks for (tunneld/h2public.py
``OUTPUT_CAP``).

Every PING (and SETTINGS) an HTTP/2 client sends makes the edge write an acknowledgement, whether
or not the client reads: a client that floods PINGs and never reads would grow the edge's output
buffer without end. Past ``OUTPUT_CAP`` (1 MiB) unsent, the edge stops reading the connection, so
the flood stops at the client's own socket, and says so once in a warning.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from tests.e2e import test_public_tls
from tests.e2e.conftest import wait_until
from tests.e2e.test_public_tls import DOMAIN, client_context, tls_stack
from tunneld.h2public import OUTPUT_CAP, H2PublicConnection

from .conftest import Stack

pytestmark = pytest.mark.anyio

ca = test_public_tls.ca  # the module's certificate authority fixture

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = struct.pack(">I", 0)[1:] + b"\x04\x00" + struct.pack(">I", 0)  # empty SETTINGS
PINGS = b"".join(
    struct.pack(">I", 8)[1:] + b"\x06\x00" + struct.pack(">I", 0) + struct.pack(">Q", i)
    for i in range(4096)
)  # 4096 PING frames, 68 KiB
FLOOD = 8 * 1024 * 1024  # what the client tries to send: 8 x the cap
# One read of the edge (256 KiB of PINGs) answered after the cap was last checked, and TLS
# framing: what may sit above the cap.
SLACK = 512 * 1024


@pytest.fixture
async def stack(ca: trustme.CA, tmp_path: Path) -> AsyncIterator[Stack]:
    s = await tls_stack(ca, tmp_path)
    try:
        yield s
    finally:
        await s.close()


def _h2_connections(stack: Stack) -> list[H2PublicConnection]:
    assert stack.edge is not None
    return [
        c.h2
        for c in stack.edge.public_connections
        if isinstance(getattr(c, "h2", None), H2PublicConnection)
    ]


async def test_a_ping_flood_that_is_never_read_stops_at_the_output_cap(
    stack: Stack, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "tunneld")
    assert stack.edge is not None
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the client reads nothing
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", stack.edge.public_port))
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(
            sock=sock,
            ssl=client_context(ca, ["h2"]),
            server_hostname=f"8000-sb1-x.{DOMAIN}",
        ),
        10,
    )
    try:
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        writer.write(PREFACE + SETTINGS)
        sent = 0
        while sent < FLOOD:
            writer.write(PINGS)
            try:
                await asyncio.wait_for(writer.drain(), 3)
            except TimeoutError:
                break  # the edge stopped reading: the flood is held at the client
            sent += len(PINGS)
        (conn,) = _h2_connections(stack)
        transport = conn.transport
        assert transport is not None

        def warned() -> bool:
            return any("does not read what it asks for" in r.getMessage() for r in caplog.records)

        # The edge answers the PINGs it read until it stops reading (and warns), or, without a
        # cap, keeps answering all 8 MiB of them into its buffer.
        await wait_until(
            lambda: warned() or transport.get_write_buffer_size() > OUTPUT_CAP + SLACK,
            timeout=20,
            what="the edge to stop reading or to pass the cap",
        )
        unsent = transport.get_write_buffer_size()
        assert unsent <= OUTPUT_CAP + SLACK, (unsent, sent)
        assert warned()
        assert unsent > OUTPUT_CAP // 2, (unsent, sent)  # the flood did reach the cap
    finally:
        writer.transport.abort()
