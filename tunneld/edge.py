"""The edge daemon: agent sessions, the public listener, exposures and graceful drain.

Theory of operation
-------------------
``EdgeServer`` owns three listeners (agents, public preview traffic, admin API) and the
``Registry``. An agent connects to the agent listener and becomes an ``EdgeSession`` (a
``MuxProtocol`` over a ``protocol.Session`` in the EDGE role). Its first frame is ``Hello``; the
token is checked in constant time against HMAC(secret, sandbox_id); on success the session is
attached to the sandbox, atomically replacing any older session (closed with GO_AWAY REPLACED),
and the agent gets ``Welcome`` with the edge's exposures of that sandbox.

Expose/unexpose change the registry first (the edge is authoritative) and then tell the agent on
the control channel; when the agent is online the call returns after its ``Ok``, so the URL works
the moment the caller sees it. Unexpose also resets every live preview stream of that port.
An expose the agent refuses (the port of its own local control API, which only it knows) is
removed again, from the store too, and the caller gets the agent's code (400 INVALID_PORT). One
of that port stored while the agent was offline goes when it connects: the agent unexposes it
when its welcome lists it, or refuses the expose request that replays it past the welcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import secrets
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

import orjson

from protocol import control
from protocol.errors import GoAwayCode, LocalProtocolError, ResetCode
from protocol.events import ConnectionTerminated
from protocol.hostnames import (
    DEFAULT_OPTIONS,
    MIN_PORT,
    ExposureOptions,
    ValidationError,
    build_preview_host,
    build_preview_url,
    check_preview_host_length,
    validate_custom_token,
    validate_exposure_options,
    validate_port,
    validate_port_name,
    validate_sandbox_id,
)
from protocol.session import Role, Session, SessionConfig
from relay.budget import RateLimitedLog
from relay.mux import (
    TUNNEL_OUTPUT_CAP,
    MuxProtocol,
    StreamEndpoint,
    abort_with_reset,
    link_closed_log,
    unsent_bytes,
)
from relay.requests import ControlRequestError

from .accesslog import AccessWriter
from .auth import AgentAuth
from .budget import RequestBudget
from .config import Config, ConfigError
from .h2public import PublicTlsConnection
from .httphead import default_parser
from .inspect import Inspector
from .listen import Acceptor, bind, guard_accept
from .metrics import Metrics
from .public import PublicConnection, PublicLimits
from .registry import ExposureRecord, Registry, RegistryError
from .store import Store, StoreError
from .tcpexpose import SniListener, TcpExposures, proxy_header
from .tls import TLS_SHUTDOWN_TIMEOUT, CertificateSet, public_alpn
from .tls import public_pairs as tls_pairs

if TYPE_CHECKING:
    from .cluster import Cluster
    from .handover import HandoverServer

log = logging.getLogger("tunneld")

# Refused control requests a session may pile up (past its rate limit or while its replies go
# unread) before the edge gives up on it with GO_AWAY(TOO_MANY_REQUESTS).
MAX_REFUSED_REQUESTS: Final = 1000
# Agent expose/unexpose requests of one session waiting for the store (each is one queued write);
# past this they are refused like requests over the rate limit.
MAX_WRITES_IN_FLIGHT: Final = 64
# Stored exposures from which start-up moves everything loaded out of the collector's sight.
_FREEZE_FROM: Final = 10_000
# Room kept free in the welcome for everything but the exposures (session id, limits, framing).
_WELCOME_SLACK: Final = 1024


# Warnings about agent connections that never authenticated (no hello in time, a wrong token,
# plaintext off loopback, refused past max_pending_agents) can be caused by anyone who reaches the
# agent port, so they go through a RateLimitedLog (relay/budget.py): a burst, then one a second.
_PREAUTH_WHAT: Final = "warnings about agent connections that did not authenticate"


# The end of a stop, after its grace period: how long it waits for the clean closes it began
# (an idle connection's, an agent session's after its GO_AWAY) to finish before it cuts what is
# left, and then for the listeners to let their last connections go. asyncio's
# ``Server.wait_closed`` waits for every connection of its server since Python 3.12 (3.11's and
# uvloop's return at once), so a client that stalls a close must not get to hold the stop.
STOP_CLOSE_WAIT: Final = 1.0


# Session ends that are part of normal operation (logged at INFO; anything else at WARNING).
_ORDERLY_ENDS: Final = frozenset({GoAwayCode.NORMAL, GoAwayCode.SHUTTING_DOWN, GoAwayCode.REPLACED})


class EdgeSession(MuxProtocol):
    """One connected agent.

    Until its hello is accepted it counts against ``max_pending_agents``
    (``EdgeServer.pending_agents``): past that a new connection is closed at once. ``admitted``:
    the entry that counted it so far (a TLS connection, counted from its accept by
    :class:`_TlsAgentListener`), which the session replaces."""

    def __init__(self, server: EdgeServer, *, admitted: _PendingTls | None = None) -> None:
        config = server.config
        session_config = SessionConfig(
            max_streams=config.max_streams,
            heartbeat_interval=config.heartbeat_interval,
            dead_timeout=config.dead_timeout,
            accept_remote_streams=False,
        )
        session = Session(Role.EDGE, session_config, now=server.loop.time())
        super().__init__(session, server.loop)
        self.session_max_streams = session_config.max_streams
        self.server = server
        self.link_log = server.link_log
        self._admitted = admitted
        self.sandbox_id: str | None = None
        self.session_id = secrets.token_hex(8)
        self.peer = "unknown"
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._sniff = bytearray()  # raw (preface) or WebSocket (GET) link: the first bytes tell
        self._going_away = False
        self.stopped = False  # closed by the edge's stop (EdgeServer.stop)
        self._budget = RequestBudget(config.control_rate, config.control_burst, server.loop.time())
        # new public streams per second to this sandbox (429 TOO_MANY_STREAMS past it)
        now = server.loop.time()
        self.stream_budget = RequestBudget(config.stream_rate, config.stream_burst, now)
        self._refused = 0
        self._writes: set[asyncio.Task[None]] = set()  # agent requests waiting for the store
        self._connected_at = server.loop.time()
        self._end_logged = False
        self._lifetime_observed = False  # tunneld_agent_session_seconds, once per session
        self.agent_version = 0  # the hello's: WATCH_PORT_VERSION and up serve watch_port
        # watch_port requests waiting for their reply, and the Error that answered (its
        # status_code is lost once the reply becomes a ControlRequestError)
        self.port_waits: dict[int, control.Error | None] = {}

    def on_connected(self) -> None:
        assert self.transport is not None
        peer = self.transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = f"{peer[0]}:{peer[1]}"
        if self._admitted is not None:
            self.server.pending_agents.discard(self._admitted)
            self.server.pending_agents.add(self)
        elif not self.server.admit_agent(self, self.transport, self.peer):
            return
        self.server.agent_connections.add(self)
        self._handshake_timer = self.loop.call_later(
            self.server.config.handshake_timeout, self._on_handshake_timeout
        )

    def _on_handshake_timeout(self) -> None:
        self._handshake_timer = None
        if self.sandbox_id is None and self.transport is not None:
            self.server.preauth_warnings.log(
                self.loop.time(),
                "agent %s sent no hello within %.0fs; closing",
                self.peer,
                self.server.config.handshake_timeout,
            )
            self.transport.abort()

    def describe(self) -> str:
        if self.sandbox_id is None:
            return f"agent {self.peer} (no hello yet)"
        return f"sandbox {self.sandbox_id} (agent {self.peer}, session {self.session_id})"

    def can_open_streams(self) -> bool:
        return not self._going_away and not self.session.closed and self.transport is not None

    def open_public_stream(self, endpoint: StreamEndpoint, port: int, client: str) -> int:
        sid = self.session.open_stream(port, "preview", client)
        endpoint.stream_id = sid
        self.add_stream(endpoint)
        state = self.server.registry.get(self.sandbox_id or "")
        record = state.exposures.get(port) if state is not None else None
        if record is not None and record.options.proxy_protocol:
            # PROXY v2 first, so the service sees the real client (tunneld/proxyproto.py)
            self.session.send_data(sid, proxy_header(endpoint.transport, client))
        return sid

    # -- control channel -------------------------------------------------------------------------
    def on_control(self, message: Any) -> None:
        if self.sandbox_id is None:
            # A hello and a malformed frame in one read: the frame closed the session before
            # the hello's event was dispatched. Nothing can be sent on it: do not attach.
            if isinstance(message, control.Hello) and not self.session.closed:
                self._on_hello(message)
            return
        if isinstance(message, (control.Ok, control.Error)):
            if isinstance(message, control.Error) and message.id in self.port_waits:
                self.port_waits[message.id] = message
            self.pending.resolve(message)
        elif isinstance(message, (control.Expose, control.Unexpose, control.ListExposures)):
            self._serve_request(message)
        else:
            self.session.send_control(
                control.Error(
                    "UNEXPECTED_MESSAGE",
                    f"{type(message).__name__} is not a request the edge serves",
                    None,
                )
            )

    def _serve_request(self, message: Any) -> None:
        """Answer one control request, unless the agent is over its budget.

        Every request costs a reply, and a `list` reply can be 1000x its request, so requests
        are rate-limited per session, and refused while earlier replies sit unread (the output
        backlog): a refusal is a ~100-byte error, and the tunnel stops being read at
        TUNNEL_OUTPUT_CAP anyway. A session that keeps going far past that is closed."""
        if (
            self.output_backlog > TUNNEL_OUTPUT_CAP // 2
            or len(self._writes) >= MAX_WRITES_IN_FLIGHT
            or not self._budget.take(self.loop.time())
        ):
            self._refused += 1
            if self._refused == 1 or self._refused % 100 == 0:
                log.warning(
                    "%s: control requests past the limit (%d refused so far)",
                    self.describe(),
                    self._refused,
                )
            if self._refused >= MAX_REFUSED_REQUESTS:
                log.warning("%s: closing the session (too many requests)", self.describe())
                self.go_away(GoAwayCode.TOO_MANY_REQUESTS)
                if self.transport is not None and self.output_backlog > TUNNEL_OUTPUT_CAP // 2:
                    self.transport.abort()  # it reads nothing, not even the GO_AWAY
                return
            self.session.send_control(
                control.Error(
                    "RATE_LIMITED",
                    "Too many control requests; slow down and retry.",
                    message.id,
                )
            )
            return
        if isinstance(message, control.Expose):
            self._reply_after_write(message.id, self.server.expose_from_agent, message)
        elif isinstance(message, control.Unexpose):
            self._reply_after_write(message.id, self.server.unexpose_from_agent, message)
        else:
            self._reply(message.id, lambda sid, m: self.server.exposure_messages(sid), message)
        self.flush()  # the reply goes to the transport now, where output_backlog sees it

    def _reply(self, request_id: int, handler: Any, message: Any) -> None:
        assert self.sandbox_id is not None
        try:
            exposures = handler(self.sandbox_id, message)
        except ValidationError as exc:
            self.session.send_control(control.Error(exc.code, exc.message, request_id))
        except Exception:  # a bug: an answer, as _reply_after_write gives one, not a dead link
            log.exception("%s: %s from the agent failed", self.describe(), type(message).__name__)
            self.session.send_control(
                control.Error("INTERNAL_ERROR", "Internal error; see the tunneld log.", request_id)
            )
        else:
            self._send_ok(request_id, exposures)

    def _send_ok(self, request_id: int, exposures: list[control.Exposure]) -> None:
        try:
            self.session.send_control(control.Ok(request_id, tuple(exposures)))
        except (control.ControlError, LocalProtocolError) as exc:
            # Only a list of many long-named exposures gets here; the admin API has no such limit.
            log.warning("%s: reply %d not sent: %s", self.describe(), request_id, exc)
            self.session.send_control(
                control.Error(
                    "TOO_LARGE",
                    "The reply does not fit one control message; list through the admin API.",
                    request_id,
                )
            )

    def _reply_after_write(self, request_id: int, handler: Any, message: Any) -> None:
        """Serve an agent's expose/unexpose: the Ok goes out once the store has the change."""
        assert self.sandbox_id is not None
        sandbox_id = self.sandbox_id

        async def write() -> None:
            try:
                exposures = await handler(sandbox_id, message)
            except ValidationError as exc:
                reply: Any = control.Error(exc.code, exc.message, request_id)
            except Exception:  # a bug: the agent still gets an answer, not its EDGE_TIMEOUT
                log.exception(
                    "%s: %s from the agent failed", self.describe(), type(message).__name__
                )
                reply = control.Error(
                    "INTERNAL_ERROR", "Internal error; see the tunneld log.", request_id
                )
            else:
                reply = None
            if self.session.closed:
                return  # the change is stored; the agent learns it from its next welcome
            if reply is None:
                self._send_ok(request_id, exposures)
            else:
                self.session.send_control(reply)
            self.flush()

        task = self.loop.create_task(write())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    def _on_hello(self, hello: control.Hello) -> None:
        server = self.server
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        refusal = server.auth.link_refusal(self)  # plaintext off loopback: see auth.py
        if refusal is not None:
            server.preauth_warnings.log(self.loop.time(), "agent %s: %s", self.peer, refusal)
            self._refuse("PLAINTEXT_REFUSED", refusal)
            return
        try:
            sandbox_id = validate_sandbox_id(hello.sandbox_id)
        except ValidationError as exc:
            self._refuse(exc.code, exc.message)
            return
        if not server.auth.verify(sandbox_id, hello.token):
            server.metrics.agent_auth_failures.inc()
            server.preauth_warnings.log(
                self.loop.time(),
                "agent %s: authentication failed for sandbox %s",
                self.peer,
                sandbox_id,
            )
            self._refuse("AUTH_FAILED", "Invalid agent token for this sandbox id.")
            return
        self.sandbox_id = sandbox_id
        self.agent_version = hello.version
        server.pending_agents.discard(self)
        server.auth.admit(self, hello.token)  # checked again on reload and at its expiry
        if server.registry.get(sandbox_id) is not None:  # exposures kept, or a live session
            server.metrics.agent_reconnects.inc()
        old = server.registry.attach(sandbox_id, self, self.loop.time())
        if old is not None and old is not self:
            log.info("sandbox %s: new session from %s replaces the old one", sandbox_id, self.peer)
            old.replaced()
        if server.cluster is not None:
            server.cluster.on_attach(self)  # claim the sandbox: other nodes forward to us
        server.metrics.agent_sessions.inc()
        self._send_welcome(server.exposure_messages(sandbox_id))
        log.info(
            "sandbox %s: agent connected from %s (session %s)",
            sandbox_id,
            self.peer,
            self.session_id,
        )

    def _send_welcome(self, exposures: list[control.Exposure]) -> None:
        """Welcome with as many exposures as fit one control message; Expose requests follow
        for the rest (the agent adds each to its set), so any set within the cap reaches it."""
        budget = control.MAX_CONTROL_MESSAGE_SIZE - _WELCOME_SLACK
        fit = 0
        for exposure in exposures:
            size = _encoded_size(exposure) + 1
            if size > budget:
                break
            budget -= size
            fit += 1
        welcome = control.Welcome(
            session=self.session_id,
            heartbeat_s=self.server.config.heartbeat_interval,
            limits={"max_streams": self.session_max_streams},
            exposures=tuple(exposures[:fit]),
        )
        try:
            self.session.send_control(welcome)
        except (control.ControlError, LocalProtocolError) as exc:  # pragma: no cover - a bug
            log.error("%s: welcome with %d exposures not sent (%s)", self.describe(), fit, exc)
            fit = 0
            self.session.send_control(
                control.Welcome(
                    session=welcome.session,
                    heartbeat_s=welcome.heartbeat_s,
                    limits=welcome.limits,
                    exposures=(),
                )
            )
        rest = exposures[fit:]
        if rest:
            log.info(
                "%s: welcome carries %d exposures, %d follow as expose requests",
                self.describe(),
                fit,
                len(rest),
            )
            task = self.loop.create_task(self._send_rest(rest))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def _send_rest(self, rest: list[control.Exposure]) -> None:
        timeout = self.server.config.control_timeout

        def expose_request(e: control.Exposure) -> Any:
            return self.request(lambda rid: control.Expose(rid, e.port, e.name, e.token), timeout)

        results = await asyncio.gather(*map(expose_request, rest), return_exceptions=True)
        assert self.sandbox_id is not None
        failed: list[BaseException] = []
        for exposure, result in zip(rest, results, strict=True):
            if isinstance(result, ControlRequestError) and result.code != "SANDBOX_NOT_CONNECTED":
                # The agent refused it (its own control API's port, exposed while it was
                # offline): it never serves it, so it must not stay listed or stored.
                refusal = AgentRefused(result.code, result.message)
                with contextlib.suppress(RegistryError):  # logged
                    await self.server._undo_refused_expose(self.sandbox_id, exposure.port, refusal)
            elif isinstance(result, BaseException):
                failed.append(result)
        if failed and not self.session.closed:
            log.warning(
                "%s: %d of %d exposures after the welcome not acknowledged (%s)",
                self.describe(),
                len(failed),
                len(rest),
                failed[0],
            )

    def _refuse(self, code: str, message: str) -> None:
        self.session.send_control(control.Error(code, message, None))
        self.session.close(GoAwayCode.AUTH_FAILED)
        self.flush()

    def replaced(self) -> None:
        """A newer session took over this sandbox."""
        self._detach()
        self.session.close(GoAwayCode.REPLACED)
        self.flush()

    def flush(self) -> None:
        if self.stopped:
            # Closed by the edge's stop: nothing more goes out. The resets of the public
            # streams that end meanwhile would still write, and asyncio's writelines() on a
            # transport after its close() raises TypeError (Python 3.12, 3.13.0).
            return
        super().flush()

    def go_away(self, code: GoAwayCode = GoAwayCode.SHUTTING_DOWN) -> None:
        self._going_away = True
        if not self.session.closed:
            self.session.close(code)
            self.flush()

    # -- streams ---------------------------------------------------------------------------------
    def reset_port(self, port: int) -> int:
        """Reset every live preview stream of ``port`` (unexpose closes the URL at once)."""
        count = 0
        for sid, endpoint in list(self.streams.items()):
            if isinstance(endpoint, PublicConnection) and endpoint.port == port:
                self.streams.pop(sid, None)
                if not self.session.closed:
                    self.session.reset_stream(sid, ResetCode.UNEXPOSED)
                endpoint.peer_reset(ResetCode.UNEXPOSED)
                count += 1
        self.flush()
        return count

    # -- teardown --------------------------------------------------------------------------------
    def on_go_away(self, code: GoAwayCode) -> None:
        self._going_away = True

    def on_terminated(self, event: ConnectionTerminated) -> None:
        if self.sandbox_id is not None:
            self._end_logged = True
            log.log(
                logging.INFO if event.code in _ORDERLY_ENDS else logging.WARNING,
                "%s ended after %.1fs: %s by %s (%s)",
                self.describe(),
                self.loop.time() - self._connected_at,
                event.code.name,
                "the agent" if event.remote else "the edge",
                event.reason,
            )
        self._detach()

    def on_disconnected(self, exc: Exception | None) -> None:
        if self.sandbox_id is not None and not self._end_logged:
            # Lost without a GO_AWAY either way: kill -9, a dropped link, a TLS error.
            self._end_logged = True
            log.warning(
                "%s lost after %.1fs: %s",
                self.describe(),
                self.loop.time() - self._connected_at,
                f"{type(exc).__name__}: {exc}" if exc is not None else "connection closed by peer",
            )
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self.server.agent_connections.discard(self)
        self.server.pending_agents.discard(self)
        self._detach()

    def _detach(self) -> None:
        self._going_away = True
        self.pending.fail_all("SANDBOX_NOT_CONNECTED", "The agent disconnected.")
        if self.sandbox_id is not None and not self._lifetime_observed:
            self._lifetime_observed = True
            self.server.metrics.agent_session_seconds.observe(self.loop.time() - self._connected_at)
        if self.sandbox_id is not None:
            self.server.registry.detach(self.sandbox_id, self)
            if self.server.cluster is not None:
                self.server.cluster.on_detach(self)


