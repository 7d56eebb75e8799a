"""The public listener: preview-URL traffic from browsers and curl.

Theory of operation
-------------------
Each client TCP connection becomes one stream to the sandbox's agent, which opens one TCP
connection to the service, so HTTP keep-alive and pipelining map one to one and response bytes are
relayed raw, unparsed and unbuffered (SSE, chunked, multi-GB downloads).

The client -> service direction is parsed, because every request on a keep-alive connection must be
checked. Where each request begins and ends is decided by the sans-IO ``RequestFramer``
(``tunneld/framing.py``: states HEAD, LENGTH, CHUNKED, UPGRADE_PENDING, TUNNEL, DONE); this class
is its I/O shell: socket bytes in, framer events to actions, timers, limits.

* The first head routes the connection: Host -> (port, sandbox, token) -> registry -> session ->
  new stream. Later heads must name the same route (else 421 once the earlier answers are out).
* Every forwarded head is rebuilt (``framing.forward_head``): ``Host: localhost:{port}`` (dev
  servers refuse foreign hosts), ``X-Forwarded-For/-Host/-Proto`` and ``X-Sandbox-Name`` set by us,
  and every client-sent header of the internal families (``X-Tunnel-*``, ``X-Sandbox-*``,
  ``X-Forwarded-*``, ``Forwarded``, ``X-Real-IP``) or with ``_`` in its name dropped.
* After an upgrade request, client reading pauses and the first response bytes of the stream go
  through the framer: 101 -> raw two-way tunnel; anything else -> that response, then close.
* Timers: ``head_timeout`` while a head is incomplete (408 before the first request),
  ``keepalive_timeout`` while idle between requests (nothing moving either way), and the edge's
  ``idle_timeout`` sweep for everything else (silent WebSockets, stalled bodies).
* Limits: ``max_connections`` in total and ``max_connections_per_ip``; past them a new connection
  gets 503 ``TOO_MANY_CONNECTIONS`` and is closed at once.
* Failures: before any response byte a JSON page (502 ``UPSTREAM_CONNECT_FAILED`` /
  ``UPSTREAM_RESET`` / ``UPSTREAM_CLOSED``, 503 ``SANDBOX_BUSY`` / ``SANDBOX_NOT_CONNECTED``);
  after one, a reset stream ends the client connection with RST (``abort_with_reset``), so a cut
  short response never looks complete.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, ClassVar, Final

import orjson

from protocol.errors import LocalProtocolError, ResetCode
from protocol.hostnames import PreviewRoute, parse_preview_host
from relay.buffers import SHARED
from relay.mux import (
    StalledCloseWatch,
    StreamEndpoint,
    abort_with_reset,
    peer_hung_up,
    set_reset_on_close,
    write_eof_or_abort,
)

from . import accesslog
from .accesslog import ConnectionLog
from .budget import RequestBudget
from .framing import (
    STATE_DONE,
    STATE_HEAD,
    STATE_TUNNEL,
    STATE_UPGRADE_PENDING,
    RequestFramer,
    forward_head,
)
from .handover import MAX_PRELUDE, OpenSocket, host_identity
from .handover import VERSION as HANDOVER_VERSION
from .httphead import MAX_HEAD_SIZE, HeadError, HeadParser, RequestHead, routing_host
from .inspect import ConnectionRecorder
from .tls import TLS_CLOSE_DEADLINE, TLS_NOTIFY_WAIT

if TYPE_CHECKING:
    from .config import Config
    from .edge import EdgeServer, EdgeSession

__all__ = ["PublicConnection", "error_response", "forward_head", "stalled_close_period"]

log = logging.getLogger("tunneld.public")

_REASONS: Final = {
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    421: "Misdirected Request",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}

# Refused connections are logged at most this often (a flood must not flood the log too).
_REFUSAL_LOG_INTERVAL: Final = 10.0
# How long a cluster node waits for its change feed before a 404 (``_recheck_miss``).
MISS_RECHECK_TIMEOUT: Final = 1.0
# The routes of the preview hosts seen lately (``_preview_route``): at most this many, and only
# hosts no longer than a DNS name with a port.
_MAX_ROUTES: Final = 4096
_MAX_ROUTED_HOST: Final = 300
_ROUTES: dict[tuple[bytes, str, bool], PreviewRoute] = {}


def _preview_route(host: bytes, domain: str, tokens: bool) -> PreviewRoute | None:
    """``parse_preview_host`` of a Host header's bytes, remembered for the hosts that route (a
    parse is about 20k instructions, a large part of a connection's routing). A host that does
    not route is parsed each time (its answer is a 404); when ``_MAX_ROUTES`` are remembered,
    all are forgotten. The key holds the domain and the token mode: a reload changes the route
    of every host at once."""
    key = (host, domain, tokens)
    route = _ROUTES.get(key)
    if route is None:
        route = parse_preview_host(host.decode("latin-1"), domain, tokens=tokens)
        if route is not None and len(host) <= _MAX_ROUTED_HOST:
            if len(_ROUTES) >= _MAX_ROUTES:
                _ROUTES.clear()
            _ROUTES[key] = route
    return route


def quick_route(server: EdgeServer, head: bytes | bytearray) -> PreviewRoute | None:
    """The route of a first read that is one whole plain head for a sandbox whose session is
    on another node, found on a look at its one Host header (``httphead.routing_host``),
    without parsing the head: the connection is then handed on unparsed. The owner parses and
    validates all of it, as for any connection it accepts, and answers; this node only chooses
    where it goes, and only where the full path would have sent it: an exposed http port, the
    right token, no session here. None: any other case (no whole head, more than one head, a
    body, two Host lines, an unknown host or token, the session here): the full parse."""
    size = head.find(b"\r\n\r\n") + 4
    if size != len(head) or size > MAX_HEAD_SIZE:
        return None  # no whole head yet, more than one head, a body, or too large
    host = routing_host(head)
    if host is None:
        return None
    config = server.config
    route = _preview_route(host, config.domain, config.tokens)
    if route is None:
        return None
    registry = server.registry
    state = registry.get(route.sandbox_id)
    if state is None or (state.session is not None and state.session.can_open_streams()):
        return None  # unknown here (404 or a recheck), or served here: the full path
    if (
        registry.match(route.sandbox_id, route.port, route.token) is not state
        or state.exposures[route.port].options.protocol != "http"
    ):
        return None
    return route


def send_socket(
    server: EdgeServer,
    transport: asyncio.BaseTransport,
    sandbox_id: str,
    port: int,
    prelude: bytes | bytearray,
    on_answer: Callable[[bool | None], object],
) -> bool | None:
    """Pass a public connection's socket itself to the sandbox's owner when it runs on this
    host (tunneld/handover.py), with ``prelude``, what was read from it. Not for a TLS
    connection: its session's keys and sequence numbers live in this process's SSL object,
    the socket alone would be undecipherable to the owner (the node link carries it). True:
    on its way (it leaves at the end of this loop iteration), ``on_answer`` gets the answer;
    False: not possible, the connection is still ours to forward; None: the owner's node
    record is not known here (yet)."""
    cluster = server.cluster
    handover = server.handover
    if cluster is None or handover is None or transport.is_closing():
        return False
    owner = cluster.owners.get(sandbox_id)
    if owner is None or owner[0] == cluster.node_id or len(prelude) > MAX_PRELUDE:
        return False
    record = cluster.nodes.get(owner[0])
    if record is None:
        return None
    if (
        record.get("host") != host_identity()
        or not record.get("handover")
        or record.get("handover_version") != HANDOVER_VERSION  # other code: the node link
    ):
        return False
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    header = {"sandbox": sandbox_id, "port": port, "epoch": owner[1]}
    return handover.send(
        record["handover"], OpenSocket(transport, sock), header, bytes(prelude), on_answer
    )


def error_response(status: int, code: str, message: str, retry_after: int = 0) -> bytes:
    """A small JSON error page; the connection closes after it."""
    body = orjson.dumps({"error": message, "code": code})
    retry = b"retry-after: %d\r\n" % retry_after if retry_after else b""
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\ncache-control: no-store\r\n%s\r\n"
        % (status, _REASONS.get(status, "Error").encode(), len(body), retry)
    ) + body


# Client IPs whose preview 404s are counted at once (the oldest is forgotten past this).
_MAX_MISS_BUCKETS: Final = 65536


class PublicLimits:
    """Public connections per client IP, preview 404s per client IP (a token bucket each), and
    refusals not yet logged (``EdgeServer``'s)."""

    __slots__ = ("last_log", "misses", "per_ip", "unlogged")

    def __init__(self) -> None:
        self.per_ip: dict[str, int] = {}
        self.misses: dict[str, RequestBudget] = {}  # ip -> its 404 budget, oldest first
        self.unlogged = 0
        self.last_log = float("-inf")

    def release(self, ip: str) -> None:
        """One connection (or HTTP/2 stream) of ``ip`` fewer."""
        per_ip = self.per_ip
        left = per_ip.get(ip, 1) - 1
        if left > 0:
            per_ip[ip] = left
        else:
            per_ip.pop(ip, None)

    def allow_miss(self, ip: str, now: float, rate: float, burst: int) -> bool:
        """Take one token of ``ip``'s 404 budget; False when it is spent (answer 429)."""
        budget = self.misses.pop(ip, None)  # re-inserted: the dict stays oldest first
        if budget is None:
            if len(self.misses) >= _MAX_MISS_BUCKETS:
                del self.misses[next(iter(self.misses))]
            budget = RequestBudget(rate, burst, now)
        self.misses[ip] = budget
        return budget.take(now)


class PublicConnection(StreamEndpoint):
    """One client connection on the public listener (see the module docstring)."""

    __slots__ = (
        "_access",
        "_adopted",
        "_client_ended",
        "_close_watch",
        "_counted_ip",
        "_first_hop",
        "_framer",
        "_holding",
        "_host_line",
        "_misdirected",
        "_miss_charged",
        "_peer",
        "_peer_ip",
        "_prelude",
        "_reset_begun",
        "_responded",
        "_route",
        "_routed_host",
        "_seen_activity",
        "_timer",
        "_timer_activity",
        "_timer_kind",
        "_trailer",
        "activity",
        "parser",
        "port",
        "sandbox_id",
        "server",
    )

    # What the client speaks, for request inspection when it is not the head's own version
    # (H2Stream: "2", its HTTP/1.1 head is built from HTTP/2 pseudo-headers).
    http_version: ClassVar[str | None] = None

    def __init__(self, server: EdgeServer, parser: HeadParser) -> None:
        super().__init__(None, 0)  # type: ignore[arg-type]  # bound to a session on the first head
        self.server = server
        self.parser = parser
        self._framer = RequestFramer(parser)
        self._holding = False  # reading paused until the service answers an upgrade
        self._route: tuple[int, str, str | None] | None = None
        self._routed_host = b""  # the first request's Host bytes
        self._host_line = b""
        self._trailer = b""
        self._responded = False  # response bytes reached the client
        self._misdirected: bytes | None = None  # error to send once the service finishes
        self._timer: asyncio.TimerHandle | None = None
        self._timer_kind = ""  # "head" or "keepalive"
        self._timer_activity = -1
        self._peer = "unknown"
        self._peer_ip = "unknown"
        self._counted_ip: str | None = None
        # Bytes read before the first head was routed, kept only in a cluster (another node may
        # own the sandbox: it then gets them all, unparsed; see tunneld/cluster.py).
        self._prelude: bytearray | None = bytearray() if server.cluster is not None else None
        self._adopted = b""  # what another worker read before handing this connection over
        # This node accepted the connection and may hand it over on a look at its first head's
        # Host (``_quick_hand_over``); False once adopted from another worker (parsed in full).
        self._first_hop = server.handover is not None
        self._miss_charged = False  # a 404 recheck took this connection's miss token
        self._access: ConnectionLog | None = None  # access log + X-Request-Id (accesslog.py)
        self.port = 0
        self.sandbox_id = ""
        # Bumped on every read and every response chunk; the edge's idle sweep and the keep-alive
        # timer compare it between two looks (cheaper than reading the clock per chunk).
        self.activity = 0
        self._seen_activity = -1
        self._close_watch: StalledCloseWatch | None = None  # a clean close the client stalls
        # The client's close_notify (or FIN) over TLS: the TLS layer closes by itself, and drops
        # whatever is written after it (eof_received)
        self._client_ended = False
        self._reset_begun = False  # the edge cut this connection (RST): never a clean end now

    # -- connection ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self._peer_ip = str(peer[0])
            self._peer = f"{peer[0]}:{peer[1]}" if ":" not in peer[0] else f"[{peer[0]}]:{peer[1]}"
        if self._counted_ip is None and not self._admit():  # (counted: ``landed``)
            return
        if self.server.config.access_log:
            server = self.server
            self._access = ConnectionLog(
                self._peer_ip, writer=server.access_writer, stats=server.metrics.requests
            )
        self.server.public_connections.add(self)
        self._arm_timer("head")
        if self._adopted:
            prelude, self._adopted = self._adopted, b""
            self.activity += 1
            self._feed(prelude)

    def landed(self, ip: str | None, timer: asyncio.TimerHandle | None) -> None:
        """Call before ``connection_made``: a ``LandingConnection`` (tunneld/landing.py) took the
        connection first and passes it on here. ``ip``: it counted the connection against
        ``max_connections_per_ip`` already (None: not counted, ``connection_made`` admits it);
        ``timer``: the head timer it armed at the accept, kept so that the head's deadline does
        not move. It looked at the first head's Host already, so this never does again."""
        self._first_hop = False
        if ip is not None:
            self._counted_ip = ip
        if timer is not None:
            self._timer = timer
            self._timer_kind = "head"

    def data_received(self, data: bytes) -> None:
        """The bytes a ``LandingConnection`` read before this took the connection over (the
        transport calls ``buffer_updated`` from then on)."""
        self.activity += 1
        self._feed(data)

    def _admit(self) -> bool:
        """Enforce ``max_connections`` and ``max_connections_per_ip``: 503 and close past them."""
        config = self.server.config
        limits = self.server.public_limits
        ip = self._peer_ip
        count = limits.per_ip.get(ip, 0)
        if len(self.server.public_connections) >= config.max_connections:
            what = f"{config.max_connections} public connections in total"
        elif count >= config.max_connections_per_ip:
            what = f"{config.max_connections_per_ip} connections from {ip}"
        else:
            limits.per_ip[ip] = count + 1
            self._counted_ip = ip
            return True
        now = self.server.loop.time()
        limits.unlogged += 1
        if now - limits.last_log >= _REFUSAL_LOG_INTERVAL:
            log.warning(
                "public connection from %s refused: limit of %s reached (%d refused since the "
                "last such message)",
                self._peer,
                what,
                limits.unlogged,
            )
            limits.last_log = now
            limits.unlogged = 0
        self.fail(503, "TOO_MANY_CONNECTIONS", f"Too many connections: the limit is {what}.", 1)
        return False

    # -- timers ----------------------------------------------------------------------------------
    def _arm_timer(self, kind: str) -> None:
        """Arm the head or keep-alive timer; an armed head timer is never pushed back."""
        if self._timer is not None:
            if self._timer_kind == kind:
                return
            self._timer.cancel()
        config = self.server.config
        delay = config.head_timeout if kind == "head" else config.keepalive_timeout
        self._timer_kind = kind
        self._timer_activity = self.activity
        self._timer = self.server.loop.call_later(delay, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        framer = self._framer
        transport = self.transport
        if transport is None:
            return
        if transport.is_closing():
            return  # a clean close under way: its StalledCloseWatch bounds it (close_gracefully)
        if self._timer_kind == "head":
            if self.mux is None and framer.state is STATE_HEAD:
                self.fail(408, "REQUEST_TIMEOUT", "The request head did not arrive in time.")
            elif framer.head_pending:
                # a slow head on a live stream: let the service finish, then close
                log.info("%s: request head not complete within head_timeout", self._peer)
                self._stop_upstream()
            self._after_input()
            return
        # keep-alive: between requests, or finishing after _stop_upstream
        if not (framer.idle or framer.state is STATE_DONE):
            return
        if self.activity != self._timer_activity:
            self._arm_timer("keepalive")  # bytes moved since: look again one timeout later
            return
        log.debug("%s: keep-alive connection idle for keepalive_timeout; closing", self._peer)
        self.close_idle()

    def _after_input(self) -> None:
        """Re-arm the timer that fits the framer's state; pause reading while an upgrade waits."""
        framer = self._framer
        state = framer.state
        if state is STATE_HEAD:
            if self.mux is None or framer.head_pending:
                self._arm_timer("head")  # the first head, or a later one part-way in
            else:
                self._arm_timer("keepalive")  # between requests
        elif state is not STATE_DONE:
            self._cancel_timer()  # a body, a tunnel, an upgrade: only the idle sweep applies
            if framer.holding and not self._holding:
                self._holding = True
                if self.transport is not None:
                    self.transport.pause_reading()

    # -- client -> service -----------------------------------------------------------------------
    def buffer_updated(self, nbytes: int) -> None:
        self.activity += 1
        framer = self._framer
        if framer.state is STATE_TUNNEL:
            self.forward(SHARED.view[:nbytes])
            return
        self._feed(SHARED.view[:nbytes])

    def _feed(self, data: memoryview | bytes) -> None:
        if self._prelude is not None:
            if self.mux is None:
                self._prelude += data  # until routed: what another node would need to see
                if self._first_hop and len(self._prelude) == len(data) and self._quick_hand_over():
                    return
            else:
                self._prelude = None
        for event in self._framer.receive_data(data):
            if isinstance(event, RequestHead):
                if self._timer_kind == "head":
                    self._cancel_timer()
                if not self._on_head(event):
                    return
            elif isinstance(event, HeadError):
                self._client_error(event)
                return
            else:
                self.forward(event)
                if self._access is not None:
                    self._access.body(event)
        self._after_input()

    def _on_head(self, head: RequestHead) -> bool:
        server = self.server
        config = server.config
        if self._route is not None:
            # A later request on the connection: the same Host bytes as the first one are the
            # same route (the common case, and no parse); any other must name that route too.
            if head.host != self._routed_host:
                route = _preview_route(head.host, config.domain, config.tokens)
                if route is None or (route.port, route.sandbox_id, route.token) != self._route:
                    self._misdirect()
                    return False
        else:
            route = _preview_route(head.host, config.domain, config.tokens)
            if route is None:
                host = head.host.decode("latin-1")
                self.fail(404, "UNKNOWN_HOST", f"No preview URL matches host {host!r}.")
                return False
            state = server.registry.match(route.sandbox_id, route.port, route.token)
            if state is None and self._recheck_miss():
                return False  # asked again once this node has heard every earlier change
            if state is None or state.exposures[route.port].options.protocol != "http":
                # a tcp or tls exposure is reached on its own port or by SNI, never as HTTP here
                server.metrics.preview_denied.inc()
                self.fail(404, "INVALID_TOKEN", "Access denied: Invalid token or port not exposed")
                return False
            session: EdgeSession | None = state.session
            if session is None or not session.can_open_streams():
                if server.cluster is not None:
                    if self._framer.state is STATE_DONE:
                        # What came with the head was refused already (more than an upgrade
                        # may hold): its HeadError follows in this batch and is answered here.
                        return True
                    # Its agent is on another node of the cluster: hand the connection on.
                    self.port = route.port
                    self.sandbox_id = route.sandbox_id
                    self._hand_on()
                    return False
                self.fail(
                    503,
                    "SANDBOX_NOT_CONNECTED",
                    f"Sandbox {route.sandbox_id} is not connected; its agent is offline.",
                )
                return False
            self._route = (route.port, route.sandbox_id, route.token)
            self._routed_host = head.host
            self.port = route.port
            self.sandbox_id = route.sandbox_id
            self._host_line = b"host: localhost:%d\r\n" % route.port
            self._trailer = b"".join(
                (
                    b"x-forwarded-for: ", self._peer_ip.encode(), b"\r\n",
                    b"x-forwarded-host: ", head.host, b"\r\n",
                    b"x-forwarded-proto: ", config.scheme.encode(), b"\r\n",
                    b"x-sandbox-name: ", route.sandbox_id.encode(), b"\r\n\r\n",
                )
            )  # fmt: skip
            if not session.stream_budget.take(server.loop.time()):
                self.fail(
                    429,
                    "TOO_MANY_STREAMS",
                    f"Sandbox {route.sandbox_id} gets too many new connections per second; "
                    "retry later.",
                    retry_after=1,
                )
                return False
            try:
                session.open_public_stream(self, route.port, self._peer)
            except LocalProtocolError:
                # the session's stream limit (max_streams) or it started going away meanwhile
                self.fail(
                    503,
                    "SANDBOX_BUSY",
                    f"Sandbox {route.sandbox_id} cannot take more connections right now.",
                )
                return False
            self.mux = session
            # Inspection (tunneld/inspect.py) is decided here, once per connection.
            ring = server.inspector.wants(route.sandbox_id, state.exposures.get(route.port))
            if ring is not None:
                if self._access is None:
                    self._access = ConnectionLog(
                        self._peer_ip, quiet=True, stats=server.metrics.requests
                    )
                self._access.recorder = ConnectionRecorder(
                    server.inspector,
                    ring,
                    route.port,
                    self._peer_ip,
                    config.scheme,
                    self.http_version,
                )
            if self._access is not None:  # the route, and so its lines' site, stays
                self._access.sandbox_id, self._access.port = self.sandbox_id, self.port
        access = self._access
        if access is not None:
            fast = access.fast  # access.request(head) without a Python call around it
            id_line = access.request(head) if fast is None else accesslog.log_request(fast, head)
            self.forward(forward_head(head, self._host_line, self._trailer, id_line))
            return True
        self.forward(forward_head(head, self._host_line, self._trailer))
        return True

    # -- cluster: the sandbox's agent is on another node ------------------------------------------
    def _recheck_miss(self) -> bool:
        """In a cluster, a preview URL this node does not know may have been exposed through
        another node a moment ago: its change reaches this node through the Redis feed, a few
        milliseconds after that node's admin API answered. Before the 404, wait (reading paused,
        at most ``MISS_RECHECK_TIMEOUT``) until the feed has delivered every change published
        before now (``RedisStore.caught_up``), then route the connection's bytes again. Once
        per connection, and it takes the 404's token of the client's miss budget first (an
        address past its budget gets its 429 at once). True: the recheck is under way."""
        server = self.server
        cluster = server.cluster
        transport = self.transport
        if cluster is None or self._prelude is None or self._miss_charged or transport is None:
            return False
        caught_up = getattr(cluster.store, "caught_up", None)
        if caught_up is None:
            return False
        config = server.config
        now = server.loop.time()
        if not server.public_limits.allow_miss(
            self._peer_ip, now, config.miss_rate, config.miss_burst
        ):
            return False
        self._miss_charged = True
        self._cancel_timer()
        transport.pause_reading()
        task = server.loop.create_task(self._recheck_task(caught_up))
        server.background.add(task)
        task.add_done_callback(server.background.discard)
        return True

    async def _recheck_task(self, caught_up: Callable[[float], Awaitable[bool]]) -> None:
        try:
            await caught_up(MISS_RECHECK_TIMEOUT)
        except Exception:  # whatever the store does, the client gets its answer (the 404)
            log.exception("waiting for the store feed before a 404")
        transport = self.transport
        if transport is None or transport.is_closing() or self._closed or self._prelude is None:
            return  # the client left meanwhile
        data, self._prelude = bytes(self._prelude), bytearray()
        self._framer = RequestFramer(self.server.parser)
        self._feed(data)  # routes it now, or answers the 404 (this time for good)
        if not (
            self._closed
            or transport.is_closing()
            or self._holding
            or self._read_paused
            or self._framer.state is STATE_TUNNEL  # handed on: that path resumes reading
        ):
            transport.resume_reading()

    def _quick_hand_over(self) -> bool:
        """The first read is one whole head for a sandbox whose session is on another node:
        hand the connection on (``_hand_on``: its socket to a worker of this host, else over a
        node link) on a look at the head's Host header (``quick_route``), without parsing the
        head. A connection adopted from another worker, or one a ``LandingConnection``
        (tunneld/landing.py) looked at already, is never routed this way. False: nothing was
        done, the head is parsed as usual."""
        prelude = self._prelude
        assert prelude is not None
        route = quick_route(self.server, prelude)
        if route is None:
            return False
        self.port = route.port
        self.sandbox_id = route.sandbox_id
        self._hand_on()
        return True

    def _hand_on(self) -> None:
        """Give this connection to the owner node: its socket itself when the owner runs on this
        host (tunneld/handover.py; the answer comes to ``_handed_over``), else over a node link
        (tunneld/cluster.py, ``_hand_on_task``). Reading pauses and the head timer stops."""
        self._cancel_timer()
        self._framer.hand_off()
        if self.transport is not None:
            self.transport.pause_reading()
        refresh = False
        if self.server.handover is not None:
            sent = self._send_socket()
            if sent:
                return
            refresh = sent is None
        self._start_hand_on_task(refresh)

    def hand_on_landed(self, port: int, sandbox_id: str, prelude: bytes, sent: bool | None) -> None:
        """After ``connection_made``: a ``LandingConnection`` (tunneld/landing.py) routed the
        first read, ``prelude``, to the sandbox's owner on another node, unparsed, and its
        socket is not on its way there. ``sent``: what ``send_socket`` said: True (the owner
        refused it: ``_handed_over``), False (not possible) or None (the owner's node record
        is not known here). The node link carries it then, as after ``_hand_on``."""
        self.port = port
        self.sandbox_id = sandbox_id
        self._prelude = bytearray(prelude)
        self._cancel_timer()
        self._framer.hand_off()
        if self.transport is not None:
            self.transport.pause_reading()
        if sent:
            self._handed_over(False)
        else:
            self._start_hand_on_task(sent is None)

    def _start_hand_on_task(self, refresh: bool) -> None:
        task = self.server.loop.create_task(self._hand_on_task(refresh))
        self.server.background.add(task)
        task.add_done_callback(self.server.background.discard)

    async def _hand_on_task(self, refresh: bool = False) -> None:
        """Forward this connection over a node link to the owner; ``refresh``: first read the
        node records again (the owner's was not known here) and try the hand-over once more."""
        from .cluster import RouteError

        cluster = self.server.cluster
        assert cluster is not None
        if refresh:
            try:
                cluster.nodes = await cluster.store.nodes()
            except Exception:  # the store is away: the node link path reports it
                pass
            else:
                if self._send_socket():
                    return  # _handed_over takes it from here
        try:
            link, epoch = await cluster.route(self.sandbox_id)
        except RouteError as exc:
            self.fail(exc.status, exc.code, exc.message)
            return
        transport = self.transport
        if transport is None or transport.is_closing() or self._closed:
            return  # the client left meanwhile
        try:
            self.stream_id = link.session.open_stream(
                self.port, "preview", self._peer, sandbox=self.sandbox_id, epoch=epoch
            )
        except LocalProtocolError:
            self.fail(
                503, "SANDBOX_BUSY", f"Sandbox {self.sandbox_id} cannot take more connections now."
            )
            return
        link.add_stream(self)
        self.mux = link
        self.server.metrics.forwarded.inc()
        prelude, self._prelude = self._prelude, None
        if prelude:
            self.forward(bytes(prelude))
        link.flush()
        transport.resume_reading()

    def _send_socket(self) -> bool | None:
        """Pass the socket itself to the owner when it runs on this host (``send_socket``).
        True: on its way, ``_handed_over`` gets the answer; False: not possible, this
        connection is still ours to forward; None: the owner's node record is not known here."""
        transport = self.transport
        if transport is None or transport.get_extra_info("sslcontext") is not None:
            return False  # TLS: see send_socket
        return send_socket(
            self.server,
            transport,
            self.sandbox_id,
            self.port,
            self._prelude or b"",
            self._handed_over,
        )

    def _handed_over(self, answer: bool | None) -> None:
        """The owner's answer to ``_send_socket``. True: it adopted the socket; None: no answer
        in time, it may have (tunneld/handover.py): either way it is not ours to serve, and
        closing our descriptor sends nothing to the client. False: it refused, nothing was
        lost: forward the connection over the node link instead."""
        transport = self.transport
        if answer is False:
            if transport is None or transport.is_closing() or self._closed:
                return  # the client left before the hand-over message did
            cluster = self.server.cluster
            owner = cluster.owners.get(self.sandbox_id) if cluster is not None else None
            if cluster is not None and owner is not None:
                cluster.nodes.pop(owner[0], None)  # perhaps a stale record: read it next time
            self._start_hand_on_task(False)
            return
        self._prelude = None
        self._closed = True
        if transport is not None:
            transport.abort()

    def adopt(self, prelude: bytes) -> None:
        """A connection another worker of this host handed over: ``prelude`` is what it read.
        Call before the transport exists: ``connection_made`` replays it before the first read
        from the socket, so later bytes can never overtake it."""
        self._adopted = prelude
        self._first_hop = False

    # -- errors ----------------------------------------------------------------------------------
    def _client_error(self, exc: HeadError) -> None:
        if self.mux is None or not self._responded:
            self.fail(exc.status, exc.code, exc.message)
        else:
            self._misdirected = error_response(exc.status, exc.code, exc.message)
            self._stop_upstream()

    def _misdirect(self) -> None:
        self._misdirected = error_response(
            421,
            "MISDIRECTED_REQUEST",
            "This connection serves another preview URL; open a new one.",
        )
        self._stop_upstream()

    def _stop_upstream(self) -> None:
        """Stop relaying client bytes; the service finishes its responses and then we close."""
        self._framer.close()
        if self.transport is not None:
            self.transport.pause_reading()
        mux = self.mux
        if mux is not None and not self._local_eof and not mux.session.closed and not self._closed:
            self._local_eof = True
            mux.session.end_stream(self.stream_id)
            mux.flush()
            self._arm_timer("keepalive")  # a service that never closes is not waited for forever
        elif mux is None:
            self._finish_error()

    def _finish_error(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if self._misdirected is not None:
                transport.write(self._misdirected)
            self.close_gracefully()

    def fail(self, status: int, code: str, message: str, retry_after: int = 0) -> None:
        """Answer with a JSON error (only before any response byte) and close."""
        self._framer.close()
        self._cancel_timer()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if not self._responded:
                if status == 404 and not self._miss_charged:
                    server = self.server
                    config = server.config
                    if not server.public_limits.allow_miss(
                        self._peer_ip, server.loop.time(), config.miss_rate, config.miss_burst
                    ):
                        status, code, retry_after = 429, "TOO_MANY_MISSES", 1
                        message = (
                            f"Too many requests for unknown preview URLs from {self._peer_ip}; "
                            "retry later."
                        )
                self._responded = True
                self.server.metrics.public_refusals.labels(code).inc()
                if self._access is not None:
                    self._access.edge_answered(status, code)
                transport.write(error_response(status, code, message, retry_after))
            self.close_gracefully()

    # -- stream events ---------------------------------------------------------------------------
    def end(self) -> None:
        """The edge ends this connection at shutdown: a live stream is cut with RST (the
        edge cannot tell a keep-alive pause from a response that is not over), a connection
        never routed is closed normally."""
        mux = self.mux
        if mux is not None and mux.streams.get(self.stream_id) is self:
            self._reset_begun = True
            abort_with_reset(self.transport)
        else:
            self.close_gracefully()

    def close_idle(self) -> None:
        """The edge ends a connection silent both ways (``keepalive_timeout``, the idle sweep).

        Once the service has answered on it and while its stream is open, the edge cannot tell
        a keep-alive pause after a complete response from a response without a length that the
        service has not finished, and a FIN would make the latter look complete. So the service
        is asked first: the stream is ended towards it (its HTTP server sees the client's EOF
        and closes an idle keep-alive connection at once, which ends this one with a FIN, after
        any response it still had to finish). If it has not ended the stream by the next call
        (one more timeout of silence), the connection is cut with RST, as at shutdown (``end``).
        Before any answer, or once the service ended, a graceful close. A clean close already
        under way is left to its ``StalledCloseWatch`` (``close_gracefully``)."""
        transport = self.transport
        if transport is not None and transport.is_closing():
            return
        mux = self.mux
        if (
            self._responded
            and not self._peer_eof
            and mux is not None
            and mux.streams.get(self.stream_id) is self
        ):
            if not self._local_eof:
                log.debug("%s: idle; ending the stream towards the service first", self._peer)
                self._stop_upstream()
                if self._local_eof:  # else the stream could not be ended (its session closing)
                    return
            self._reset_begun = True
            abort_with_reset(self.transport)
        else:
            self.close_gracefully()

    def close_gracefully(self) -> None:
        """Close with FIN (TLS: ``close_notify``) once the client has taken the rest.

        A client that takes none of the rest would keep the close, its buffer and its place in
        the connection limits for ever, so a ``StalledCloseWatch`` resets (RST) a connection
        whose client took nothing for the shorter of ``keepalive_timeout`` and ``idle_timeout``:
        the client did not get everything. Bytes it takes, however slowly, keep the connection.
        Over TLS the watch also ends the close when the TLS layer would not (its shutdown
        timeout, ``TLS_SHUTDOWN_TIMEOUT``, is only a backstop): ``TLS_NOTIFY_WAIT`` after the
        client took everything without answering ``close_notify`` (FIN: nothing is lost), and
        at ``TLS_CLOSE_DEADLINE`` whatever the progress (RST if bytes are still owed).
        """
        transport = self.transport
        if transport is None:
            return
        if self._responded:
            if (
                not self._client_ended
                and not transport.is_closing()  # a 2nd call: the 1st saw no FIN, wrote it all
                and transport.get_extra_info("ssl_object") is not None
                and peer_hung_up(transport)
            ):
                # The client's FIN over TLS that the loop did not report (uvloop's TLS layer
                # shuts down on it and drops what is written after it, without a word): what
                # was written since may be lost, so a clean end could hide a cut response.
                self._cut_after_client_end()
                return
            set_reset_on_close(transport, False)
        if not transport.is_closing():  # (a 2nd close of asyncio's TLS transport breaks it)
            transport.close()
        self._watch_close(transport)

    def _watch_close(self, transport: asyncio.Transport) -> None:
        """The ``StalledCloseWatch`` of ``transport``'s clean close (``close_gracefully``; an
        HTTP/2 connection's too, whose place in the limits this object holds)."""
        if self._close_watch is None:
            tls = transport.get_extra_info("ssl_object") is not None
            self._close_watch = StalledCloseWatch.start(
                transport,
                stalled_close_period(self.server.config),
                self.server.loop,
                self._close_stalled,
                TLS_CLOSE_DEADLINE if tls else None,
                TLS_NOTIFY_WAIT if tls else None,
            )

    def _close_stalled(self, unsent: int, stalled: float | None) -> None:
        """The ``StalledCloseWatch`` resets the connection: say why."""
        self._reset_begun = True
        if stalled is None:
            log.info(
                "%s: the client had not taken the last %d bytes %gs after the close began; reset",
                self._peer,
                unsent,
                TLS_CLOSE_DEADLINE,
            )
        else:
            log.info(
                "%s: the client took none of the last %d bytes of a closing connection for %gs; "
                "reset",
                self._peer,
                unsent,
                stalled,
            )

    def receive_from_peer(self, data: bytes) -> None:
        if self._client_ended:
            self._cut_after_client_end()
            return
        if not self._responded and self.transport is not None:
            # From the first response byte until a graceful close, any other end of this
            # connection is an RST, even the kernel's close if the edge dies (kill -9): a
            # length-less response cut short must not look complete.
            set_reset_on_close(self.transport, True)
        self._responded = True
        self.activity += 1
        framer = self._framer
        # The answer to an upgrade request: its status line decides what the connection becomes.
        upgrade = framer.state is STATE_UPGRADE_PENDING
        accepted = framer.receive_response(data) if upgrade else None
        access = self._access
        if access is None:
            # (not super(): its object and lookup cost ~0.3 % of relaying a small request)
            StreamEndpoint.receive_from_peer(self, data)
        elif self.transport is not None and not self._closed:
            # The access log on: the response framer's bytes (the service's, plus an
            # x-request-id line) are written; credit is what was received. ``fast``:
            # access.response(data), its common case without a Python call.
            fast = access.fast
            if fast is None:
                out = access.response(data)
            else:
                out = accesslog.log_response(fast, access, data) or access.general(data)
            if out:
                self.transport.write(out)  # one write: a head and its body are one read
            if self._write_paused:
                self._held_credit += len(data)
            else:
                self.mux.session.acknowledge(self.stream_id, len(data))
        if not upgrade:
            return
        if accepted:
            held = framer.take_held()
            if held and not self._local_eof:
                self.forward(held)
            self._holding = False
            self._cancel_timer()
            if not self._read_paused and self.transport is not None and not self._closed:
                self.transport.resume_reading()
        elif accepted is False:
            # Not 101: relay this response, then end; nothing more from the client is relayed.
            self._stop_upstream()

    def peer_writable(self) -> None:
        if self._holding:
            self._read_paused = False  # reading stays paused until the upgrade is answered
            return
        super().peer_writable()

    def idle_check(self) -> bool:
        """True when nothing moved either way since the previous check (the sweep closes it).
        Never for a clean close under way: its ``StalledCloseWatch`` bounds it. A close that
        started none (one the transport began itself, on the client's EOF) gets one here, so
        no closing connection outlives the sweep unwatched."""
        transport = self.transport
        if transport is not None and transport.is_closing():
            if self._close_watch is None:
                self._watch_close(transport)
            return False
        idle = self.activity == self._seen_activity
        self._seen_activity = self.activity
        return idle

    def peer_ended(self) -> None:
        self._peer_eof = True
        transport = self.transport
        if transport is None:
            return
        if self._framer.state is STATE_TUNNEL and not self._local_eof:
            if transport.can_write_eof():  # WebSocket/raw tunnel: keep TCP half-close semantics
                write_eof_or_abort(transport)  # a client's reset ends only this connection
            return
        if not self._responded and self._misdirected is None:
            # The service closed without a byte of response: say so instead of an empty reply.
            self.fail(
                502,
                "UPSTREAM_CLOSED",
                f"The service on port {self.port} in sandbox {self.sandbox_id} closed the "
                "connection without answering.",
            )
            return
        # HTTP: the service closed its side, so this connection is over.
        if transport.is_closing():
            self._complete_at_client_end(transport)
        else:
            self._finish_error()

    def _complete_at_client_end(self, transport: asyncio.Transport) -> None:
        """The service finished the response while a close is under way that the edge did not
        begin: the TLS layer's own, on the client's ``close_notify`` (``eof_received``), which
        came before the stream's end. Unless a byte of the response was lost (``_cut_after_
        client_end``) or the edge reset the connection, what the TLS layer and the kernel still
        hold is the whole rest of a complete response: the reset on close armed at the first
        response byte (``receive_from_peer``) is disarmed, so that the socket's last close,
        once the TLS layer has the client's answer, lets the kernel send the rest and a FIN,
        not an RST that drops it. The watch still resets a client that stops taking it."""
        if self._reset_begun or self._closed or not self._responded:
            return
        self._watch_close(transport)
        if self._close_watch is not None:
            self._close_watch.allow_clean_end()

    def _cut_after_client_end(self) -> None:
        """Response bytes after the client's ``close_notify`` (or FIN) over TLS: the TLS layer,
        shutting down, drops them, so the client cannot get the whole response. It must not
        see the TLS layer's clean end (its ``close_notify``, then a FIN) after a response cut
        short: reset the connection at once."""
        if self._reset_begun or self._closed:
            return
        self._reset_begun = True
        log.info(
            "%s: the client ended its TLS session before the end of the response; reset",
            self._peer,
        )
        abort_with_reset(self.transport)

    def peer_reset(self, code: ResetCode) -> None:
        if self._responded:
            super().peer_reset(code)  # response bytes went out: the client must see a reset
            return
        self._closed = True
        mux = self.mux
        if code in (ResetCode.CONNECT_REFUSED, ResetCode.CONNECT_FAILED):
            self.fail(
                502,
                "UPSTREAM_CONNECT_FAILED",
                f"Nothing is listening on port {self.port} in sandbox {self.sandbox_id}.",
            )
        elif code == ResetCode.REFUSED_STREAM and mux is not None and _is_node_link(mux):
            # the node we forwarded to does not hold the sandbox's session (any more)
            self.fail(
                503,
                "SANDBOX_NOT_CONNECTED",
                f"Sandbox {self.sandbox_id} is not connected to the node that owned it; its agent "
                "is offline or moving to another node (retry).",
            )
        elif code == ResetCode.REFUSED_STREAM:
            self.fail(503, "SANDBOX_BUSY", f"Sandbox {self.sandbox_id} refused a new connection.")
        elif code == ResetCode.UNEXPOSED:
            self.fail(404, "INVALID_TOKEN", "Access denied: Invalid token or port not exposed")
        elif mux is None or mux.session.closed or mux.transport is None:
            self.fail(
                503,
                "SANDBOX_NOT_CONNECTED",
                f"Sandbox {self.sandbox_id} disconnected before answering; its agent is offline.",
            )
        else:
            self.fail(
                502,
                "UPSTREAM_RESET",
                f"The connection to port {self.port} in sandbox {self.sandbox_id} was reset "
                f"before any response ({code.name}).",
            )

    def eof_received(self) -> bool:
        if self.mux is None:
            return False  # nothing routed yet: just close
        keep_open = super().eof_received()
        transport = self.transport
        if transport is not None and transport.get_extra_info("ssl_object") is not None:
            # The client's close_notify: the TLS layer shuts the connection down by itself
            # (whatever this returns), and what it still holds waits for the client. That close
            # is watched as the edge's own: a client that takes none of it is reset, one that
            # reads gets it all (as HTTP/2's ``eof_received``). Response bytes after it are
            # dropped by the TLS layer: the response is then cut (``_cut_after_client_end``).
            # (An HTTP/2 stream's transport has no socket: its eof_received is END_STREAM.)
            self._client_ended = transport.get_extra_info("socket") is not None
            self._watch_close(transport)
        return keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._close_watch is not None:
            self._close_watch.cancel()
            self._close_watch = None
        if self._access is not None:
            self._access.closed(self._peer_eof)
        self.server.public_connections.discard(self)
        ip = self._counted_ip
        if ip is not None:
            self._counted_ip = None
            self.server.public_limits.release(ip)
        if self.mux is None:
            self._closed = True
            return
        super().connection_lost(exc)


def stalled_close_period(config: Config) -> float:
    """The period of a public connection's ``StalledCloseWatch`` (HTTP/1.1, HTTPS, HTTP/2, raw
    TCP and TLS passthrough alike): the shorter of ``keepalive_timeout`` and ``idle_timeout``
    (``keepalive_timeout`` where ``idle_timeout`` is 0: no idle sweep, yet a close is bounded)."""
    period = config.keepalive_timeout
    if 0 < config.idle_timeout < period:
        period = config.idle_timeout
    return period


def _is_node_link(mux: object) -> bool:
    from .nodelink import NodeLinkClient

    return isinstance(mux, NodeLinkClient)
