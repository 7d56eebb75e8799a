"""Hostile agent clients of the agent port, shared by the fault suite and the bench.

``HostileAgent`` authenticates like an agent, then sends whatever it is told and never reads
again; the batch builders make what it floods with. ``websocket_ping_flood`` needs no token at
all: a WebSocket agent link whose pings ask for pongs nobody reads. Used by
``tests/faults/test_hostile_agent.py`` (issue 7, row 4) and the ``hostile_flood`` scenario of
``bench/e2e/scenarios.py``; no pytest here, so the bench can import it.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import orjson
import wsproto
import wsproto.events as wse

from protocol import control
from protocol.events import ControlReceived
from protocol.frames import FrameType, encode_frame
from protocol.session import Role, Session

__all__ = ["HostileAgent", "list_batch", "ping_batch", "websocket_ping_flood"]


class HostileAgent:
    """Authenticates like an agent, then sends whatever it likes and never reads again."""

    def __init__(self, port: int, sandbox_id: str, token: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.session = Session(Role.AGENT)
        self.session.send_control(control.Hello(sandbox_id, token))
        self._send()
        self._until(lambda m: isinstance(m, control.Welcome), 1)

    def _send(self) -> None:
        self.sock.sendall(b"".join(bytes(b) for b in self.session.data_to_send()))

    def _until(self, done: Callable[[object], bool], count: int) -> None:
        seen = 0
        deadline = time.monotonic() + 15
        while seen < count:
            assert time.monotonic() < deadline, "the edge did not answer the setup"
            data = self.sock.recv(1 << 16)
            assert data, "the edge closed the setup connection"
            self.session.receive_data(data)
            for event in self.session.events_received():
                if isinstance(event, ControlReceived) and done(event.message):
                    seen += 1
            self._send()

    def expose_many(self, n: int) -> None:
        """Exposures with long names, so that one 40-byte `list` costs the edge ~25 KiB."""
        for first in range(0, n, 32):  # the edge has at most 64 store writes in flight per session
            batch = range(first, min(n, first + 32))
            for i in batch:
                self.session.send_control(control.Expose(i + 1, 2000 + i, name="n" * 200))
            self._send()
            self._until(lambda m: isinstance(m, control.Ok), len(batch))

    def flood(self, make_batch: Callable[[int], bytes], seconds: float) -> int:
        """Send batches until ``seconds`` passed; a full socket (the edge stopped reading) or
        a closed one is what a capped edge does, so both just end or pause the flood."""
        self.sock.settimeout(0.2)
        sent = 0
        deadline = time.monotonic() + seconds
        i = 0
        while time.monotonic() < deadline:
            batch = make_batch(i)
            i += 1
            view = memoryview(batch)
            while view and time.monotonic() < deadline:
                try:
                    n = self.sock.send(view)
                except TimeoutError:
                    continue
                except OSError:
                    return sent  # the edge dropped us: fine
                sent += n
                view = view[n:]
        return sent

    def close(self) -> None:
        self.sock.close()


def ping_batch(i: int) -> bytes:
    return b"".join(
        encode_frame(FrameType.PING, 0, 0, length=(i * 1000 + k) & 0xFFFF) for k in range(1000)
    )


_LIST = encode_frame(FrameType.CONTROL, 0, 0, orjson.dumps({"type": "list", "id": 7}))


def list_batch(i: int) -> bytes:
    return _LIST * 1000


def websocket_ping_flood(port: int, seconds: float) -> int:
    """No token at all: a WebSocket agent link whose pings ask for pongs nobody reads."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    sock.sendall(ws.send(wse.Request(host="edge", target="/v1/agent")))
    deadline = time.monotonic() + 10
    accepted = False
    while not accepted:
        assert time.monotonic() < deadline, "no WebSocket handshake answer"
        ws.receive_data(sock.recv(4096))
        accepted = any(isinstance(e, wse.AcceptConnection) for e in ws.events())
    ping = ws.send(wse.Ping(payload=b"p" * 125))
    sock.settimeout(0.2)
    batch = memoryview(ping * 500)
    sent = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            try:
                sent += sock.send(batch)
            except TimeoutError:
                continue
            except OSError:
                break
    finally:
        sock.close()
    return sent