class _TlsAgentListener:
    """The agent port with TLS: accepts connections itself (as ``tcpexpose.SniListener`` does)
    so that each counts against ``max_pending_agents`` from its accept, its TLS handshake
    included, and is refused at once past it; asyncio's own TLS server would only show it to us
    once the handshake is done. The handshake is bounded by ``handshake_timeout`` (a peer that
    never sends a ClientHello), then the session's hello timer starts. Quacks like the
    ``asyncio.Server`` it replaces (``sockets``, ``close``, ``wait_closed``)."""

    def __init__(self, server: EdgeServer, context: ssl.SSLContext) -> None:
        self.server = server
        self.loop = server.loop
        self.context = context
        self.sockets: list[socket.socket] = []
        self._acceptor = Acceptor(self.loop, "agent TLS listener", self._on_accept)
        self._handshakes: set[asyncio.Task[Any]] = set()
        self._closed = False

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> _TlsAgentListener:
        sockets = await bind(self.loop, host, port, backlog=1024, reuse_port=reuse_port)
        self._acceptor.serve(sockets)
        self.sockets = sockets
        return self

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._acceptor.close()
        for task in self._handshakes:
            task.cancel()  # its socket is closed

    async def wait_closed(self) -> None:
        if self._handshakes:
            await asyncio.gather(*self._handshakes, return_exceptions=True)

    def _on_accept(self, sock: socket.socket, address: Any) -> None:
        peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else "unknown"
        marker = _PendingTls()
        if not self.server.admit_agent(marker, sock, peer):
            return
        task = self.loop.create_task(self._handshake(sock, marker))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, sock: socket.socket, marker: _PendingTls) -> None:
        server = self.server
        try:
            await self.loop.connect_accepted_socket(
                lambda: EdgeSession(server, admitted=marker),
                sock,
                ssl=self.context,
                ssl_handshake_timeout=server.config.handshake_timeout,
            )
        except (Exception, asyncio.CancelledError) as exc:  # failed, timed out, or closing
            log.debug("agent TLS handshake failed: %r", exc)
            sock.close()
        finally:
            server.pending_agents.discard(marker)  # the session counts itself from its start


