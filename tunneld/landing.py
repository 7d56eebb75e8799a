"""The first protocol of a public connection on a node that can hand connections over.

Theory of operation
-------------------
On a worker of ``tunneld serve --workers N`` (a node with a hand-over server:
tunneld/handover.py) a public connection may land on a worker that is not its sandbox's owner;
that worker only passes the socket on. A full ``PublicConnection`` (its request framer, buffers,
limits bookkeeping, access log) built for such a connection was most of the landing worker's
work per hand-over (docs/performance.md, "The landing node against its floor"), so the public
listener of such a node makes a ``LandingConnection`` first, which does only what deciding
needs:

* it counts the connection against ``max_connections`` and ``max_connections_per_ip`` as a
  ``PublicConnection`` does (it is in ``EdgeServer.public_connections`` and in the per-IP
  table while it lives) and arms the head timer (``head_timeout`` from the accept);
* it takes the first read; when that is one whole plain head whose one Host line routes to a
  sandbox whose session is on another node (``public.quick_route``), it pauses reading and
  passes the socket and the bytes to the owner (``public.send_socket``, the path
  ``PublicConnection._hand_on`` takes) and closes its descriptor on the owner's answer. No
  ``PublicConnection`` is built.

Anything else becomes a ``PublicConnection`` (``_become``: ``transport.set_protocol``, then its
``connection_made`` and the bytes read so far, ``data_received``), which from then on serves it
exactly as it serves a connection it accepted itself: a head this node serves, a partial head, a
body behind the head, two Host lines, an unknown host or token (the 404, 429 and recheck paths),
a refusal by the limits (its own ``connection_made`` refuses with the 503, counted and logged as
ever), a hand-over the owner refused or that could not leave (the node link carries it), the head
timer firing (its 408), the idle sweep and the edge's shutdown (``close_idle``, ``end``). The
count in the limits and the armed head timer pass to it (``PublicConnection.landed``): nothing is
counted twice and the head's deadline does not move. TLS listeners never use this: a TLS
connection cannot be handed over as a socket.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from protocol.hostnames import PreviewRoute

from .public import PublicConnection, quick_route, send_socket

if TYPE_CHECKING:
    from .edge import EdgeServer

__all__ = ["LandingConnection"]


class LandingConnection(asyncio.Protocol):
    """A public connection until its first read decides: handed over, or a ``PublicConnection``
    (see the module docstring)."""

    __slots__ = (
        "_conn",
        "_counted_ip",
        "_data",
        "_lost",
        "_seen_activity",
        "_timer",
        "port",
        "sandbox_id",
        "server",
        "transport",
    )

    def __init__(self, server: EdgeServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self._conn: PublicConnection | None = None  # what this became, if it did
        self._counted_ip: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._data = b""  # the first read, while its hand-over waits for the owner's answer
        self._lost = False
        self._seen_activity = False  # the idle sweep's previous look (nothing ever moves here)
        self.port = 0  # the route, once handed over (as PublicConnection's)
        self.sandbox_id = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = transport  # type: ignore[assignment]  # (no cast: a call)
        server = self.server
        config = server.config
        peer = t.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) and len(peer) >= 2 else "unknown"
        per_ip = server.public_limits.per_ip
        count = per_ip.get(ip, 0)
        if (
            len(server.public_connections) >= config.max_connections
            or count >= config.max_connections_per_ip
        ):
            self._become()  # its connection_made refuses it: the 503, counted and logged
            return
        per_ip[ip] = count + 1
        self._counted_ip = ip
        server.public_connections.add(self)  # type: ignore[arg-type]
        self._timer = server.loop.call_later(config.head_timeout, self._on_timer)

    def data_received(self, data: bytes) -> None:
        route = quick_route(self.server, data)
        if route is None:
            self._become().data_received(data)
        else:
            self._hand_over(route, data)

    def eof_received(self) -> bool:
        return False  # nothing read: just close (as PublicConnection before its first head)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._release()

    def _release(self) -> None:
        """Leave ``public_connections`` and the per-IP count (lost, or passed on)."""
        self.server.public_connections.discard(self)
        ip = self._counted_ip
        if ip is not None:
            self._counted_ip = None
            self.server.public_limits.release(ip)

    # -- handed over -----------------------------------------------------------------------------
    def _hand_over(self, route: PreviewRoute, data: bytes) -> None:
        timer = self._timer
        if timer is not None:
            timer.cancel()
            self._timer = None
        transport = self.transport
        assert transport is not None
        transport.pause_reading()
        self.port = route.port
        self.sandbox_id = route.sandbox_id
        # (never TLS: a TLS listener takes PublicConnections at once)
        sent = send_socket(
            self.server, transport, route.sandbox_id, route.port, data, self._handed_over
        )
        if sent:
            self._data = data
            return
        # Not possible here (another host, TLS, too much read) or the owner's record not known
        # yet: the node link, as PublicConnection._hand_on would.
        self._become().hand_on_landed(route.port, route.sandbox_id, data, sent)

    def _handed_over(self, answer: bool | None) -> None:
        """The owner's answer (``HandoverServer.send``): as ``PublicConnection._handed_over``."""
        conn = self._conn
        if conn is not None:  # became one meanwhile (the edge stopping): it decides
            conn._handed_over(answer)
            return
        transport = self.transport
        data, self._data = self._data, b""
        if answer is False:
            if transport is None or transport.is_closing() or self._lost:
                return  # the client left before the hand-over message did
            self._become().hand_on_landed(self.port, self.sandbox_id, data, True)
            return
        if transport is not None:
            transport.abort()  # ours to close: the owner has it (or may have: no answer)

    # -- what the edge does to its public connections ----------------------------------------------
    def _on_timer(self) -> None:
        conn = self._conn
        if conn is None:  # no byte within head_timeout: the PublicConnection's 408
            if self._lost or self.transport is None or self.transport.is_closing():
                return
            conn = self._become()
        conn._on_timer()

    def idle_check(self) -> bool:
        """As ``PublicConnection.idle_check`` before any byte: idle across two looks."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        idle, self._seen_activity = self._seen_activity, True
        return idle

    def close_idle(self) -> None:
        if self._conn is None and self._usable():
            self._become().close_idle()

    def end(self) -> None:
        if self._conn is None and self._usable():
            self._become().end()

    def _usable(self) -> bool:
        transport = self.transport
        return not self._lost and transport is not None and not transport.is_closing()

    # -- becoming a PublicConnection ---------------------------------------------------------------
    def _become(self) -> PublicConnection:
        """Pass the connection to a ``PublicConnection``: the transport's protocol from now on,
        with this connection's count in the limits and its head timer (``landed``)."""
        server = self.server
        conn = PublicConnection(server, server.parser)
        self._conn = conn
        ip = self._counted_ip
        self._counted_ip = None
        server.public_connections.discard(self)
        conn.landed(ip, self._timer)  # the timer, if armed, calls _on_timer: passed on to conn
        transport = self.transport
        assert transport is not None
        transport.set_protocol(conn)
        conn.connection_made(transport)
        return conn
