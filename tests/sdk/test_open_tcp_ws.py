"""``Sandbox.open_tcp(port, websocket=True)`` against real ``tunneld`` and ``tunnel-agent``
processes, on asyncio, uvloop and trio: the raw byte stream carried in WebSocket binary messages
(tunneld/tcpws.py), with the half-close, a reset kept a reset, and the typed errors."""

from __future__ import annotations

import hashlib
import socket

import anyio
import anyio.abc
import pytest

from tests.e2e.origin import pattern, pattern_sha256
from tests.e2e.procs import Processes
from tests.e2e.tcpserver import HashServer
from tunneld.client import AuthenticationError, TunnelError, WebSocketTcpStream

from . import test_open_tcp
from .test_open_tcp import client_of, receive_all

pytestmark = pytest.mark.anyio

IO_TIMEOUT = 30.0
MIB = 1 << 20

# tunneld and an agent as processes (tests/sdk/test_open_tcp.py's); the hashing service is
# tests/conftest.py's hash_server
edge = test_open_tcp.edge


async def test_bytes_by_hash_with_half_close_over_websocket(
    edge: Processes, hash_server: HashServer
) -> None:
    size = 4 * MIB
    tcp = await client_of(edge).sandbox("sb1").open_tcp(hash_server.port, websocket=True)
    assert isinstance(tcp, WebSocketTcpStream) and isinstance(tcp, anyio.abc.ByteStream)
    async with tcp:
        with anyio.fail_after(IO_TIMEOUT):
            await tcp.send(b"hash %d\n" % size)
            for piece in pattern(size):
                await tcp.send(piece)
            await tcp.send(b"")  # nothing: not the half-close
            await tcp.send_eof()  # the service reads EOF, then answers
            received = await receive_all(tcp)  # ends with EndOfStream: Close 1000
    line, _, rest = received.partition(b"\n")
    assert line.decode() == pattern_sha256(size)
    assert hashlib.sha256(rest).hexdigest() == pattern_sha256(size, seed=2)
    assert hash_server.ends == ["eof"]


async def test_a_service_reset_is_broken_not_eof_over_websocket(
    edge: Processes, hash_server: HashServer
) -> None:
    async with (
        await client_of(edge).sandbox("sb1").open_tcp(hash_server.port, websocket=True) as tcp
    ):
        await tcp.send(b"rst 200000\n")
        with anyio.fail_after(IO_TIMEOUT), pytest.raises(anyio.BrokenResourceError):
            await receive_all(tcp)


async def test_errors_are_typed_over_websocket(edge: Processes) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TunnelError) as refused:
        await client_of(edge).sandbox("sb1").open_tcp(port, websocket=True)
    assert (refused.value.status, refused.value.code) == (502, "UPSTREAM_CONNECT_FAILED")
    with pytest.raises(AuthenticationError):
        await client_of(edge, token="wrong").sandbox("sb1").open_tcp(port, websocket=True)
