"""The agent: one outbound session to the edge, local connections for its streams, reconnects.

Theory of operation
-------------------
``Agent.run()`` loops: connect (TCP or TLS) -> ``AgentSession`` sends ``Hello`` -> the edge answers
``Welcome`` with the sandbox's exposures (the edge is authoritative, so they come back after any
reconnect and preview URLs stay the same) -> serve until the link is lost -> back off with jitter
(first retry after ~100 ms, doubling to a 20 s cap while connects fail, reset by every welcome)
and connect again. A newer session for the same sandbox replaces the old one at the edge, so a
reconnect after an unclean loss is never refused as "already connected".

Each stream the edge opens carries a target port. The agent only ever dials 127.0.0.1 (then ::1)
and only ports 1024-65535 except 3000 and its own local API port; a ``preview`` stream must also
target a port the agent knows is exposed (``Agent.exposures``, updated synchronously from the
Welcome, Expose/Unexpose and the Ok replies to its own requests), while ``direct`` streams (the
admin API's connect, authorised at the edge) may reach any such port. Anything else is reset with
PORT_NOT_ALLOWED and logged. A refused connect is reset with CONNECT_REFUSED, which the edge turns
into a 502 naming the port.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, cast

from protocol import control
from protocol.errors import GoAwayCode, ResetCode
from protocol.events import ConnectionTerminated, StreamOpened
from protocol.hostnames import InvalidPortError, ValidationError, validate_port
from protocol.session import Role, Session, SessionConfig
from relay.mux import MuxProtocol, StreamEndpoint, abort_with_reset
from relay.requests import ControlRequestError
from relay.wslink import WebSocketLink

from .errors import AgentError, api_port_error, status_for

if TYPE_CHECKING:
    from .local_api import LocalAPI

log = logging.getLogger("tunnel.agent")

CONNECT_TIMEOUT: Final = 10.0  # dialing the edge, and dialing a local port
REQUEST_TIMEOUT: Final = 10.0  # expose/unexpose/list round trip to the edge
BACKOFF_FIRST: Final = 0.1  # first retry is fast: most losses are a blip or an edge restart
BACKOFF_CAP: Final = 20.0  # frp's cap; long enough not to hammer a down edge


# The shortest keepalive interval the agent adopts from an edge's welcome: well within the PING
# budget every session enforces (protocol.session: 10 per second).
MIN_HEARTBEAT: Final = 0.2


@dataclass(slots=True)
class AgentConfig:
    server_host: str
    server_port: int
    sandbox_id: str
    token: str
    tls: ssl.SSLContext | None = None
    server_hostname: str | None = None
    websocket: bool = False  # carry the session in WebSocket messages (egress allows only HTTP)
    dial_hosts: tuple[str, ...] = ("127.0.0.1", "::1")
    session: SessionConfig = field(
        default_factory=SessionConfig
    )  # windows, heartbeat, dead timeout


def describe_error(exc: BaseException) -> str:
    """One line for the log saying why a connection to the edge failed or ended."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS handshake failed: {exc.verify_message} ({exc.reason})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or exc}"
    if isinstance(exc, TimeoutError):
        return f"timed out after {CONNECT_TIMEOUT:g} s"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class LocalEndpoint(StreamEndpoint):
    """A stream bound to a connection to the service on 127.0.0.1:PORT."""

    __slots__ = ("_dialled", "_pending", "_pending_end", "_sockname")

    def __init__(self, mux: AgentSession, stream_id: int) -> None:
        super().__init__(mux, stream_id)
        self._pending: list[bytes] = []  # bytes from the edge before the local connect finished
        self._pending_end = False
        self._dialled = mux.agent.dialled
        self._sockname: tuple[str, int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sockname = transport.get_extra_info("sockname")
        if isinstance(sockname, tuple) and len(sockname) >= 2:
            # The local API refuses requests from these sockets: they carry tunnel traffic.
            self._sockname = (str(sockname[0]), int(sockname[1]))
            self._dialled.add(self._sockname)
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
        if self._pending_end:
            super().peer_ended()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._sockname is not None:
            self._dialled.discard(self._sockname)
        super().connection_lost(exc)

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
    def __init__(self, agent: Agent, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(Session(Role.AGENT, agent.config.session, now=loop.time()), loop)
        self.agent = agent
        self.welcomed: asyncio.Future[control.Welcome] = loop.create_future()
        self._dialing: set[asyncio.Task[None]] = set()
        # Why the session ended, for the log: the first of GO_AWAY/terminated/refused/lost.
        self.end_reason: str | None = None
        self._edge_going_away: GoAwayCode | None = None

    def on_connected(self) -> None:
        config = self.agent.config
        if config.websocket:
            self.link = WebSocketLink(client=True)
            host = config.server_hostname or config.server_host
            assert self.transport is not None
            self.transport.write(self.link.handshake(f"{host}:{config.server_port}"))
            return
        self.on_link_open()

    def on_link_open(self) -> None:
        config = self.agent.config
        self.session.send_control(control.Hello(config.sandbox_id, config.token))
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
                self.agent.exposures = {e.port for e in message.exposures}
                self.welcomed.set_result(message)
        elif isinstance(message, control.Error) and message.id is None:
            log.error("edge refused the session: %s (%s)", message.message, message.code)
            self.agent.last_refusal = (message.code, message.message)
            if self.end_reason is None:
                self.end_reason = f"refused by the edge: {message.message} ({message.code})"
        elif isinstance(message, (control.Ok, control.Error)):
            self.pending.resolve(message)  # runs the request's on_ok first (see _call)
        elif isinstance(message, control.Expose):
            self.agent.remember(message.port)
            self._ack(message.id)
        elif isinstance(message, control.Unexpose):
            self.agent.forget(message.port)
            self._ack(message.id)

    def _ack(self, request_id: int) -> None:
        self.session.send_control(control.Ok(request_id))

    # -- streams ---------------------------------------------------------------------------------
    def on_stream_opened(self, event: StreamOpened) -> None:
        try:
            port = validate_port(event.port)
        except InvalidPortError:
            log.warning("edge asked for port %s, which the agent never dials", event.port)
            self.session.reset_stream(event.stream_id, ResetCode.PORT_NOT_ALLOWED)
            return
        if port == self.agent.api_port:
            log.warning(
                "edge asked for port %d, the agent's own control API; refused (stream %d)",
                port,
                event.stream_id,
            )
            self.session.reset_stream(event.stream_id, ResetCode.PORT_NOT_ALLOWED)
            return
        if event.via == "preview" and port not in self.agent.exposures:
            # Direct streams are authorised by the admin token at the edge; preview streams only
            # by an exposure, and the agent hears of every one.
            log.warning(
                "edge opened a preview stream to port %d, which is not exposed; refused "
                "(stream %d, client %s)",
                port,
                event.stream_id,
                event.client,
            )
            self.session.reset_stream(event.stream_id, ResetCode.PORT_NOT_ALLOWED)
            return
        endpoint = LocalEndpoint(self, event.stream_id)
        self.add_stream(endpoint)
        task = self.loop.create_task(self._dial(endpoint, port))
        self._dialing.add(task)
        task.add_done_callback(self._dialing.discard)

    async def _dial(self, endpoint: LocalEndpoint, port: int) -> None:
        error: OSError | None = None
        for host in self.agent.config.dial_hosts:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):  # no extra task, unlike wait_for
                    await self.loop.create_connection(lambda: endpoint, host, port)
            except OSError as exc:  # TimeoutError included
                error = exc
                continue
            return  # LocalEndpoint.connection_made accepted the stream
        if self.streams.pop(endpoint.stream_id, None) is not None and not self.session.closed:
            refused = isinstance(error, ConnectionRefusedError)
            log.info("stream %d: cannot connect to port %d: %s", endpoint.stream_id, port, error)
            self.session.reset_stream(
                endpoint.stream_id,
                ResetCode.CONNECT_REFUSED if refused else ResetCode.CONNECT_FAILED,
            )
            self.flush()

    # -- teardown --------------------------------------------------------------------------------
    def on_go_away(self, code: GoAwayCode) -> None:
        log.info("the edge is going away (%s); streams in flight may finish", code.name)
        self._edge_going_away = code

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
            going = self._edge_going_away
            then = f"GO_AWAY {going.name} from the edge, then " if going is not None else ""
            self.end_reason = f"{then}connection lost: {lost}"
        self.pending.fail_all("EDGE_NOT_CONNECTED", "The connection to the edge was lost.")
        for task in list(self._dialing):
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
        # (address, port) of every open socket the agent dialled for a stream (is_tunnel_peer).
        self.dialled: set[tuple[str, int]] = set()
        self.connected_event = asyncio.Event()
        self._stopping = False
        self._rng = random.Random()

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

    def is_tunnel_peer(self, address: tuple[str, int]) -> bool:
        """Is ``address`` one of the agent's own sockets toward a local service?"""
        return address in self.dialled

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

        api = await start_local_api(self, host, port, is_tunnel_peer=self.is_tunnel_peer, **options)
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
        self, port: int, name: str | None = None, token: str | None = None
    ) -> control.Exposure:
        port = self.check_port(port)
        ok = await self._call(
            lambda rid: control.Expose(rid, port, name, token), lambda ok: self.remember(port)
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
        self.exposures = {e.port for e in ok.exposures}  # the edge's whole, authoritative set

    def remember(self, port: int) -> None:
        self.exposures.add(port)

    def forget(self, port: int) -> None:
        self.exposures.discard(port)

    # -- connection loop -------------------------------------------------------------------------
    async def connect_once(self) -> AgentSession:
        """Connect and complete the handshake; raises on failure."""
        loop = asyncio.get_running_loop()
        config = self.config
        _, session = await asyncio.wait_for(
            loop.create_connection(
                lambda: AgentSession(self, loop),
                config.server_host,
                config.server_port,
                ssl=config.tls,
                server_hostname=(config.server_hostname or config.server_host)
                if config.tls
                else None,
            ),
            CONNECT_TIMEOUT,
        )
        try:
            welcome = await asyncio.wait_for(asyncio.shield(session.welcomed), CONNECT_TIMEOUT)
        except BaseException:
            if session.transport is not None:
                abort_with_reset(session.transport)
            raise
        self.session = session
        self.session_id = welcome.session
        self.last_refusal = None
        self.connected_event.set()
        log.info(
            "connected to edge %s:%d as sandbox %s (session %s, %d exposed port%s)",
            config.server_host,
            config.server_port,
            config.sandbox_id,
            welcome.session,
            len(welcome.exposures),
            "" if len(welcome.exposures) == 1 else "s",
        )
        return session

    async def run(self) -> None:
        """Stay connected until ``stop()``; log every failed connect and every session end."""
        delay = BACKOFF_FIRST
        config = self.config
        while not self._stopping:
            replaced = False
            try:
                session = await self.connect_once()
            except (TimeoutError, OSError, ConnectionError) as exc:
                if self.last_refusal is not None:
                    code, message = self.last_refusal
                    what = f"refused by the edge: {message} ({code})"
                else:
                    what = describe_error(exc)
                what = f"cannot connect to edge {config.server_host}:{config.server_port}: {what}"
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