_T = TypeVar("_T")


async def _listening(what: str, host: str, port: int, opening: Awaitable[_T]) -> _T:
    """``opening``, the ``what`` listener being bound; an OSError it raises says which listener
    and which settings, as "address already in use" alone does not."""
    try:
        return await opening
    except OSError as exc:
        where = f"{host or '*'}:{port} ({_LISTENER_SETTINGS[what]})"
        error = OSError(f"cannot open the {what} listener on {where}: {exc}")
        error.errno = exc.errno  # str() without a second "[Errno N]"
        raise error from None


_LISTENER_SETTINGS: Final = {
    "agent": "agent_host, agent_port",
    "public": "public_host, public_port",
    "admin": "admin_host, admin_port",
    "HTTP-to-HTTPS redirect": "public_host, public_redirect_port",
}


def _owes(transport: Any) -> bool:
    """A public connection's client has not taken everything written to it yet: bytes in the
    transport's buffer, or, for a TLS connection or a clean close under way, bytes the client
    has not taken (``unsent_bytes``: a TLS layer holds them below its transport's buffer, and
    an HTTP/2 connection's last DATA may wait there after its stream is done)."""
    if transport is None:
        return False
    if transport.get_write_buffer_size():
        return True
    if transport.is_closing() or transport.get_extra_info("ssl_object") is not None:
        return unsent_bytes(transport) > 0
    return False


