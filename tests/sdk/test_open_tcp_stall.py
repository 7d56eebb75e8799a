"""``Sandbox.open_tcp``: a ``send()`` to a service that reads nothing is bounded, raw or over
WebSocket, against real ``tunneld`` and ``tunnel-agent`` processes on asyncio, uvloop and trio.

The raw ``TcpStream.send()`` had no timeout: once the service stopped reading and every buffer on
the path was full it waited forever, while ``WebSocketTcpStream.send()`` raised
``TunnelTimeoutError`` after ``timeout``. Both now give up after ``open_tcp``'s ``timeout`` and
reset the stream, so the service sees an abnormal end, never a clean end of truncated data."""

from __future__ import annotations

import hashlib
import socket
import threading
import time

import anyio
import pytest

from tests.e2e.origin import pattern
from tests.e2e.procs import Processes
from tunneld.client import TunnelTimeoutError

from . import test_open_tcp
from .test_open_tcp import client_of, receive_all

pytestmark = pytest.mark.anyio

# The bound under test, passed to open_tcp (the client's timeout stays its default).
STALL_TIMEOUT = 2.0
# The outer bound of each test: without the fix send() hangs, and this fails the test instead.
IO_TIMEOUT = 60.0
MIB = 1 << 20
# Far more than every buffer on the path holds (sockets, tunneld, the stream windows, the agent):
# a send loop that never stalls ends here and fails the test.
MAX_SENT = 512 * MIB

# tunneld and an agent for sandbox sb1, as processes (tests/sdk/test_open_tcp.py's)
edge = test_open_tcp.edge


def silent_service() -> socket.socket:
    """A listener on 127.0.0.1 that neither accepts nor reads until the test does: the agent's
    connect completes in its backlog and the bytes pile up in a small receive buffer."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(IO_TIMEOUT)
    return listener


def how_it_ended(listener: socket.socket) -> str:
    """Accept the service's connection and read it to its end: "reset" or "eof"."""
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(IO_TIMEOUT)
        received = 0
        while received <= MAX_SENT:  # bounded: at most what the test sent
            try:
                data = conn.recv(MIB)
            except ConnectionResetError:
                return "reset"
            if not data:
                return "eof"
            received += len(data)
    return "too much data"


@pytest.mark.parametrize("websocket", [False, True], ids=["raw", "websocket"])
async def test_a_send_to_a_service_that_reads_nothing_times_out_and_resets(
    edge: Processes, websocket: bool
) -> None:
    with silent_service() as listener:
        port = listener.getsockname()[1]
        sandbox = client_of(edge).sandbox("sb1")
        tcp = await sandbox.open_tcp(port, timeout=STALL_TIMEOUT, websocket=websocket)
        piece = b"x" * MIB
        sent = 0
        with anyio.fail_after(IO_TIMEOUT), pytest.raises(TunnelTimeoutError) as caught:
            while sent < MAX_SENT:
                await tcp.send(piece)
                sent += len(piece)
        assert sent > 0  # the service's connection did take bytes before the path filled up
        assert caught.value.code == "TIMEOUT"
        assert f"stalled for {STALL_TIMEOUT:g}s" in caught.value.message
        # The stream was reset: it takes nothing more, and the service sees an abnormal end.
        with (
            anyio.fail_after(IO_TIMEOUT),
            pytest.raises((anyio.ClosedResourceError, anyio.BrokenResourceError)),
        ):
            await tcp.send(b"more")
        await tcp.aclose()
        ended = await anyio.to_thread.run_sync(how_it_ended, listener)
    assert ended == "reset"


async def test_abort_twice_is_harmless(edge: Processes) -> None:
    """A send that fails resets the stream, and the caller's ``abort()`` (or a second failed
    send) then resets it again: on uvloop that raised ``ValueError`` (the closed transport's
    socket has no descriptor left)."""
    with silent_service() as listener:
        sandbox = client_of(edge).sandbox("sb1")
        tcp = await sandbox.open_tcp(listener.getsockname()[1], timeout=STALL_TIMEOUT)
        with anyio.fail_after(IO_TIMEOUT):
            await tcp.send(b"x")
            await tcp.abort()
            await tcp.abort()
            with pytest.raises(anyio.ClosedResourceError):
                await tcp.send(b"y")
        ended = await anyio.to_thread.run_sync(how_it_ended, listener)
    assert ended == "reset"


@pytest.mark.parametrize("websocket", [False, True], ids=["raw", "websocket"])
async def test_a_send_cut_short_by_the_caller_resets_the_stream(
    edge: Processes, websocket: bool
) -> None:
    """A send cancelled while the service does not read has sent an unknown part of its bytes:
    the stream is reset, so the service cannot take the truncated data for a complete one (the
    raw stream stayed open, and its ``aclose()`` then ended it with a clean FIN)."""
    with silent_service() as listener:
        sandbox = client_of(edge).sandbox("sb1")
        # a timeout far beyond the cancellation below: the caller's cancel cuts the send short
        tcp = await sandbox.open_tcp(
            listener.getsockname()[1], timeout=IO_TIMEOUT, websocket=websocket
        )
        with anyio.fail_after(IO_TIMEOUT):
            with anyio.move_on_after(STALL_TIMEOUT) as scope:
                await tcp.send(b"x" * (64 * MIB))  # more than the path holds
            assert scope.cancelled_caught
            await tcp.aclose()
        ended = await anyio.to_thread.run_sync(how_it_ended, listener)
    assert ended == "reset"


# A service that reads, slowly: 64 KiB at a time with a pause, at most ~8 MiB/s. A send of SLOW_SIZE
# (several times what the path buffers) takes it seconds, longer than STALL_TIMEOUT.
SLOW_SIZE = 40 * MIB
SLOW_PAUSE = 0.008


def slow_reader(listener: socket.socket, digest: list[str]) -> None:
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(IO_TIMEOUT)
        hasher = hashlib.sha256()
        received = 0
        while received <= SLOW_SIZE:  # bounded: what the test sends, then EOF
            data = conn.recv(64 * 1024)
            if not data:
                break
            hasher.update(data)
            received += len(data)
            time.sleep(SLOW_PAUSE)
        digest.append(f"{received} {hasher.hexdigest()}")


@pytest.mark.parametrize("websocket", [False, True], ids=["raw", "websocket"])
async def test_a_large_send_to_a_slow_reader_is_no_stall(edge: Processes, websocket: bool) -> None:
    """The timeout bounds a stall, not a send: one send() far larger than the buffers of the
    path, to a service that takes it slower than STALL_TIMEOUT, goes through whole, as long as
    each 64 KiB of it is taken in time."""
    payload = b"".join(pattern(SLOW_SIZE))
    digest: list[str] = []
    with silent_service() as listener:
        reader = threading.Thread(target=slow_reader, args=(listener, digest), daemon=True)
        reader.start()
        sandbox = client_of(edge).sandbox("sb1")
        tcp = await sandbox.open_tcp(
            listener.getsockname()[1], timeout=STALL_TIMEOUT, websocket=websocket
        )
        async with tcp:
            with anyio.fail_after(IO_TIMEOUT):
                await tcp.send(payload)
                await tcp.send_eof()
                # the service's end, once it read everything: a clean EndOfStream
                assert await receive_all(tcp) == b""
        await anyio.to_thread.run_sync(reader.join, IO_TIMEOUT)
    assert digest == [f"{SLOW_SIZE} {hashlib.sha256(payload).hexdigest()}"]
