"""The agent link carried over WebSocket, for sandboxes whose egress allows only HTTP(S).

The session's byte stream (preface, frames) is cut into binary WebSocket messages; message
boundaries mean nothing, so partial messages are fed to the session as they arrive and wsproto
never assembles a whole message. The edge tells the two links apart by the first bytes: a raw link
starts with the preface ``TUNL``, a WebSocket link with ``GET ``. Sans-IO (wsproto): the mux calls
``receive()`` with socket bytes and writes what comes back.
"""

from __future__ import annotations

from typing import Final

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

AGENT_PATH: Final = "/v1/agent"
SUBPROTOCOL: Final = "tunneld.v1"
# A handshake head larger than this is not an agent (bounds wsproto's buffer before the upgrade).
MAX_HANDSHAKE: Final = 16 * 1024


class LinkClosed(Exception):
    """The WebSocket link is over (closed, refused, or the peer broke the protocol); ``reply`` is
    what still has to be written before closing (a refusal, a close frame); ``session`` the
    session bytes of the messages that came before it in the same read (a GO_AWAY sent just
    before a Close), still to be given to the session."""

    def __init__(self, message: str, reply: bytes = b"") -> None:
        super().__init__(message)
        self.reply = reply
        self.session = b""


class WebSocketLink:
    __slots__ = ("_seen", "_ws", "open")

    def __init__(self, client: bool) -> None:
        self._ws = WSConnection(ConnectionType.CLIENT if client else ConnectionType.SERVER)
        self.open = False
        self._seen = 0

    def handshake(self, host: str, target: str = AGENT_PATH) -> bytes:
        """Client: the upgrade request to send first."""
        return self._ws.send(Request(host=host, target=target, subprotocols=[SUBPROTOCOL]))

    def receive(self, data: bytes | memoryview) -> tuple[bytes, bytes]:
        """Socket bytes in; returns (bytes for the session, bytes to write back to the socket)."""
        if not self.open:
            self._seen += len(data)
            if self._seen > MAX_HANDSHAKE:
                raise LinkClosed("WebSocket handshake too large")
        session = bytearray()
        try:
            self._ws.receive_data(bytes(data))
            reply = bytearray()
            for event in self._ws.events():
                if isinstance(event, BytesMessage):
                    session += event.data
                elif isinstance(event, Request):
                    if event.target != AGENT_PATH:
                        reply += self._ws.send(RejectConnection(status_code=404))
                        raise LinkClosed(
                            f"WebSocket upgrade for {event.target!r}, not an agent", bytes(reply)
                        )
                    sub = SUBPROTOCOL if SUBPROTOCOL in event.subprotocols else None
                    reply += self._ws.send(AcceptConnection(subprotocol=sub))
                    self.open = True
                elif isinstance(event, AcceptConnection):
                    self.open = True
                elif isinstance(event, Ping):
                    reply += self._ws.send(event.response())
                elif isinstance(event, CloseConnection):
                    if self._ws.state.name == "REMOTE_CLOSING":
                        reply += self._ws.send(event.response())
                    raise LinkClosed(f"WebSocket closed ({event.code})", bytes(reply))
                elif isinstance(event, RejectConnection):
                    raise LinkClosed(f"WebSocket upgrade refused with HTTP {event.status_code}")
                elif isinstance(event, TextMessage):
                    raise LinkClosed("text message on the agent link")
        except LinkClosed as exc:
            exc.session = bytes(session)
            raise
        except (LocalProtocolError, RemoteProtocolError) as exc:
            closed = LinkClosed(f"WebSocket protocol error: {exc}")
            closed.session = bytes(session)
            raise closed from None
        return bytes(session), bytes(reply)

    def wrap(self, buffers: list[bytes | memoryview]) -> bytes:
        """Session output as one binary message; nothing once the WebSocket is closing or closed
        (after a Close the socket may stay open while our reply drains, and the session may
        still flush: its heartbeat, its GO_AWAY at shutdown)."""
        if self._ws.state is not ConnectionState.OPEN:
            return b""
        return self._ws.send(BytesMessage(data=b"".join(buffers)))