class _PendingTls:
    """A TLS agent connection in its TLS handshake, in ``EdgeServer.pending_agents``."""

    __slots__ = ()


def _check_preview_config(config: Config) -> None:
    """ConfigError unless preview URLs can be built under ``config`` (its domain, scheme and
    url_port: what ``Config.validate()`` checks of them). An embedder's Config that skipped
    ``validate()`` would otherwise have its exposes stored before the URL fails, and every agent
    that connects fail in its welcome and reconnect, in a loop."""
    try:
        build_preview_url(
            MIN_PORT,
            "a",
            None,
            config.domain,
            scheme=config.scheme,
            public_port=config.url_port or None,
        )
    except ValidationError as exc:
        raise ConfigError(f"cannot build preview URLs: {exc.message}") from None


class EdgeServer:
    """All listeners of one tunneld process."""

    def __init__(
        self,
        config: Config,
        loop: asyncio.AbstractEventLoop | None = None,
        store: Store | None = None,
    ) -> None:
        """``store`` None: exposures in memory only (tests, the demo); ``tunneld serve`` passes
        the configured store (:func:`tunneld.store.open_store`). ConfigError when preview URLs
        cannot be built under ``config`` (a Config that skipped ``validate()``)."""
        _check_preview_config(config)
        self.config = config
        self.loop = loop or asyncio.get_running_loop()
        self.registry = Registry(store, config.max_exposures_per_sandbox, config.max_sandboxes)
        self.metrics = Metrics()
        self.auth = AgentAuth(self)
        self.public_connections: set[PublicConnection] = set()
        self.public_limits = PublicLimits()
        self.tcp = TcpExposures(self)  # tcp / tls exposures (tunneld/tcpexpose.py)
        # Request inspection (tunneld/inspect.py): records of inspected sandboxes, this node's
        # Access lines, batched per loop iteration (tunneld/accesslog.py), when access_log is on.
        self.access_writer = AccessWriter(self.loop, config.log_format)
        self.inspector = Inspector(
            max_requests=config.inspect_max_requests,
            body_bytes=config.inspect_body_bytes,
            max_bytes=config.inspect_max_bytes,
            redact=config.inspect_redact,
        )
        self.agent_connections: set[EdgeSession] = set()
        # Agent connections accepted but not authenticated yet (a TLS one from its accept, while
        # its TLS handshake runs): at most max_pending_agents, then refused at once.
        self.pending_agents: set[EdgeSession | _PendingTls] = set()
        self.preauth_warnings = RateLimitedLog(log, _PREAUTH_WHAT, self.loop.time())
        self.link_log = link_closed_log(self.loop.time())
        # The listeners by name, in the order opened (agent, public, admin, then the
        # HTTP-to-HTTPS redirect when configured): /readyz names a lost one by its key
        self.listeners: dict[str, Any] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._feed: _StoreFeed | None = None  # a shared store's changes (Redis), applied here
        # With a Redis store: ownership of agent sessions and node links (tunneld/cluster.py)
        self.cluster: Cluster | None = None
        self.handover: HandoverServer | None = None  # workers of one host pass sockets
        self.parser = default_parser(config.parser)
        self.background: set[asyncio.Task[None]] = set()  # tasks a connection started
        self.ready = False  # set once start() bound every listener (GET /readyz)
        self.draining = False  # set when stop() begins
        self.public_port = 0
        self.agent_port = 0
        self.admin_port = 0
        self.redirect_port = 0  # public_redirect_port once bound (0: no redirect listener)
        # TLS certificates of the public listener and the admin API (tunneld/tls.py), reloaded
        # by SIGHUP (reload_tls)
        self.public_tls: CertificateSet | None = None
        self.admin_tls: CertificateSet | None = None
        self.metrics.bind(
            agents=lambda: sum(1 for s in self.registry.sandboxes() if s.session is not None),
            streams=lambda: sum(len(c.streams) for c in self.agent_connections),
            exposures=lambda: sum(len(s.exposures) for s in self.registry.sandboxes()),
            public_open=lambda: len(self.public_connections),
        )
        self.registry.on_write = self.metrics.store_write
        self.registry.on_late_change = self._late_change
        self.registry.host_check = self.check_host

    def admit_agent(
        self,
        conn: EdgeSession | _PendingTls,
        transport: asyncio.Transport | socket.socket,
        peer: str,
    ) -> bool:
        """Count a new agent connection as pending (not authenticated yet), or, with
        ``max_pending_agents`` already pending, abort it at once, count it and say so (within
        the rate of the warnings about unauthenticated agents)."""
        limit = self.config.max_pending_agents
        if len(self.pending_agents) >= limit:
            self.metrics.agent_connections_refused.inc()
            self.preauth_warnings.log(
                self.loop.time(),
                "agent connection from %s refused: %d connections already wait to "
                "authenticate (max_pending_agents)",
                peer,
                limit,
            )
            if isinstance(transport, socket.socket):
                transport.close()
            else:
                transport.abort()
            return False
        self.pending_agents.add(conn)
        return True

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        from .admin import AdminServer

        config = self.config
        loop = self.loop
        parser = self.parser
        guard_accept(loop)  # asyncio's listeners out of descriptors: no traceback storm
        await self._load_exposures()
        await self._start_feed()

        def public_factory() -> PublicConnection:
            self.metrics.public_connections.inc()
            if h2:  # HTTP/1.1 or HTTP/2, as ALPN decides (tunneld/h2public.py)
                return PublicTlsConnection(self, parser)
            return PublicConnection(self, parser)

        public_pairs = tls_pairs(config)
        h2 = bool(public_pairs) and config.public_h2
        if public_pairs:
            self.public_tls = CertificateSet(public_pairs, "public_tls", public_alpn(config))
        if config.admin_tls_cert:
            self.admin_tls = CertificateSet(
                [(config.admin_tls_cert, config.admin_tls_key)], "admin_tls"
            )
        tls: ssl.SSLContext | None = None
        if config.tls_cert:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(config.tls_cert, config.tls_key)
        if self.registry.store.kind == "redis":
            from .cluster import Cluster

            self.cluster = Cluster(self, self.registry.store)  # type: ignore[arg-type]
            if config.handover:
                from .handover import HandoverServer

                self.handover = HandoverServer(self, self.cluster.node_id)
                self.handover.start()
                self.cluster.node_info.update(self.handover.info())
            await self.cluster.start(tls)  # node links up before any agent can connect
        # reuse_port: the workers of `tunneld serve --workers N` each listen on the same ports
        # and the kernel spreads connections over them (tunneld/supervisor.py).
        reuse = config.reuse_port
        agents: Any
        if tls is not None:
            # accepts itself: a connection counts against max_pending_agents from its accept
            agents = await _listening(
                "agent",
                config.agent_host,
                config.agent_port,
                _TlsAgentListener(self, tls).start(
                    config.agent_host, config.agent_port, reuse_port=reuse
                ),
            )
        else:
            agents = await _listening(
                "agent",
                config.agent_host,
                config.agent_port,
                loop.create_server(
                    lambda: EdgeSession(self),
                    config.agent_host,
                    config.agent_port,
                    backlog=1024,
                    reuse_port=reuse,
                ),
            )
        public: Any
        if config.public_tls_passthrough and self.public_tls is not None:
            # TLS routed by server name first: tls exposures unterminated (tunneld/tcpexpose.py)
            public = await _listening(
                "public",
                config.public_host,
                config.public_port,
                SniListener(
                    self.tcp,
                    public_factory,
                    self.public_tls.context,
                    handshake_timeout=config.head_timeout,
                    shutdown_timeout=TLS_SHUTDOWN_TIMEOUT,
                ).start(config.public_host, config.public_port, reuse_port=reuse),
            )
        else:
            context = self.public_tls.context if self.public_tls is not None else None
            factory: Callable[[], asyncio.BaseProtocol] = public_factory
            if self.handover is not None and context is None:
                # A connection may be another worker's: a LandingConnection looks at its first
                # read and hands it over, or becomes a PublicConnection (tunneld/landing.py).
                from .landing import LandingConnection

                def factory() -> LandingConnection:
                    self.metrics.public_connections.inc()
                    return LandingConnection(self)

            public = await _listening(
                "public",
                config.public_host,
                config.public_port,
                loop.create_server(
                    factory,
                    config.public_host,
                    config.public_port,
                    backlog=4096,
                    reuse_port=reuse,
                    ssl=context,
                    # the handshake is part of the request head's time budget (slowloris bound)
                    ssl_handshake_timeout=config.head_timeout if context is not None else None,
                    ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT if context is not None else None,
                ),
            )
        self.admin = AdminServer(self)
        admin = await _listening(
            "admin",
            config.admin_host,
            config.admin_port,
            self.admin.http.start(
                config.admin_host,
                config.admin_port,
                reuse_port=reuse,
                ssl=self.admin_tls.context if self.admin_tls is not None else None,
            ),
        )
        self.listeners = {"agent": agents, "public": public, "admin": admin}
        if config.public_redirect_port:
            from .tls import RedirectServer

            redirect = await _listening(
                "HTTP-to-HTTPS redirect",
                config.public_host,
                config.public_redirect_port,
                RedirectServer(self).start(
                    config.public_host, config.public_redirect_port, reuse_port=reuse
                ),
            )
            self.listeners["HTTP-to-HTTPS redirect"] = redirect
            self.redirect_port = redirect.sockets[0].getsockname()[1]
        if config.idle_timeout > 0:
            self._sweeper = loop.create_task(self._sweep_idle(config.idle_timeout))
        self.agent_port = agents.sockets[0].getsockname()[1]
        self.public_port = public.sockets[0].getsockname()[1]
        self.admin_port = admin.sockets[0].getsockname()[1]
        await self.tcp.start()  # the public TCP ports of stored tcp exposures
        self.ready = True  # /readyz: listeners bound, exposures loaded
        log.info(
            "tunneld listening: public %s://%s:%d (domain %s, parser %s), agents %s:%d%s, admin %s://%s:%d",
            "https" if self.public_tls is not None else "http",
            config.public_host,
            self.public_port,
            config.domain,
            parser.name,
            config.agent_host,
            self.agent_port,
            " (TLS)" if tls else "",
            "https" if self.admin_tls is not None else "http",
            config.admin_host,
            self.admin_port,
        )

    @property
    def _servers(self) -> list[Any]:
        """The listeners in the order opened (tests/test_listen.py reads them so)."""
        return list(self.listeners.values())

    def reload_tls(self, config: Config) -> None:
        """SIGHUP: re-read the certificate files for new handshakes (open connections keep
        theirs). A listener without TLS needs a restart to get it; a bad file keeps the old."""
        for what, current, pairs in (
            ("public_tls", self.public_tls, tls_pairs(config)),
            (
                "admin_tls",
                self.admin_tls,
                [(config.admin_tls_cert, config.admin_tls_key)] if config.admin_tls_cert else [],
            ),
        ):
            if current is not None and pairs:
                current.reload(pairs)
            elif pairs or current is not None:
                log.warning("%s: turning TLS on or off needs a restart; not changed", what)

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, send GO_AWAY to every agent, wait up to ``grace`` for streams and for
        the responses still on their way to clients, then end every connection (``_cut``) and
        close. Never longer than ``grace`` plus about twice ``STOP_CLOSE_WAIT``, whatever the
        clients do, before the store and the admin API close."""
        self.draining = True  # /readyz answers 503 from now on
        grace = self.config.grace_period if grace is None else grace
        self.auth.close()
        await self._stop_feed()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in self.listeners.values():
            server.close()
        self.tcp.close_listeners()
        for session in list(self.agent_connections):
            session.go_away(GoAwayCode.SHUTTING_DOWN)
        deadline = self.loop.time() + grace
        while self.loop.time() < deadline and (
            any(s.streams for s in self.agent_connections)
            or any(_owes(c.transport) for c in self.public_connections)
        ):
            await asyncio.sleep(0.05)
        for conn in list(self.public_connections):
            conn.end()  # a live stream is cut with RST, an idle connection closed normally
        await self.tcp.close()  # raw connections too (RST)
        for session in list(self.agent_connections):
            if session.transport is not None:
                session.flush()
                session.stopped = True
                session.transport.close()
        await self._cut(STOP_CLOSE_WAIT)
        if self.handover is not None:
            self.handover.close()
        if self.cluster is not None:
            await self.cluster.stop()
        for task in list(self.background):
            task.cancel()
        await self.admin.close()
        # Changes still being written (their callers may be gone) settle into the view first;
        # bounded: a write the disk holds up past this is left to the store's close.
        await self.registry.wait_writes(self.registry.write_timeout)
        self.access_writer.flush()
        await self.registry.store.close()

    def _open_transports(self) -> list[Any]:
        """The transports of the public connections and agent sessions still open."""
        transports = [c.transport for c in self.public_connections]
        transports += [s.transport for s in self.agent_connections]
        return [t for t in transports if t is not None]

    async def _cut(self, wait: float) -> None:
        """The end of a stop, once every connection was ended or closed: up to ``wait`` seconds
        for the clean closes under way to finish (an idle client answering ``close_notify``,
        an agent taking its GO_AWAY), then every public connection and agent session still
        open is aborted, with RST while its peer still lacks bytes (``abort_with_reset``: a
        client stalling the rest of a response must not see it end like a complete one, as it
        would once the process exits), else with a FIN. Then up to ``wait`` more for the
        listeners to let their last connections go (TLS handshakes, redirects: asyncio's
        ``Server.wait_closed`` waits for them since Python 3.12), never longer. The admin
        listener is left to ``AdminServer.close``, which ends its connections itself."""
        loop = self.loop
        deadline = loop.time() + wait
        while loop.time() < deadline and self._open_transports():
            await asyncio.sleep(0.02)
        for transport in self._open_transports():
            abort_with_reset(transport)
        admin = self.admin.http.server
        servers = [s for s in self.listeners.values() if s is not admin]
        for server in servers:
            abort_clients = getattr(server, "abort_clients", None)  # asyncio, Python 3.13+
            if abort_clients is not None:
                abort_clients()  # the connections no table here holds: a handshake, a redirect
        try:
            async with asyncio.timeout(wait):
                while self._open_transports():  # their connection_lost: the next iteration
                    await asyncio.sleep(0.01)
                for server in servers:
                    await server.wait_closed()
        except TimeoutError:
            log.debug("stop: connections still open %gs after the cut", wait)

    async def _load_exposures(self) -> None:
        """Read every stored exposure before any listener opens (StoreError: refuse to start)."""
        store = self.registry.store
        started = self.loop.time()
        # 100,000 records are 200,000+ objects: collecting while they are built only slows the
        # start (measured ~1.5x), and they live as long as the process, so freeze them after.
        gc.disable()
        try:
            records = await store.load_all()
            try:
                count = self.registry.load(records)
            except StoreError as exc:  # a record the rules refuse: say where it is stored
                raise StoreError(f"{store.location}: {exc}") from None
        finally:
            gc.enable()
        if count >= _FREEZE_FROM:
            gc.freeze()  # (not for small loads: a test process starts many edges)
        if store.kind != "memory":
            log.info(
                "loaded %d exposures of %d sandboxes from %s in %.2fs",
                count,
                len(self.registry.sandboxes()),
                store.location,
                self.loop.time() - started,
            )

    async def _sweep_idle(self, timeout: float) -> None:
        """Close public connections with no traffic either way for about ``timeout`` seconds.

        Each sweep (every timeout/2) marks what it saw; a connection idle across two sweeps is
        closed, so a connection is closed after between 1x and 1.5x the timeout of silence.
        """
        while True:
            await asyncio.sleep(timeout / 2)
            for conn in list(self.public_connections):
                if conn.idle_check() and conn.transport is not None:
                    log.info("closing a public connection silent for %.0fs", timeout)
                    # Silent both ways: almost always a keep-alive connection between requests
                    # (see close_idle for why one that has answered ends with RST).
                    conn.close_idle()

    # -- exposures -------------------------------------------------------------------------------
    def preview_url(self, sandbox_id: str, record: ExposureRecord) -> str:
        """Where clients reach the exposure: its preview URL; for a ``tcp`` exposure
        ``tcp://{preview host}:{public port}`` (the wildcard DNS record names the edge; no
        token is checked there), for a ``tls`` one the preview URL with https (TLS ends in the
        sandbox)."""
        config = self.config
        token = record.token if config.tokens else None
        protocol = record.options.protocol
        if protocol == "tcp" and record.public_port is not None:
            host = build_preview_host(record.port, sandbox_id, token, config.domain)
            return f"tcp://{host}:{record.public_port}"
        return build_preview_url(
            record.port,
            sandbox_id,
            token,
            config.domain,
            scheme="https" if protocol == "tls" else config.scheme,
            public_port=self.public_port if config.url_port is None else config.url_port or None,
        )

    def check_host(self, sandbox_id: str, record: ExposureRecord) -> None:
        """PREVIEW_HOST_TOO_LONG (400) if ``record``'s preview host does not fit DNS under this
        config (a first label over 63 or a host over 253 characters): its URL would never
        resolve. Every expose runs it before the store write (``Registry.host_check``)."""
        config = self.config
        token = record.token if config.tokens else None
        check_preview_host_length(record.port, sandbox_id, token, config.domain)

    def exposure_message(self, sandbox_id: str, record: ExposureRecord) -> control.Exposure:
        return control.Exposure(
            record.port, record.token, self.preview_url(sandbox_id, record), record.name
        )

    def exposure_messages(self, sandbox_id: str) -> list[control.Exposure]:
        return [self.exposure_message(sandbox_id, r) for r in self.registry.exposures(sandbox_id)]

    def _validate(
        self, port: object, name: object, token: object
    ) -> tuple[int, str | None, str | None]:
        port = validate_port(port)
        name = validate_port_name(name)
        if token is not None:
            token = validate_custom_token(token)
        return port, name, token

    async def expose_from_agent(
        self, sandbox_id: str, message: control.Expose
    ) -> list[control.Exposure]:
        port, name, token = self._validate(message.port, message.name, message.token)
        options = validate_exposure_options(
            message.protocol, message.proxy_protocol, message.inspect
        )
        before = self._exposure(sandbox_id, port)
        record = await self.tcp.commit_expose(sandbox_id, port, name, token, options)
        log.info("sandbox %s: port %d exposed by the agent%s", sandbox_id, port, _describe(options))
        self._cut_old_token(sandbox_id, before, record)
        return [self.exposure_message(sandbox_id, record)]

    async def unexpose_from_agent(
        self, sandbox_id: str, message: control.Unexpose
    ) -> list[control.Exposure]:
        port = validate_port(message.port)
        await self._unexpose_local(sandbox_id, port, " by the agent")
        return []

    async def _unexpose_local(self, sandbox_id: str, port: int, how: str = "") -> None:
        state = self.registry.get(sandbox_id)
        record = state.exposures.get(port) if state is not None else None
        if await self.registry.commit_unexpose(sandbox_id, port):
            log.info("sandbox %s: port %d unexposed%s", sandbox_id, port, how)
            if record is not None and record.public_port is not None:
                await self.tcp.unclaim(record.public_port, sandbox_id, port)
        await self.tcp.sync(sandbox_id)  # its public TCP port closes, raw connections reset
        state = self.registry.get(sandbox_id)
        session = state.session if state is not None else None
        if session is not None:
            session.reset_port(port)

    async def expose(
        self,
        sandbox_id: str,
        port: object,
        name: object = None,
        token: object = None,
        options: ExposureOptions = DEFAULT_OPTIONS,
        *,
        forward: bool = True,
    ) -> control.Exposure:
        """Orchestrator-side expose (admin API / SDK); ``options`` already validated. In a
        cluster, a sandbox whose agent is connected to another node is exposed there, so that
        its agent's verdict is the answer (:mod:`tunneld.exposefwd`; an owner that gives none
        leaves it to this node), unless ``forward`` is off (an expose that was forwarded
        here)."""
        sandbox_id = validate_sandbox_id(sandbox_id)
        port, name, token = self._validate(port, name, token)
        if forward and self.cluster is not None:
            from .exposefwd import expose_elsewhere

            exposure = await expose_elsewhere(self, sandbox_id, port, name, token, options)
            if exposure is not None:
                return exposure
        before = self._exposure(sandbox_id, port)
        record = await self.tcp.commit_expose(sandbox_id, port, name, token, options)
        log.info("sandbox %s: port %d exposed%s", sandbox_id, port, _describe(options))
        self._cut_old_token(sandbox_id, before, record)
        try:
            await self._tell_agent(
                sandbox_id, lambda rid: control.Expose(rid, record.port, record.name, record.token)
            )
        except AgentRefused as exc:
            await self._undo_refused_expose(sandbox_id, port, exc)
            raise RegistryError(
                _EXPOSE_REFUSAL_STATUSES.get(exc.code, 502),
                exc.code,
                f"{exc.message} Port {port} is not exposed.",
            ) from None
        return self.exposure_message(sandbox_id, record)

    def _exposure(self, sandbox_id: str, port: int) -> ExposureRecord | None:
        state = self.registry.get(sandbox_id)
        return state.exposures.get(port) if state is not None else None

    def _cut_old_token(
        self, sandbox_id: str, before: ExposureRecord | None, after: ExposureRecord | None
    ) -> None:
        """A port's token changed: its old URL answers 404 from now on, and the live preview
        connections opened with it are reset as by an unexpose, or they would keep reaching the
        service with the old token (docs/architecture.md, step 8)."""
        if before is None or after is None or before.token == after.token or not self.config.tokens:
            return
        state = self.registry.get(sandbox_id)
        if state is not None and state.session is not None:
            count = state.session.reset_port(after.port)
            if count:
                log.info(
                    "sandbox %s: port %d has a new token; %d live connections of the old URL reset",
                    sandbox_id,
                    after.port,
                    count,
                )

    async def _undo_refused_expose(self, sandbox_id: str, port: int, refusal: AgentRefused) -> None:
        """The agent answered an expose with an error: it will not serve the port (its own
        control API's port: INVALID_PORT), so the exposure must not exist. Remove it, from the
        store too; a removal that fails is the caller's answer (the exposure is still there)."""
        log.warning(
            "sandbox %s: the agent refused the expose of port %d (%s: %s); exposure removed",
            sandbox_id,
            port,
            refusal.code,
            refusal.agent_message,
        )
        try:
            await self._unexpose_local(sandbox_id, port)
        except RegistryError as exc:
            log.error(
                "sandbox %s: port %d, refused by the agent, could not be unexposed: %s",
                sandbox_id,
                port,
                exc.message,
            )
            raise RegistryError(
                exc.status,
                exc.code,
                f"{refusal.message} Removing the exposure failed, so it is still recorded: "
                f"{exc.message}",
            ) from None

    async def unexpose(self, sandbox_id: str, port: object) -> None:
        sandbox_id = validate_sandbox_id(sandbox_id)
        port = validate_port(port)
        await self._unexpose_local(sandbox_id, port)
        await self._tell_agent(sandbox_id, lambda rid: control.Unexpose(rid, port))

    # -- a shared store's feed: exposes and unexposes made through other nodes -------------------
    async def _start_feed(self) -> None:
        """Apply other nodes' changes when the store has a feed (Redis; memory and sqlite do
        not: one edge is the only writer). The first Resync arrives once subscribed."""
        store: Any = self.registry.store
        if not hasattr(store, "watch"):
            return
        warning = await store.check_durability()
        if warning:
            log.warning("%s", warning)
        self._feed = _StoreFeed(self)
        store.watch(self._feed.offer)

    async def _stop_feed(self) -> None:
        feed, self._feed = self._feed, None
        if feed is None:
            return
        self.registry.store.unwatch(feed.offer)  # type: ignore[attr-defined]
        await feed.close()

    async def _apply_store_change(self, change: Any) -> None:
        """One change from the feed: the view first, then what a local change would do too:
        the agent, when this node holds its session, gets Expose/Unexpose; an unexpose resets
        the port's live streams. A Resync replaces the view with the snapshot, same effects."""
        from .redis_store import ExposureDeleted, ExposurePut, Resync

        registry = self.registry
        if isinstance(change, ExposurePut):
            before = self._exposure(change.record.sandbox_id, change.record.port)
            record = await registry.apply_remote_put(change.record)
            if record is not None:
                self._remote_exposed(change.record.sandbox_id, record)
                self._cut_old_token(change.record.sandbox_id, before, record)
        elif isinstance(change, ExposureDeleted):
            if await registry.apply_remote_delete(change.sandbox_id, change.port):
                self._remote_unexposed(change.sandbox_id, change.port)
        elif isinstance(change, Resync):
            previous = {
                (r.sandbox_id, r.port): self._exposure(r.sandbox_id, r.port) for r in change.records
            }
            installed, removed = registry.resync(change.records)
            for sandbox_id, port in removed:
                self._remote_unexposed(sandbox_id, port)
            for sandbox_id, record in installed:
                self._remote_exposed(sandbox_id, record)
                self._cut_old_token(sandbox_id, previous.get((sandbox_id, record.port)), record)
            if installed or removed:
                log.info(
                    "store resync: %d exposures installed or changed, %d removed",
                    len(installed),
                    len(removed),
                )

    def _late_change(
        self,
        sandbox_id: str,
        port: int,
        record: ExposureRecord | None,
        before: ExposureRecord | None,
    ) -> None:
        """A change answered 503 "may still be applied" that the store saved after all (the
        registry applied it to the view and logged it): the rest of what it does, as for a
        change made through another node (the agent told, tcp listeners synced, the live
        connections of a token it replaced cut)."""
        if record is not None:
            self._remote_exposed(sandbox_id, record, "after its 503")
            self._cut_old_token(sandbox_id, before, record)
        else:
            self._remote_unexposed(sandbox_id, port, "after its 503")

    def _remote_exposed(
        self, sandbox_id: str, record: ExposureRecord, how: str = "through another node"
    ) -> None:
        log.info("sandbox %s: port %d exposed %s", sandbox_id, record.port, how)
        self.tcp.sync_later([sandbox_id])
        self._tell_agent_later(
            sandbox_id,
            lambda rid: control.Expose(rid, record.port, record.name, record.token),
            f"the expose of port {record.port}",
            refused_port=record.port,
        )

    def _remote_unexposed(
        self, sandbox_id: str, port: int, how: str = "through another node"
    ) -> None:
        log.info("sandbox %s: port %d unexposed %s", sandbox_id, port, how)
        self.tcp.sync_later([sandbox_id])
        state = self.registry.get(sandbox_id)
        if state is not None and state.session is not None:
            state.session.reset_port(port)
        self._tell_agent_later(
            sandbox_id, lambda rid: control.Unexpose(rid, port), f"the unexpose of port {port}"
        )

    def _tell_agent_later(
        self, sandbox_id: str, factory: Any, what: str, *, refused_port: int | None = None
    ) -> None:
        """``_tell_agent`` without waiting: nobody waits on the answer; a failure is logged.
        ``refused_port``: an expose, undone when the agent refuses it (its control API's port,
        exposed through another node: that node answered before this agent was asked)."""
        state = self.registry.get(sandbox_id)
        if state is None or state.session is None:
            return  # not connected here: the agent gets the set in its next welcome
        feed = self._feed
        tasks = feed.tells if feed is not None else self.background

        async def tell() -> None:
            try:
                await self._tell_agent(sandbox_id, factory)
            except RegistryError as exc:
                if isinstance(exc, AgentRefused) and refused_port is not None:
                    with contextlib.suppress(RegistryError):  # logged
                        await self._undo_refused_expose(sandbox_id, refused_port, exc)
                    return
                log.warning("sandbox %s: agent not told of %s: %s", sandbox_id, what, exc.message)

        task = self.loop.create_task(tell())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _tell_agent(self, sandbox_id: str, factory: Any) -> None:
        state = self.registry.get(sandbox_id)
        session = state.session if state is not None else None
        if session is None or not session.can_open_streams():
            return  # offline: the agent gets the set in its next welcome
        try:
            await session.request(factory, self.config.control_timeout)
        except TimeoutError:
            log.warning("sandbox %s: agent did not acknowledge in time", sandbox_id)
            raise RegistryError(
                504,
                "AGENT_TIMEOUT",
                f"The agent of sandbox {sandbox_id} did not acknowledge in time.",
            ) from None
        except ControlRequestError as exc:
            if exc.code == "SANDBOX_NOT_CONNECTED":
                return  # it went away meanwhile; the registry already has the change
            raise AgentRefused(exc.code, exc.message) from None

    async def wait_port(
        self,
        sandbox_id: str,
        port: object,
        *,
        mode: object = "http",
        path: object = "/",
        status_min: object = 200,
        status_max: object = 399,
        interval_ms: object = 500,
        timeout_s: object = 30.0,
        forward: bool = True,
    ) -> None:
        """Ask the sandbox's agent to probe ``port`` until it is ready (``watch_port``); return
        when it is. Raises :class:`PortNotReady` (504) when ``timeout_s`` passed first, and
        :class:`RegistryError` 503 SANDBOX_NOT_CONNECTED when the agent is not connected here or
        leaves meanwhile. Never waits longer than ``timeout_s`` plus ``control_timeout``. In a
        cluster, a sandbox whose agent is on another node is waited for there
        (:mod:`tunneld.waitfwd`), unless ``forward`` is off (a wait that was forwarded here)."""
        sandbox_id = validate_sandbox_id(sandbox_id)
        try:
            message = control.WatchPort(
                0,
                validate_port(port),
                mode,  # type: ignore[arg-type]
                path,  # type: ignore[arg-type]
                status_min,  # type: ignore[arg-type]
                status_max,  # type: ignore[arg-type]
                interval_ms,  # type: ignore[arg-type]
                timeout_s,  # type: ignore[arg-type]
            )
            control.encode_message(message)  # the codec's bounds are the API's
        except control.ControlError as exc:
            where, _, what = exc.message.partition(": ")
            field = where.removeprefix("watch_port.")
            field = _WATCH_FIELDS.get(field, field)
            raise RegistryError(400, "INVALID_REQUEST", f"Invalid {field}: {what}.") from None
        if message.status_min > message.status_max:
            raise RegistryError(400, "INVALID_REQUEST", "statusMin is greater than statusMax.")
        state = self.registry.get(sandbox_id)
        session = state.session if state is not None else None
        no_session = session is None or not session.can_open_streams()
        if no_session and forward and self.cluster is not None:
            from .waitfwd import forward_wait

            await forward_wait(self.cluster, sandbox_id, message, self.config.control_timeout)
            return
        if session is None or not session.can_open_streams():
            where = " to this node" if self.cluster is not None else ""
            raise RegistryError(
                503, "SANDBOX_NOT_CONNECTED", f"Sandbox {sandbox_id} is not connected{where}."
            )
        if session.agent_version < control.WATCH_PORT_VERSION:
            raise RegistryError(
                501,
                "AGENT_TOO_OLD",
                f"The agent of sandbox {sandbox_id} cannot wait for ports; upgrade tunnel-agent.",
            )
        request_ids: list[int] = []

        def factory(request_id: int) -> control.WatchPort:
            request_ids.append(request_id)
            session.port_waits[request_id] = None
            return dataclasses.replace(message, id=request_id)

        budget = message.timeout_s + self.config.control_timeout
        try:
            await session.request(factory, budget)
        except asyncio.CancelledError:
            # The admin client left (or the node that forwarded the wait stopped it): stop the
            # agent's probes now, not at the timeout. An older agent would drop its session at
            # the unknown message, so it keeps probing until its own timeout.
            if request_ids and session.agent_version >= control.UNWATCH_PORT_VERSION:
                with contextlib.suppress(LocalProtocolError):
                    if not session.session.closed:
                        session.session.send_control(control.UnwatchPort(request_ids[0]))
                        session.flush()
            raise
        except TimeoutError:
            raise RegistryError(
                504,
                "AGENT_TIMEOUT",
                f"The agent of sandbox {sandbox_id} did not answer within {budget:g} s.",
            ) from None
        except ControlRequestError as exc:
            reply = session.port_waits.get(request_ids[0]) if request_ids else None
            if exc.code == "PORT_NOT_READY":
                raise PortNotReady(
                    message.port, exc.message, reply.status_code if reply else None
                ) from None
            if exc.code == "SANDBOX_NOT_CONNECTED":
                raise RegistryError(
                    503,
                    "SANDBOX_NOT_CONNECTED",
                    f"The agent of sandbox {sandbox_id} disconnected while waiting for port "
                    f"{message.port}.",
                ) from None
            status = _WATCH_STATUSES.get(exc.code, 502)
            raise RegistryError(status, exc.code, f"The agent refused: {exc.message}") from None
        finally:
            for request_id in request_ids:
                session.port_waits.pop(request_id, None)


class AgentRefused(RegistryError):
    """The agent answered an expose or unexpose with an error (502 unless the caller maps the
    code); ``agent_message`` is the agent's own sentence."""

    def __init__(self, code: str, agent_message: str) -> None:
        super().__init__(502, code, f"The agent refused: {agent_message}")
        self.agent_message = agent_message


# An agent's refusal of an orchestrator's expose, as the admin API answers it: the agent's own
# control API port is a bad port like 3000 (agent/core.py refuses it); any other code is 502.
_EXPOSE_REFUSAL_STATUSES: Final = {"INVALID_PORT": 400}


class PortNotReady(RegistryError):
    """``wait_port``: the port was not ready in time; ``last_status`` is the last HTTP status the
    agent's probe saw (None: none, e.g. nothing listened)."""

    def __init__(self, port: int, message: str, last_status: int | None) -> None:
        super().__init__(504, "PORT_NOT_READY", message)
        self.port = port
        self.last_status = last_status


# watch_port fields by the admin API's names, for its error messages.
_WATCH_FIELDS: Final = {
    "status_min": "statusMin",
    "status_max": "statusMax",
    "interval_ms": "interval (ms)",
    "timeout_s": "timeout (s)",
}
# The agent's refusals of a watch_port, as the admin API answers them.
_WATCH_STATUSES: Final = {
    "INVALID_PORT": 400,
    "INVALID_REQUEST": 400,
    "TOO_MANY_WATCHES": 429,
}


# Changes from other nodes waiting to be applied. A node that falls this far behind (a burst of
# exposes elsewhere while its loop is busy) drops them and asks the store for a fresh snapshot,
# which replaces the view as after a reconnect: memory stays bounded and nothing is lost.
FEED_BACKLOG: Final = 10_000


class _StoreFeed:
    """Another node's changes, in the store's order: a bounded queue and the task that applies
    it. Past :data:`FEED_BACKLOG` the queue is dropped and a Resync requested; changes until
    that Resync are ignored (its snapshot, read after resubscribing, holds them)."""

    def __init__(self, server: EdgeServer) -> None:
        self.server = server
        self.changes: asyncio.Queue[Any] = asyncio.Queue()
        self.consumer = server.loop.create_task(self._consume(), name="tunneld-store-feed")
        self.tells: set[asyncio.Task[None]] = set()
        self.awaiting_resync = False
        self.overflows = 0

    def offer(self, change: Any) -> None:
        """The store's callback (on the event loop)."""
        from .redis_store import Resync

        changes = self.changes
        if isinstance(change, Resync):
            self.awaiting_resync = False
            _drain(changes)  # older than the snapshot, which supersedes them
        elif self.awaiting_resync:
            return
        elif changes.qsize() >= FEED_BACKLOG:
            _drain(changes)
            self.awaiting_resync = True
            self.overflows += 1
            self.server.metrics.store_feed_overflows.inc()
            log.warning(
                "store feed: %d changes from other nodes not applied yet; dropped them and "
                "asked for a full resync",
                FEED_BACKLOG,
            )
            self.server.registry.store.request_resync()  # type: ignore[attr-defined]
            return
        changes.put_nowait(change)

    async def close(self) -> None:
        for task in (self.consumer, *self.tells):
            task.cancel()
        await asyncio.gather(self.consumer, *self.tells, return_exceptions=True)

    async def _consume(self) -> None:
        while True:
            change = await self.changes.get()
            try:
                await self.server._apply_store_change(change)
            except Exception:
                log.exception("store feed: %s not applied", type(change).__name__)


def _drain(queue: asyncio.Queue[Any]) -> None:
    while not queue.empty():
        queue.get_nowait()


def _encoded_size(exposure: control.Exposure) -> int:
    """Bytes ``exposure`` takes in a control message (as the codec writes it: orjson)."""
    return len(
        orjson.dumps(
            {
                "port": exposure.port,
                "token": exposure.token,
                "url": exposure.url,
                "name": exposure.name,
            }
        )
    )


def _describe(options: ExposureOptions) -> str:
    """`` (tcp, PROXY v2, inspected)`` for a log line; empty for a plain preview URL."""
    parts = [options.protocol] if options.protocol != "http" else []
    if options.proxy_protocol:
        parts.append("PROXY v2")
    if options.inspect:
        parts.append("inspected")
    return f" ({', '.join(parts)})" if parts else ""
