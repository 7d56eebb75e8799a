"""Listeners that accept connections themselves instead of through ``loop.create_server``.

Two listeners need to see a connection before asyncio's TLS server would show it: the public
port with TLS passthrough (``tcpexpose.SniListener`` peeks at the ClientHello) and the agent
port with TLS (``edge._TlsAgentListener`` counts a connection against ``max_pending_agents``
from its accept, its TLS handshake included). Both bind and accept here, the way asyncio's
servers do, so that switching a listener to TLS changes nothing else about it:

- :func:`bind` listens on every address ``getaddrinfo`` gives for the host (``""``: every
  interface, IPv4 and IPv6), with ``SO_REUSEADDR``, ``IPV6_V6ONLY`` on IPv6 sockets and
  ``SO_REUSEPORT`` when asked, and raises asyncio's bind error message.
- :class:`Acceptor` accepts up to ``_ACCEPT_BATCH`` connections per wake-up; when ``accept``
  fails for want of resources (``EMFILE``, ``ENFILE``, ``ENOBUFS``, ``ENOMEM``) it stops
  accepting on that socket for ``ACCEPT_RETRY_DELAY`` and says so once, rather than spinning
  on a listener that stays readable (asyncio does the same, with the same one-second delay).
- :func:`guard_accept` (relay/accept.py) gives asyncio's own servers (``loop.create_server``:
  the plain public, agent and admin listeners) the same behaviour: asyncio's accept loop logged
  a traceback per connection waiting in the backlog instead. uvloop needs nothing: libuv
  accepts and closes the connections it has no descriptor for, unlogged.

Every "accept failed" warning, both kinds of listener, goes through one rate-limited log per
loop (``relay.accept.log_accept_failure``): a burst, then one a second.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any, Final

from relay.accept import guard_accept, log_accept_failure

__all__ = ["ACCEPT_RETRY_DELAY", "Acceptor", "bind", "guard_accept"]

log = logging.getLogger(__name__)

# Connections accepted per wake-up of a listening socket (asyncio's servers take a backlog's
# worth; 64 keeps one wake-up short while connections keep coming).
_ACCEPT_BATCH: Final = 64
# After accept failed for want of resources, the socket rests this long (asyncio's
# constants.ACCEPT_RETRY_DELAY).
ACCEPT_RETRY_DELAY: Final = 1.0
# A connection the peer gave up on before it was accepted: skip it, accept the next one.
_GONE: Final = frozenset({errno.ECONNABORTED, errno.EPROTO})


async def bind(
    loop: asyncio.AbstractEventLoop, host: str, port: int, *, backlog: int, reuse_port: bool
) -> list[socket.socket]:
    """Listening, non-blocking sockets on every address of ``host`` (as
    ``loop.create_server(host=host, port=port)`` binds them)."""
    infos = await loop.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):  # once each, in order
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # "::" is IPv6 only, as with asyncio: "" binds 0.0.0.0 as well
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise bind_error(address, exc) from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        raise OSError(f"no address to listen on for host {host!r}")
    return sockets


def bind_error(address: Any, exc: OSError) -> OSError:
    """``exc``, met binding ``address``, worded as asyncio's ``create_server`` words it (what
    the listener's start line says: tunneld/edge.py, tunneld/supervisor.py)."""
    return OSError(
        exc.errno,
        f"error while attempting to bind on address {address!r}: "
        f"{(exc.strerror or str(exc)).lower()}",
    )


class Acceptor:
    """Accepts on listening sockets and gives each connection (non-blocking) to ``on_accept``
    with the peer's address. ``name`` says which listener in the log."""

    __slots__ = ("_closed", "_on_accept", "_resting", "loop", "name", "sockets")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        name: str,
        on_accept: Callable[[socket.socket, Any], None],
    ) -> None:
        self.loop = loop
        self.name = name
        self._on_accept = on_accept
        self.sockets: list[socket.socket] = []
        self._resting: dict[int, asyncio.TimerHandle] = {}  # fileno -> the retry
        self._closed = False

    def serve(self, sockets: list[socket.socket]) -> None:
        self.sockets = sockets
        for sock in sockets:
            self.loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sock in self.sockets:
            retry = self._resting.pop(sock.fileno(), None)
            if retry is not None:
                retry.cancel()
            else:
                self.loop.remove_reader(sock.fileno())
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _GONE:
                    continue
                # EMFILE and friends: the listener stays readable, so trying again at once
                # would spin (and log) until a descriptor is free
                log_accept_failure(self.loop, self.name, exc, ACCEPT_RETRY_DELAY)
                fd = listener.fileno()
                self.loop.remove_reader(fd)
                self._resting[fd] = self.loop.call_later(ACCEPT_RETRY_DELAY, self._resume, listener)
                return
            sock.setblocking(False)
            self._on_accept(sock, address)

    def _resume(self, listener: socket.socket) -> None:
        self._resting.pop(listener.fileno(), None)
        if not self._closed:
            self.loop.add_reader(listener.fileno(), self._accept, listener)
