"""asyncio's own servers out of descriptors: rest the listener, one rate-limited warning.

asyncio's selector loop (``BaseSelectorEventLoop._accept_connection``, 3.11 to 3.13) does rest a
listener for a second when ``accept`` fails with EMFILE (ENFILE, ENOBUFS, ENOMEM), but does not
stop there: it goes on through the whole backlog (4096 for tunneld's public port, 100 by
default), logging a traceback and scheduling one more retry per failed ``accept``. Under a
descriptor limit of 128 and 300 waiting clients, ``tunneld serve`` on the asyncio loop logged
about 70,000 tracebacks in 5 s and spent half its CPU doing it. :func:`guard_accept` replaces,
for one loop, that method with one that stops at the first such failure, rests the listener
for ``ACCEPT_RETRY_DELAY`` and says so through :func:`log_accept_failure`: one rate-limited log
per loop (a burst, then one a second), shared with tunneld/listen.py's ``Acceptor``. uvloop
needs nothing: libuv accepts and closes the connections it has no descriptor for, unlogged.

:func:`lost_listeners` (for ``GET /readyz``) names the listeners whose sockets no longer
listen, with one ERROR each: uvloop closes a listening socket, unlogged, if libuv ever hands
its listen callback an error (uvloop 0.23 with libuv 1.52 did not, for any accept error
tried: tests/faults/test_listener_accept_errors.py). On asyncio, :func:`guard_accept` leaves a
listener that no longer listens (``accept`` fails with ``EINVAL``; it stays readable) after its
first failure, with that ERROR, instead of a traceback per attempt.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
import types
import weakref
from collections.abc import Callable
from typing import Any, Final

from relay.budget import RateLimitedLog

__all__ = ["ACCEPT_RETRY_DELAY", "guard_accept", "log_accept_failure", "lost_listeners"]

log = logging.getLogger(__name__)

# asyncio's constants.ACCEPT_RETRY_DELAY
ACCEPT_RETRY_DELAY: Final = 1.0
# accept() failed for want of resources: the listener stays readable, so it rests.
_RESOURCES: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

# One rate-limited log of failed accepts per loop (every listener's together).
_accept_logs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, RateLimitedLog] = (
    weakref.WeakKeyDictionary()
)


def log_accept_failure(
    loop: asyncio.AbstractEventLoop, name: str, exc: OSError, delay: float = ACCEPT_RETRY_DELAY
) -> None:
    """Warn (rate-limited, per loop) that ``name`` rests ``delay`` s after ``exc``."""
    accept_log = _accept_logs.get(loop)
    if accept_log is None:
        accept_log = _accept_logs[loop] = RateLimitedLog(
            log, "warnings about failed accepts", loop.time()
        )
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    limit = "unlimited" if soft == resource.RLIM_INFINITY else str(soft)
    accept_log.log(
        loop.time(),
        "%s: accept failed: %s; not accepting for %.0f s (file descriptor limit %s)",
        name,
        exc.strerror or exc,
        delay,
        limit,
    )


def guard_accept(loop: asyncio.AbstractEventLoop) -> None:
    """Make ``loop``'s own servers rest a listener after the first ``accept`` that fails for want
    of resources, with a rate-limited warning (not a traceback per attempt of the backlog). Only
    asyncio's selector loops need it (and have the methods it relies on); others are left as
    they are."""
    accept2: Any = getattr(loop, "_accept_connection2", None)
    start_serving: Any = getattr(loop, "_start_serving", None)
    selector_loop = isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop)
    if not selector_loop or accept2 is None or start_serving is None:
        return

    def accept_connection(
        self: asyncio.selector_events.BaseSelectorEventLoop,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        sock: socket.socket,
        *args: Any,
    ) -> None:
        # args: sslcontext, server, backlog, ssl_handshake_timeout, ssl_shutdown_timeout
        sslcontext, server, backlog = args[0], args[1], args[2]
        for _ in range(backlog):
            try:
                conn, address = sock.accept()
                conn.setblocking(False)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                try:
                    host, port = sock.getsockname()[:2]
                    name = f"listener {host}:{port}"
                except OSError:  # pragma: no cover - a socket being closed
                    name = "listener"
                if exc.errno not in _RESOURCES:
                    if _listening(sock):
                        raise  # the loop logs it, as asyncio's own does
                    # no longer listening (EINVAL): readable for ever, so asyncio would log a
                    # traceback per attempt; stop here, say so once (/readyz answers 503)
                    self._remove_reader(sock.fileno())  # type: ignore[attr-defined]
                    _report_lost(server, f"{name} ({exc.strerror or exc})")
                    return
                log_accept_failure(self, name, exc)
                self._remove_reader(sock.fileno())  # type: ignore[attr-defined]
                self.call_later(ACCEPT_RETRY_DELAY, start_serving, protocol_factory, sock, *args)
                return
            self.create_task(
                accept2(
                    protocol_factory, conn, {"peername": address}, sslcontext, server, *args[3:]
                )
            )

    loop._accept_connection = types.MethodType(accept_connection, loop)  # type: ignore[attr-defined]


# Listeners already reported lost (by id: uvloop's Server takes no weak reference; a server
# lives as long as its process).
_reported_lost: set[int] = set()


def _listening(sock: Any) -> bool:
    try:
        return sock.fileno() >= 0 and bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:  # closed under us
        return False


def lost_listeners(servers: list[tuple[str, Any]]) -> list[str]:
    """The names of the ``(name, server)`` listeners whose sockets no longer listen, each
    logged once as an ERROR. A listener that the event loop closed (uvloop closes one, without
    a log line, when libuv hands it an accept error) or that stopped listening would otherwise
    go unnoticed: the process, and /healthz, look fine."""
    lost = []
    for name, server in servers:
        sockets = list(getattr(server, "sockets", None) or ())
        if sockets and all(_listening(sock) for sock in sockets):
            continue
        lost.append(name)
        _report_lost(server, f"{name} listener")
    return lost


def _report_lost(server: Any, name: str) -> None:
    if id(server) not in _reported_lost:
        _reported_lost.add(id(server))
        log.error(
            "%s is no longer listening: new connections are refused; "
            "restart tunneld (/readyz answers 503 meanwhile)",
            name,
        )
