"""The agent: one outbound session to the edge, local connections for its streams, reconnects.

Theory of operation
-------------------
``Agent.run()`` loops: connect (TCP or TLS) -> ``AgentSession`` sends ``Hello`` -> the edge answers
``Welcome`` with the sandbox's exposures (the edge is authoritative, so they come back after any
reconnect and preview URLs stay the same) -> serve until the link is lost -> back off with jitter
(first retry after ~100 ms, doubling to a 20 s cap while connects fail, reset by every welcome)
and connect again. A newer session for the same sandbox replaces the old one at the edge, so a
reconnect after an unclean loss is never refused as "already connected".

Failover. ``AgentConfig.servers`` lists one or more edges (``--server a:7000,b:7000``); each
entry's host is resolved on the loop at every connect round (DNS may change), and every address
it resolves to is an address of the round, in the order getaddrinfo returns them. A round starts
with the address that last answered with a welcome (the first one at start) and goes on in list
order, wrapping around: a failed connect or handshake (each bounded by the connect timeout) moves
on to the next address at once, and only a round in which every address failed ends in the
backoff sleep. A session that ends after a welcome starts the next round with the same address
(most losses are an edge restart), except after GO_AWAY(SHUTTING_DOWN): that edge is draining, so
the round starts with the address after it and comes back to it last.

Each stream the edge opens carries a target port. The agent only ever dials 127.0.0.1 (then ::1)
and only ports 1024-65535 except 3000 and its own local API port; a ``preview`` stream must also
target a port the agent knows is exposed (``Agent.exposures``, updated synchronously from the
Welcome, Expose/Unexpose and the Ok replies to its own requests), while ``direct`` streams (the
admin API's connect, authorised at the edge) may reach any such port. Anything else is reset with
PORT_NOT_ALLOWED and logged. A refused connect is reset with CONNECT_REFUSED, which the edge turns
into a 502 naming the port.

Descriptors. Every dialled stream holds one descriptor, and an edge (hostile or broken) may open
up to its session's stream limit (32768) at once, far past a sandbox's usual RLIMIT_NOFILE of
1024: the agent would then have none left for its link, a reconnect or its local control API.
So the agent holds at most ``Agent.max_connections`` local connections (dials in flight
included) at a time, across sessions: ``AgentConfig.max_connections`` (``--max-connections``),
by default ``default_max_connections()`` (the soft RLIMIT_NOFILE minus ``FD_RESERVE``, at least
a quarter of it, at most ``MAX_CONNECTIONS_CAP``; ``tunnel-agent run`` first raises the soft limit
towards the hard one, ``raise_fd_limit()``). A stream past it is reset with REFUSED_STREAM
before any dial (the edge answers 503 SANDBOX_BUSY), with a rate-limited warning.

Proxies. An ``EdgeAddress`` may name an HTTP proxy (``tunnel-agent run`` picks it from ``--proxy``
and the environment: agent/proxy.py). Such an entry is not resolved here, the proxy resolves the
edge's name, so it is one address of the round; its attempt is a CONNECT through the proxy
(``proxy.open_tunnel``) and the tunnel's socket then carries TLS, the WebSocket handshake and the
session exactly as a direct socket would. A proxy that cannot be reached or refuses the CONNECT is
a failed attempt of that address like any other (failover and backoff unchanged).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import resource
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, cast

from protocol import control
from protocol.errors import GoAwayCode, LocalProtocolError, ResetCode
from protocol.events import ConnectionTerminated, StreamOpened
from protocol.hostnames import (
    DEFAULT_OPTIONS,
    ExposureOptions,
    InvalidPortError,
    ValidationError,
    validate_port,
)
from protocol.session import Role, Session, SessionConfig
from relay.budget import RateLimitedLog
from relay.fdlimit import nofile_target, raise_nofile
from relay.mux import MuxProtocol, StalledCloseWatch, StreamEndpoint, abort_with_reset
from relay.requests import ControlRequestError
from relay.wslink import WebSocketLink

from .errors import AgentError, api_port_error, status_for
from .portwatch import PortWatches, TooManyWatches, WatchSpec, watch_port
from .proxy import ProxyError, ProxyURL, open_tunnel

if TYPE_CHECKING:
    from .local_api import LocalAPI

log = logging.getLogger("tunnel.agent")

CONNECT_TIMEOUT: Final = 10.0  # dialing the edge, and dialing a local port
# expose/unexpose/list round trip to the edge: longer than the edge's own bound on a store write
# (tunneld.store.WRITE_TIMEOUT, 30 s), so a hung store is answered with the edge's words (503
# STORE_UNAVAILABLE: the change "may still be applied"), not a 504 EDGE_TIMEOUT that knows nothing.
# agent.cli's EDGE_CLIENT_TIMEOUT is this plus 10 s.
REQUEST_TIMEOUT: Final = 35.0
BACKOFF_FIRST: Final = 0.1  # first retry is fast: most losses are a blip or an edge restart
BACKOFF_CAP: Final = 20.0  # frp's cap; long enough not to hammer a down edge


# Descriptors kept out of the local connections' share (default_max_connections): the link and a
# reconnect's (2 each, a proxy's tunnel included), the local API's listeners and its 64
# connections, 64 port watches, stdio, the event loop's own and the resolver's, with room to spare.
FD_RESERVE: Final = 160
# The default never goes above this, whatever RLIMIT_NOFILE allows (--max-connections may).
MAX_CONNECTIONS_CAP: Final = 4096
# raise_fd_limit() takes the soft RLIMIT_NOFILE up to the hard limit, but not past this (unless
# --max-connections needs more): 16 times the default cap (MAX_CONNECTIONS_CAP), and finite, so a
# hard limit of 2**20 or unlimited does not hand a huge soft limit to code that loops over every
# possible descriptor.
FD_LIMIT_CEILING: Final = 1 << 16


def default_max_connections(soft_limit: int | None = None) -> int:
    """The default cap on concurrent local connections for a soft RLIMIT_NOFILE of
    ``soft_limit`` (default: this process's): the limit minus ``FD_RESERVE``, at least a quarter
    of it, at most ``MAX_CONNECTIONS_CAP``."""
    if soft_limit is None:
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft_limit == resource.RLIM_INFINITY or soft_limit <= 0:
        return MAX_CONNECTIONS_CAP
    return max(1, min(MAX_CONNECTIONS_CAP, max(soft_limit - FD_RESERVE, soft_limit // 4)))


def _wanted_fd_limit(max_connections: int | None) -> int:
    if max_connections is None:
        return FD_LIMIT_CEILING
    return max(FD_LIMIT_CEILING, max_connections + FD_RESERVE)


def fd_limit_target(soft: int, hard: int, max_connections: int | None = None) -> int | None:
    """The soft RLIMIT_NOFILE ``raise_fd_limit`` sets for limits ``(soft, hard)``, None to keep
    ``soft``: ``min(hard, max(FD_LIMIT_CEILING, max_connections + FD_RESERVE))``, if above it."""
    return nofile_target(soft, hard, _wanted_fd_limit(max_connections))


def raise_fd_limit(max_connections: int | None = None) -> tuple[int, int, str | None]:
    """Raise this process's soft RLIMIT_NOFILE towards its hard limit, as Go programs do at start
    (cloudflared, frp: Go's runtime since 1.19): to ``min(hard, FD_LIMIT_CEILING)``, or to
    ``max_connections + FD_RESERVE`` when an explicit ``--max-connections`` needs more. Never
    lowers it. Returns ``(before, after, error)``: the soft limit before and after, and why it
    could not be raised (None when it was, or needed not be); it never raises (relay/fdlimit.py)."""
    return raise_nofile(_wanted_fd_limit(max_connections))


# The shortest keepalive interval the agent adopts from an edge's welcome: well within the PING
# budget every session enforces (protocol.session: 10 per second).
MIN_HEARTBEAT: Final = 0.2


@dataclass(frozen=True, slots=True)
class EdgeAddress:
    """One edge the agent may connect to: an entry of ``--server`` (a host name or an address)."""

    host: str
    port: int
    tls: bool = False  # use AgentConfig.tls (``--tls``, or a wss:// entry)
    websocket: bool = False  # carry the session in WebSocket messages (egress allows only HTTP)
    proxy: ProxyURL | None = None  # reach this edge through an HTTP proxy's CONNECT

    def __str__(self) -> str:
        return _host_port(self.host, self.port)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(slots=True)
class AgentConfig:
    """What the agent connects to and as whom.

    ``server_host``/``server_port`` (with ``tls`` and ``websocket``) describe one edge; ``servers``
    lists the edges to fail over between, in order, and defaults to that one.
    """

    server_host: str
    server_port: int
    sandbox_id: str
    token: str
    tls: ssl.SSLContext | None = None
    server_hostname: str | None = None  # name checked in every edge's certificate; default: host
    websocket: bool = False  # carry the session in WebSocket messages (egress allows only HTTP)
    dial_hosts: tuple[str, ...] = ("127.0.0.1", "::1")
    session: SessionConfig = field(
        default_factory=SessionConfig
    )  # windows, heartbeat, dead timeout
    servers: tuple[EdgeAddress, ...] = ()
    connect_timeout: float = CONNECT_TIMEOUT  # per address: resolve, connect + TLS, and welcome
    # Concurrent local connections (dials included); None: default_max_connections().
    max_connections: int | None = None

    def __post_init__(self) -> None:
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        if not self.servers:
            self.servers = (
                EdgeAddress(
                    self.server_host, self.server_port, self.tls is not None, self.websocket
                ),
            )
        if self.tls is None and any(entry.tls for entry in self.servers):
            raise ValueError("an edge address uses TLS but AgentConfig.tls has no SSLContext")

    def tls_server_name(self, entry: EdgeAddress) -> str | None:
        """The name checked in ``entry``'s certificate (None: no TLS to that edge)."""
        return (self.server_hostname or entry.host) if entry.tls else None


class EdgeRefusedError(ConnectionError):
    """The edge answered the Hello with an error (bad token, plaintext refused...)."""


def describe_error(exc: BaseException, timeout: float = CONNECT_TIMEOUT) -> str:
    """One line for the log saying why a connection to the edge failed or ended."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS handshake failed: {exc.verify_message} ({exc.reason})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or exc}"
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g} s"
    if isinstance(exc, (EdgeRefusedError, ProxyError)):
        return str(exc)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass(frozen=True, slots=True)
class EdgeTarget:
    """One address of a connect round: ``entry`` (number ``index`` of the list) resolved."""

    index: int  # of the entry in AgentConfig.servers
    entry: EdgeAddress
    address: str | None  # the resolved address; None: let create_connection resolve the host
    port: int
    family: int = 0
    nth: int = 1  # of the entry's resolved addresses, from 1
    of: int = 1


@dataclass(slots=True)
class _Failure:
    label: str
    what: str
    logged: bool


# One line per service connection reset in close_gracefully's check: public requests cause them.
_STALLED_CLOSE_LOG: Final = RateLimitedLog(
    log, "lines about services reset after they stopped reading"
)


class LocalEndpoint(StreamEndpoint):
    """A stream bound to a connection to the service on 127.0.0.1:PORT."""

    __slots__ = (
        "_close_watch",
        "_dialled",
        "_holds_slot",
        "_peername",
        "_pending",
        "_pending_end",
        "_sockname",
    )

    def __init__(self, mux: AgentSession, stream_id: int) -> None:
        super().__init__(mux, stream_id)
        self._pending: list[bytes] = []  # bytes from the edge before the local connect finished
        self._pending_end = False
        self._dialled = mux.agent.dialled
        self._sockname: tuple[str, int] | None = None
        self._peername: tuple[str, int] | None = None
        # Started by close_gracefully while the service has bytes of ours it has not taken.
        self._close_watch: StalledCloseWatch | None = None
        # Counted in Agent.local_connections from the dial until the socket is gone.
        mux.agent.local_connections += 1
        self._holds_slot = True

    def release_slot(self) -> None:
        """Leave ``Agent.local_connections`` (once): the dial failed or the socket is gone."""
        if self._holds_slot:
            self._holds_slot = False
            cast(AgentSession, self.mux).agent.local_connections -= 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sockname = transport.get_extra_info("sockname")
        peername = transport.get_extra_info("peername")
        if (
            isinstance(sockname, tuple)
            and len(sockname) >= 2
            and isinstance(peername, tuple)
            and len(peername) >= 2
        ):
            # The local API refuses requests from these sockets: they carry tunnel traffic.
            self._sockname = (str(sockname[0]), int(sockname[1]))
            self._peername = (str(peername[0]), int(peername[1]))
            self._dialled.setdefault(self._sockname, set()).add(self._peername)
        mux = self.mux
        if self._closed or mux.streams.get(self.stream_id) is not self or mux.session.closed:
            # The edge reset the stream (or the link was lost) while we were dialing: RST, so the
            # service never takes the cut-short request for a complete one.
            abort_with_reset(cast(asyncio.Transport, transport))
            return
        # Accept before anything else: the service may answer before create_connection() returns.
        mux.session.accept_stream(self.stream_id)
        mux.flush()
        pending, self._pending = self._pending, []
        for data in pending:
            super().receive_from_peer(data)
        if pending:
            mux.flush()  # their window updates: the edge may be waiting for them to send more
        if self._pending_end:
            super().peer_ended()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._close_watch is not None:
            self._close_watch.cancel()
            self._close_watch = None
        if self._sockname is not None and self._peername is not None:
            services = self._dialled.get(self._sockname)
            if services is not None:
                services.discard(self._peername)
                if not services:
                    del self._dialled[self._sockname]
        self.release_slot()
        super().connection_lost(exc)

    def close_gracefully(self) -> None:
        """Both sides ended: close with FIN once the service has taken what we still owe it.

        A service that half-closed and reads nothing more would keep that close (the socket, its
        buffer, the stream's entry) for the rest of the session: the kernel probes a zero window
        without end. So, as for the tunnel socket after a session ends, a ``StalledCloseWatch``
        (relay.mux) resets the connection once a ``dead_timeout`` passes without the service
        taking a byte.
        """
        super().close_gracefully()
        if self._close_watch is None and not self._closed:
            mux = self.mux
            self._close_watch = StalledCloseWatch.start(
                self.transport, mux.session.dead_timeout, mux.loop, self._close_stalled
            )

    def _close_stalled(self, unsent: int, stalled: float | None) -> None:
        """The ``StalledCloseWatch`` resets the connection: say why."""
        _STALLED_CLOSE_LOG.log(
            self.mux.loop.time(),
            "stream %d: the service ended its side and took none of the last %d bytes for %gs; "
            "connection reset",
            self.stream_id,
            unsent,
            self.mux.session.dead_timeout,
        )

    def receive_from_peer(self, data: bytes) -> None:
        if self.transport is None:
            # Bounded by the stream's receive window: nothing is acknowledged until written.
            self._pending.append(data)
        else:
            super().receive_from_peer(data)

    def peer_ended(self) -> None:
        if self.transport is None:
            self._pending_end = True
            self._peer_eof = True
        else:
            super().peer_ended()


class AgentSession(MuxProtocol):
    def __init__(
        self, agent: Agent, loop: asyncio.AbstractEventLoop, edge: EdgeAddress | None = None
    ) -> None:
        super().__init__(Session(Role.AGENT, agent.config.session, now=loop.time()), loop)
        self.agent = agent
        self.edge = edge or agent.config.servers[0]
        self.welcomed: asyncio.Future[control.Welcome] = loop.create_future()
        self._dialing: set[asyncio.Task[None]] = set()
        # watch_port requests of the edge, by request id (unwatch_port cancels one)
        self._watching: dict[int, asyncio.Task[None]] = {}
        # unexposes of the local API's port the welcome listed (_drop_api_port_exposure)
        self._unexposing: set[asyncio.Task[None]] = set()
        # Why the session ended, for the log: the first of GO_AWAY/terminated/refused/lost.
        self.end_reason: str | None = None
        # The edge's session-level Error, if it refused the Hello: (code, message).
        self.refusal: tuple[str, str] | None = None
        # The edge's GO_AWAY code, if it sent one (SHUTTING_DOWN: fail over to the next edge).
        self.edge_going_away: GoAwayCode | None = None

    def on_connected(self) -> None:
        edge = self.edge
        if edge.websocket:
            self.link = WebSocketLink(client=True)
            host = self.agent.config.server_hostname or edge.host
            assert self.transport is not None
            self.transport.write(self.link.handshake(_host_port(host, edge.port)))
            return
        self.on_link_open()

    def on_link_open(self) -> None:
        config = self.agent.config
        # UNWATCH_PORT_VERSION: this agent serves watch_port requests and unwatch_port.
        hello = control.Hello(config.sandbox_id, config.token, control.UNWATCH_PORT_VERSION)
        self.session.send_control(hello)
        self.flush()

    def on_control(self, message: Any) -> None:
        # Exposure changes apply here, synchronously: the edge may open a preview stream to a
        # port in the very read that carries the Welcome or the Ok that exposed it.
        if isinstance(message, control.Welcome):
            if not self.welcomed.done():
                # Ping at least as often as the edge asks (never faster than MIN_HEARTBEAT: a
                # welcome cannot make us flood); every PING of ours is answered, so our dead
                # timeout only has to outlast our own interval.
                own = self.agent.config.session
                interval = max(min(message.heartbeat_s, own.heartbeat_interval), MIN_HEARTBEAT)
                self.session.set_keepalive(interval, max(own.dead_timeout, 1.5 * interval))
                listed = {e.port for e in message.exposures}
                self.agent.exposures = self.agent.served(listed)
                self.welcomed.set_result(message)
                api_port = self.agent.api_port
                if api_port is not None and api_port in listed:
                    self._drop_api_port_exposure(api_port)
        elif isinstance(message, control.Error) and message.id is None and self.welcomed.done():
            # An error about no request once the session is up: the edge did not take a message
            # of ours (UNEXPECTED_MESSAGE: an older edge, say) and the session goes on. Not a
            # refusal: the session's end, whenever it comes, is told as what it is.
            log.warning("the edge did not take a message: %s (%s)", message.message, message.code)
        elif isinstance(message, control.Error) and message.id is None:
            log.error("edge refused the session: %s (%s)", message.message, message.code)
            self.refusal = self.agent.last_refusal = (message.code, message.message)
            if self.end_reason is None:
                self.end_reason = f"refused by the edge: {message.message} ({message.code})"
        elif isinstance(message, (control.Ok, control.Error)):
            self.pending.resolve(message)  # runs the request's on_ok first (see _call)
        elif isinstance(message, control.Expose):
            try:
                self.agent.check_port(message.port)
            except AgentError as refusal:
                # A preview URL of the control API would hand it to anyone, and a port below
                # 1024 or 3000 is never dialled: refuse, so the edge answers its caller
                # INVALID_PORT and stores nothing (an older edge answers 502 and keeps the
                # exposure, which this agent never serves). tunneld's edge never pushes the
                # latter (its admin API refuses them first): only a broken or hostile one does.
                api = message.port == self.agent.api_port
                self.agent.refused_exposes.log(
                    self.loop.time(),
                    "the edge asked to expose port %d, %s; refused",
                    message.port,
                    "this agent's own control API" if api else "which the agent never serves",
                )
                self.session.send_control(control.Error(refusal.code, refusal.message, message.id))
                return
            self.agent.remember(message.port)
            self._ack(message.id)
        elif isinstance(message, control.Unexpose):
            self.agent.forget(message.port)
            self._ack(message.id)
        elif isinstance(message, control.WatchPort):
            self._start_watch(message)
        elif isinstance(message, control.UnwatchPort):
            task = self._watching.get(message.id)
            if task is not None:  # else it just ended: its reply is on its way or sent
                log.info("the edge stopped its wait (request %d): its client left", message.id)
                task.cancel()

    def _start_watch(self, message: control.WatchPort) -> None:
        """Probe the port in a task and answer ``Ok`` (ready) or ``Error`` (not ready in time,
        refused). The task ends with the session (the edge's wait fails with it anyway)."""
        try:
            port = self.agent.check_port(message.port)
            if message.status_min > message.status_max:
                raise AgentError("INVALID_REQUEST", "status_min is greater than status_max.", 400)
            self.agent.port_watches.acquire()
        except AgentError as exc:
            self.session.send_control(control.Error(exc.code, exc.message, message.id))
            return
        except TooManyWatches as exc:
            self.session.send_control(control.Error("TOO_MANY_WATCHES", str(exc), message.id))
            return
        spec = WatchSpec(
            port,
            message.mode,
            message.path,
            message.status_min,
            message.status_max,
            message.interval_ms / 1000,
            message.timeout_s,
        )
        task = self.loop.create_task(self._watch(message.id, spec))
        old = self._watching.pop(message.id, None)
        if old is not None:  # an edge reusing a live id: the older watch is orphaned
            old.cancel()
        self._watching[message.id] = task
        task.add_done_callback(functools.partial(self._watch_ended, message.id))

    def _watch_ended(self, request_id: int, task: asyncio.Task[None]) -> None:
        if self._watching.get(request_id) is task:
            del self._watching[request_id]

    async def _watch(self, request_id: int, spec: WatchSpec) -> None:
        watches = self.agent.port_watches
        try:
            result = await watch_port(spec, watches.hosts)
        finally:
            watches.release()
        if self.session.closed:
            return
        if result.ready:
            reply: Any = control.Ok(request_id)
        else:
            last = result.last
            status = last.status if last is not None else None
            reply = control.Error("PORT_NOT_READY", result.message(spec), request_id, status)
        self.session.send_control(reply)
        self.flush()

    def _ack(self, request_id: int) -> None:
        self.session.send_control(control.Ok(request_id))

    def _drop_api_port_exposure(self, port: int) -> None:
        """The welcome lists ``port``, the local control API's: an exposure made while this
        agent was offline (the edge could not ask it then), which it never serves. Refuse it the
        one way the protocol has after a welcome: ``unexpose`` it, so the edge removes it from
        its list and its store (every node of a cluster) instead of offering a URL that can
        never work. A failure is logged; the exposure then stays, never served, until the next
        welcome."""

        async def unexpose() -> None:
            try:
                await self.request(lambda rid: control.Unexpose(rid, port), REQUEST_TIMEOUT)
            except (TimeoutError, ControlRequestError, LocalProtocolError) as exc:
                if not self.session.closed:
                    log.warning("the edge did not remove the exposure of port %d: %s", port, exc)
                return
            log.info("the edge removed its exposure of port %d (this agent's control API)", port)

        task = self.loop.create_task(unexpose())
        self._unexposing.add(task)
        task.add_done_callback(self._unexposing.discard)

    # -- streams ---------------------------------------------------------------------------------
    def on_stream_opened(self, event: StreamOpened) -> None:
        try:
            port = validate_port(event.port)
        except InvalidPortError:
            self.agent.refused_streams.log(
                self.loop.time(), "edge asked for port %s, which the agent never dials", event.port
            )
            self.session.reset_stream(event.stream_id, ResetCode.PORT_NOT_ALLOWED)
            return
        if port == self.agent.api_port:
            self.agent.refused_streams.log(
                self.loop.time(),
                "edge asked for port %d, the agent's own control API; refused (stream %d)",
                port,
                event.stream_id,
            )
            self.session.reset_stream(event.stream_id, ResetCode.PORT_NOT_ALLOWED)
            return
        if event.via == "preview" and port not in self.agent.exposures:
            # Direct streams are authorised by the admin token at the edge; preview streams only
            # by an exposure, and the agent hears of every one.
            self.agent.refused_streams.log(
                self.loop.time(),
                "edge opened a preview stream to port %d, which is not exposed; refused "
                "(stream %d, client %s)",
                port,
                event.stream_id,
                event.client,
            )
            self.session.reset_stream(event.stream_id, ResetCode.PORT_NOT_ALLOWED)
            return
        agent = self.agent
        if agent.local_connections >= agent.max_connections:
            # Before any dial: each local connection is a descriptor, and the link, a reconnect
            # and the local API need theirs (an edge may open 32768 streams at once).
            agent.busy_refusals.log(
                self.loop.time(),
                "stream %d to port %d refused (REFUSED_STREAM): %d local connections open, the "
                "limit (--max-connections)",
                event.stream_id,
                port,
                agent.local_connections,
            )
            self.session.reset_stream(event.stream_id, ResetCode.REFUSED_STREAM)
            return
        endpoint = LocalEndpoint(self, event.stream_id)
        self.add_stream(endpoint)
        task = self.loop.create_task(self._dial(endpoint, port))
        self._dialing.add(task)
        task.add_done_callback(self._dialing.discard)

    async def _dial(self, endpoint: LocalEndpoint, port: int) -> None:
        error: OSError | None = None
        try:
            for host in self.agent.config.dial_hosts:
                try:
                    async with asyncio.timeout(CONNECT_TIMEOUT):  # no extra task, unlike wait_for
                        await self.loop.create_connection(lambda: endpoint, host, port)
                except OSError as exc:  # TimeoutError included
                    error = exc
                    continue
                return  # LocalEndpoint.connection_made accepted the stream
        except BaseException:  # cancelled with the session: any socket it made is being closed
            endpoint.release_slot()
            raise
        endpoint.release_slot()
        if self.streams.pop(endpoint.stream_id, None) is not None and not self.session.closed:
            refused = isinstance(error, ConnectionRefusedError)
            # One line per stream: any public client of an exposed port whose service is down
            # causes one per request, so a burst, then one a second (relay/budget.py).
            self.agent.dial_failures.log(
                self.loop.time(),
                "stream %d: cannot connect to port %d: %s",
                endpoint.stream_id,
                port,
                error,
            )
            self.session.reset_stream(
                endpoint.stream_id,
                ResetCode.CONNECT_REFUSED if refused else ResetCode.CONNECT_FAILED,
            )
            self.flush()

    # -- teardown --------------------------------------------------------------------------------
    def on_go_away(self, code: GoAwayCode) -> None:
        log.info("the edge is going away (%s); streams in flight may finish", code.name)
        self.edge_going_away = code

    def on_terminated(self, event: ConnectionTerminated) -> None:
        log.info("session ended: %s (%s)", event.code.name, event.reason)
        self.agent.last_termination = event.code
        if self.end_reason is None:
            reason = f" ({event.reason})" if event.reason else ""
            if event.remote:
                self.end_reason = f"GO_AWAY {event.code.name} from the edge{reason}"
            else:
                self.end_reason = f"{event.code.name}{reason}"

    def on_disconnected(self, exc: Exception | None) -> None:
        if self.end_reason is None:
            lost = describe_error(exc) if exc is not None else "closed by the edge"
            going = self.edge_going_away
            then = f"GO_AWAY {going.name} from the edge, then " if going is not None else ""
            self.end_reason = f"{then}connection lost: {lost}"
        self.pending.fail_all("EDGE_NOT_CONNECTED", "The connection to the edge was lost.")
        for task in list(self._dialing):
            task.cancel()
        for task in list(self._watching.values()):
            task.cancel()
        for task in list(self._unexposing):
            task.cancel()
        if not self.welcomed.done():
            self.welcomed.set_exception(ConnectionError("connection closed before welcome"))
            self.welcomed.exception()  # mark retrieved


class Agent:
    """The in-sandbox agent; also the ExposureController behind the local API."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.session: AgentSession | None = None
        # Ports the edge says are exposed (welcome, expose, unexpose, list replies): the only
        # ports a preview stream may reach.
        self.exposures: set[int] = set()
        self.last_refusal: tuple[str, str] | None = None
        self.last_termination: GoAwayCode | None = None
        self.session_id: str | None = None
        # The port the local control API is bound to: never exposed, never dialled.
        self.api_port: int | None = None
        # The local (address, port) of every open socket the agent dialled for a stream, with the
        # (address, port) of each one's service (is_tunnel_peer). Several: Linux gives sockets
        # to different destinations the same ephemeral port.
        self.dialled: dict[tuple[str, int], set[tuple[str, int]]] = {}
        # Warnings about streams the edge opens to ports the agent refuses: a hostile edge can
        # open them at will, so a burst, then one a second (relay/budget.py).
        self.refused_streams = RateLimitedLog(
            log, "warnings about streams to ports the agent refuses"
        )
        # The edge's exposes of ports the agent refuses (its API port, below 1024, 3000): an
        # edge never sends them unless it is hostile or broken, and then at any rate.
        self.refused_exposes = RateLimitedLog(
            log, "warnings about exposes of ports the agent refuses"
        )
        # Streams whose port could not be dialled (nothing listens): one per public request to
        # a service that is down, so as rate-limited as the refusals above.
        self.dial_failures = RateLimitedLog(
            log, "lines about ports the agent cannot connect to", level=logging.INFO
        )
        # Local connections open or being dialled, and the most there may be: a stream past it
        # is refused before any dial, so descriptors are left for the link and the local API.
        self.local_connections = 0
        self.max_connections = config.max_connections or default_max_connections()
        self.busy_refusals = RateLimitedLog(
            log, "warnings about streams refused at the local connection limit"
        )
        # Live port watches, the local API's and the edge's together (at most MAX_WATCHES).
        self.port_watches = PortWatches(hosts=config.dial_hosts)
        self.connected_event = asyncio.Event()
        self._stopping = False
        self._rng = random.Random()
        # Where the next connect round starts: the entry and (address, port) that last answered
        # with a welcome (the first entry at start).
        self._last_worked: tuple[int, tuple[str | None, int] | None] = (0, None)

    # -- ExposureController ----------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return (
            self.session is not None
            and self.session.welcomed.done()
            and not self.session.session.closed
        )

    @property
    def sandbox_id(self) -> str:
        return self.config.sandbox_id

    def is_tunnel_peer(self, address: tuple[str, int], port: int) -> bool:
        """Is ``address`` one of the agent's own sockets, connected to ``port``? (Only the
        address would take a client of the local API for a tunnel stream whenever its ephemeral
        port is one that a stream's socket to another service has too.)"""
        return any(service[1] == port for service in self.dialled.get(address, ()))

    def check_port(self, port: object) -> int:
        """``validate_port``, and never the local API's own port."""
        try:
            port = validate_port(port)
        except ValidationError as exc:
            raise AgentError(exc.code, exc.message, 400) from None
        if port == self.api_port:
            raise api_port_error(port)
        return port

    async def serve_local_api(self, host: str, port: int, **options: Any) -> LocalAPI:
        """Start the local control API for this agent; its port is then refused for streams."""
        from .local_api import start_local_api

        api = await start_local_api(
            self,
            host,
            port,
            is_tunnel_peer=self.is_tunnel_peer,
            watches=self.port_watches,
            **options,
        )
        self.api_port = api.port
        return api

    def _live(self) -> AgentSession:
        session = self.session
        if session is None or not self.connected:
            raise AgentError("EDGE_NOT_CONNECTED", "The agent is not connected to the edge.", 503)
        return session

    async def _call(
        self, factory: Any, on_ok: Callable[[control.Ok], None] | None = None
    ) -> control.Ok:
        session = self._live()
        try:
            return await session.request(factory, REQUEST_TIMEOUT, on_ok)
        except TimeoutError:
            raise AgentError("EDGE_TIMEOUT", "The edge did not answer in time.", 504) from None
        except ControlRequestError as exc:
            raise AgentError(exc.code, exc.message, status_for(exc.code)) from None

    async def expose(
        self,
        port: int,
        name: str | None = None,
        token: str | None = None,
        options: ExposureOptions = DEFAULT_OPTIONS,
    ) -> control.Exposure:
        port = self.check_port(port)
        o = options
        ok = await self._call(
            lambda rid: control.Expose(
                rid, port, name, token, o.protocol, o.proxy_protocol, o.inspect
            ),
            lambda ok: self.remember(port),
        )
        if not ok.exposures:
            raise AgentError("BAD_REPLY", "The edge answered without the exposure.", 502)
        return ok.exposures[0]

    async def unexpose(self, port: int) -> None:
        try:
            port = validate_port(port)
        except ValidationError as exc:
            raise AgentError(exc.code, exc.message, 400) from None
        await self._call(lambda rid: control.Unexpose(rid, port), lambda ok: self.forget(port))

    async def list_exposures(self) -> list[control.Exposure]:
        ok = await self._call(lambda rid: control.ListExposures(rid), self._learn)
        return sorted(ok.exposures, key=lambda e: e.port)

    def _learn(self, ok: control.Ok) -> None:
        # the edge's whole, authoritative set
        self.exposures = self.served({e.port for e in ok.exposures}, warn=False)

    def served(self, ports: set[int], *, warn: bool = True) -> set[int]:
        """``ports`` (the edge's exposures of this sandbox) without the local API's own port,
        which the agent never serves: an exposure of it (made while the agent was offline, or
        stored by an older edge or agent) is logged (``warn``: at each welcome, not at each
        list), not served; the welcome's session asks the edge to remove it
        (``AgentSession._drop_api_port_exposure``)."""
        api_port = self.api_port
        if api_port is not None and api_port in ports:
            log.log(
                logging.WARNING if warn else logging.DEBUG,
                "the edge lists port %d as exposed, but it is this agent's own control API: "
                "not served (preview requests to it are refused)%s",
                api_port,
                "; asking the edge to remove that exposure" if warn else "",
            )
            ports = ports - {api_port}
        return ports

    def remember(self, port: int) -> None:
        self.exposures.add(port)

    def forget(self, port: int) -> None:
        self.exposures.discard(port)

    # -- connection loop -------------------------------------------------------------------------
    def describe_target(self, target: EdgeTarget) -> str:
        """``edge b:7000 (2 of 3)``, plus the address when the host resolved to another one."""
        text = f"edge {target.entry}"
        count = len(self.config.servers)
        if count > 1:
            text += f" ({target.index + 1} of {count})"
        address = target.address
        if address is not None and (address != target.entry.host or target.of > 1):
            text += f" at {_host_port(address, target.port)}"
            if target.of > 1:
                text += f" (address {target.nth} of {target.of})"
        if target.entry.proxy is not None:
            text += f" via proxy {target.entry.proxy}"
        return text

    async def resolve(self, index: int) -> list[EdgeTarget]:
        """The addresses of entry ``index``, in getaddrinfo's order (looked up now, on the loop).

        Through a proxy the entry is one target, by name: the proxy resolves it (the sandbox may
        have no DNS of its own).
        """
        entry = self.config.servers[index]
        if entry.proxy is not None:
            return [EdgeTarget(index, entry, None, entry.port)]
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.config.connect_timeout):
            infos = await loop.getaddrinfo(entry.host, entry.port, type=socket.SOCK_STREAM)
        seen: list[tuple[int, str, int]] = []
        for family, _type, _proto, _name, sockaddr in infos:
            key = (int(family), str(sockaddr[0]), int(sockaddr[1]))
            if key not in seen:
                seen.append(key)
        if not seen:
            raise OSError(f"{entry.host} has no address")
        return [
            EdgeTarget(index, entry, address, port, family, nth, len(seen))
            for nth, (family, address, port) in enumerate(seen, 1)
        ]

    async def connect_once(self, target: EdgeTarget | None = None) -> AgentSession:
        """Connect to ``target`` (default: the first edge, by name) and complete the handshake.

        Raises on failure (``EdgeRefusedError`` when the edge refused the Hello); the connect and
        the handshake each have ``config.connect_timeout``.
        """
        config = self.config
        if target is None:
            entry = config.servers[0]
            target = EdgeTarget(0, entry, None, entry.port)
        _, session = await asyncio.wait_for(self._connect(target), config.connect_timeout)
        try:
            welcome = await asyncio.wait_for(
                asyncio.shield(session.welcomed), config.connect_timeout
            )
        except BaseException as exc:
            if session.transport is not None:
                abort_with_reset(session.transport)
            if session.refusal is not None and isinstance(exc, Exception):
                code, message = session.refusal
                raise EdgeRefusedError(f"refused by the edge: {message} ({code})") from exc
            raise
        self.session = session
        self.session_id = welcome.session
        self.last_refusal = None
        self.connected_event.set()
        log.info(
            "connected to %s as sandbox %s (session %s, %d exposed port%s)",
            self.describe_target(target),
            config.sandbox_id,
            welcome.session,
            len(welcome.exposures),
            "" if len(welcome.exposures) == 1 else "s",
        )
        return session

    async def _connect(self, target: EdgeTarget) -> tuple[asyncio.BaseTransport, AgentSession]:
        """TCP (or a proxy's CONNECT tunnel) to ``target``, then TLS if the entry uses it."""
        loop = asyncio.get_running_loop()
        config = self.config
        edge = target.entry
        tls = config.tls if edge.tls else None
        server_hostname = config.tls_server_name(edge)  # the edge's name, never the proxy's
        if edge.proxy is None:
            return await loop.create_connection(
                lambda: AgentSession(self, loop, edge),
                target.address or edge.host,
                target.port,
                family=target.family,
                ssl=tls,
                server_hostname=server_hostname,
            )
        sock = await open_tunnel(edge.proxy, edge.host, edge.port)
        try:
            return await loop.create_connection(
                lambda: AgentSession(self, loop, edge),
                sock=sock,
                ssl=tls,
                server_hostname=server_hostname,
            )
        except BaseException:
            sock.close()
            raise

    async def connect_round(
        self, failures: list[_Failure], *, after_drain: bool = False
    ) -> AgentSession | None:
        """Try every address once, starting with the one that last worked; None if all failed.

        ``after_drain``: the edge that last worked is draining, so start with the address after
        it (and try it last). Each failure is appended to ``failures`` (and logged at once when
        there is more than one address).
        """
        servers = self.config.servers
        count = len(servers)
        start, last = self._last_worked
        several = count > 1

        async def addresses(index: int) -> list[EdgeTarget]:
            try:
                return await self.resolve(index)
            except (OSError, TimeoutError) as exc:
                entry = servers[index]
                label = f"edge {entry}" + (f" ({index + 1} of {count})" if several else "")
                why = describe_error(exc, self.config.connect_timeout)
                what = f"cannot resolve {entry.host}: {why}"
                failures.append(_Failure(label, what, several))
                if several:
                    log.warning("cannot connect to %s: %s", label, what)
                return []

        first = await addresses(start)
        pivot = 0
        for position, target in enumerate(first):
            if (target.address, target.port) == last:
                pivot = position + 1 if after_drain else position
                break
        # Lazily: an entry is resolved only when the round reaches it.
        plan: list[list[EdgeTarget] | int] = [first[pivot:]]
        plan += [(start + k) % count for k in range(1, count)]
        plan.append(first[:pivot])
        for step in plan:
            targets = step if isinstance(step, list) else await addresses(step)
            for target in targets:
                if self._stopping:
                    return None
                multi = several or target.of > 1
                label = self.describe_target(target)
                # Through a proxy the line says which one, even for a single edge.
                loud = multi or target.entry.proxy is not None
                (log.info if loud else log.debug)("connecting to %s", label)
                try:
                    session = await self.connect_once(target)
                except (TimeoutError, OSError, ConnectionError) as exc:
                    what = describe_error(exc, self.config.connect_timeout)
                    failures.append(_Failure(label, what, multi))
                    if multi:
                        log.warning("cannot connect to %s: %s", label, what)
                    continue
                self._last_worked = (target.index, (target.address, target.port))
                return session
        return None

    async def run(self) -> None:
        """Stay connected until ``stop()``; log every failed connect and every session end."""
        delay = BACKOFF_FIRST
        config = self.config
        after_drain = False
        while not self._stopping:
            replaced = False
            failures: list[_Failure] = []
            session = await self.connect_round(failures, after_drain=after_drain)
            after_drain = False
            if session is None:
                if len(failures) == 1 and not failures[0].logged:
                    what = f"cannot connect to {failures[0].label}: {failures[0].what}"
                else:
                    tried = len(failures)
                    what = f"no edge answered ({tried} attempt{'' if tried == 1 else 's'} failed)"
            else:
                # A welcome proves the edge and the path to it work: the next loss is a new
                # incident, not the next failure of this one (a link dropping every 2 s must
                # not push the retry to 20 s when every connect succeeds).
                delay = BACKOFF_FIRST
                await session.closed
                self.connected_event.clear()
                self.session = None
                if self._stopping:
                    break
                what = f"edge session {self.session_id} ended: {session.end_reason or 'unknown'}"
                if self.last_termination == GoAwayCode.REPLACED:
                    # Another agent with our identity is alive: do not fight it for the session.
                    replaced = True
                    delay = BACKOFF_CAP * 2
                elif session.edge_going_away == GoAwayCode.SHUTTING_DOWN:
                    after_drain = True  # that edge is draining: the next one first
            if self._stopping:
                break
            sleep = self._rng.uniform(delay / 2, delay)
            if replaced:
                log.error(
                    "%s: another agent connected as sandbox %s and replaced this one; "
                    "retrying in %.0f s",
                    what,
                    config.sandbox_id,
                    sleep,
                )
            else:
                log.warning("%s; retrying in %.1f s", what, sleep)
            await asyncio.sleep(sleep)
            delay = min(delay * 2, BACKOFF_CAP)
            self.last_termination = None

    async def stop(self) -> None:
        self._stopping = True
        session = self.session
        if session is not None and session.transport is not None:
            session.session.close(GoAwayCode.NORMAL)
            session.flush()
            try:
                await asyncio.wait_for(asyncio.shield(session.closed), 2.0)
            except TimeoutError:
                if session.transport is not None:
                    abort_with_reset(session.transport)
