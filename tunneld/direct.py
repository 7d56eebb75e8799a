"""The admin client's connection once it is a raw relay to a sandbox port (WebSocket connect,
raw TCP over ``Upgrade: tcp`` or a WebSocket: tunneld/admin.py, tunneld/tcpws.py), and the owner
node's end of one that another node received (``Cluster._serve_direct``).

Before the sandbox's service sent anything, a reset is answered with a JSON page rather than a
bare RST (``_RESET_PAGES``); after it, a reset stays a reset, on one node as across a node link.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

from protocol.errors import LocalProtocolError, ResetCode
from relay.linked import LinkedTransport
from relay.mux import StreamEndpoint, abort_with_reset

from .public import error_response

__all__ = ["DirectEndpoint", "LinkedDirectStream"]


class DirectEndpoint(StreamEndpoint):
    """The admin client's connection after the switch to a raw relay. For raw TCP, ``upgrade``
    holds the 101 response, written when the agent accepts the stream (it connected to the
    port); a reset or the timeout before that is a JSON page instead."""

    __slots__ = ("_responded", "_timer", "upgrade", "writer")

    def __init__(self, mux: Any, stream_id: int, upgrade: bytes | None = None) -> None:
        super().__init__(mux, stream_id)
        self._responded = False
        self.writer: asyncio.StreamWriter | None = None
        self.upgrade = upgrade
        self._timer: asyncio.TimerHandle | None = None

    def arm_connect_timer(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._timer = loop.call_later(timeout, self._connect_timed_out, timeout)

    def _connect_timed_out(self, timeout: float) -> None:
        self._timer = None
        if self._responded or self._closed:
            return
        mux = self.mux
        if mux.streams.pop(self.stream_id, None) is not None and not mux.session.closed:
            mux.session.reset_stream(self.stream_id, ResetCode.CANCEL)
            mux.flush()
        self._page(
            504,
            "UPSTREAM_CONNECT_TIMEOUT",
            f"The sandbox did not connect to the port within {timeout:g}s.",
        )

    def peer_accepted(self) -> None:
        upgrade, self.upgrade = self.upgrade, None
        if upgrade is None or self._responded or self._closed or self.transport is None:
            return
        self._responded = True
        self._cancel_timer()
        self.transport.write(upgrade)
        self.transport.resume_reading()

    def receive_from_peer(self, data: bytes) -> None:
        self._responded = True
        super().receive_from_peer(data)

    def peer_reset(self, code: Any) -> None:
        self._cancel_timer()
        page = _RESET_PAGES.get(code)
        if page is None and self.upgrade is not None:  # raw TCP: every reset before the 101
            page = _TCP_RESET_PAGES.get(code) or (
                502,
                "UPSTREAM_RESET",
                f"The sandbox reset the connection before it was established ({code.name}).",
            )
        if not self._responded and self.transport is not None and page is not None:
            # Nothing from the sandbox's server yet: say why in a page, as before the switch. A
            # reset after its first byte stays a reset (RST), on one node as across a node link.
            self._page(*page)
            return
        super().peer_reset(code)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def _page(self, status: int, code: str, message: str) -> None:
        self._responded = True
        self._closed = True
        if self.transport is not None:
            self.transport.write(error_response(status, code, message))
            self.transport.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class LinkedDirectStream(StreamEndpoint):
    """The owner node's end of a WebSocket connect that another node received
    (``Cluster._serve_direct``): a ``direct`` stream of the agent's session whose "socket" is a
    node-link stream (:class:`relay.linked.LinkedTransport`). A reset from the agent crosses the
    link with its own code, so that the landing node's ``DirectEndpoint`` still turns
    CONNECT_REFUSED into its 502 page (aborting the LinkedTransport would say CANCEL); the agent's
    accept crosses as the link stream's accept (raw TCP answers 101 on it)."""

    __slots__ = ()

    def peer_accepted(self) -> None:
        transport = self.transport
        if isinstance(transport, LinkedTransport) and not self._closed:
            link = transport.mux
            if transport.stream_id in link.streams and not link.session.closed:
                try:
                    link.session.accept_stream(transport.stream_id)
                except LocalProtocolError:  # the link stream already ended
                    return
                link.flush()

    def peer_reset(self, code: ResetCode) -> None:
        self._closed = True
        transport = self.transport
        if isinstance(transport, LinkedTransport):
            link = transport.mux
            if link.streams.pop(transport.stream_id, None) is not None and not link.session.closed:
                link.session.reset_stream(transport.stream_id, code)
                link.flush()
        abort_with_reset(transport)  # the LinkedTransport forgets the stream, nothing more


# Resets that come before any byte from the sandbox's server, and the page the admin client gets
# for each (instead of a bare RST). REFUSED_STREAM: the agent's stream limit, or, across a node
# link, an owner that no longer holds the sandbox's session (it just moved on).
_RESET_PAGES: Final = {
    ResetCode.CONNECT_REFUSED: (
        502,
        "UPSTREAM_CONNECT_FAILED",
        "Nothing is listening on that port in the sandbox.",
    ),
    ResetCode.CONNECT_FAILED: (
        502,
        "UPSTREAM_CONNECT_FAILED",
        "Nothing is listening on that port in the sandbox.",
    ),
    ResetCode.REFUSED_STREAM: (
        503,
        "SANDBOX_BUSY",
        "The sandbox refused a new connection (its stream limit, or its agent just moved to "
        "another node); retry.",
    ),
}


_TCP_RESET_PAGES: Final = {
    ResetCode.PORT_NOT_ALLOWED: (
        502,
        "PORT_NOT_ALLOWED",
        "The sandbox's agent refuses connections to that port (its own control API).",
    ),
}
