"""Public raw TCP exposures and TLS passthrough: bytes from the internet to a sandbox port.

Theory of operation
-------------------
Two kinds of exposure are not preview URLs (``ExposureRecord.options.protocol``):

* ``tcp``: the exposure gets a public TCP port of its own from ``public_tcp_ports`` (as ngrok's
  and frp's TCP tunnels do). ``TcpExposures`` holds one listener per such port; every connection
  to it becomes one tunnel stream to ``127.0.0.1:PORT`` in the sandbox. The port is chosen when
  the exposure is made (the lowest port of the range that binds and no exposure holds), stored in
  the record (``public_port``), so it survives restarts, and freed when the exposure goes.
* ``tls``: routed by the TLS server name on the public HTTPS port, without terminating TLS
  (``public_tls_passthrough``). ``SniListener`` accepts the public port's connections itself and
  *peeks* at the first bytes (``MSG_PEEK``: they stay in the kernel) until
  :func:`tunneld.sni.parse_client_hello` has the ClientHello. A name that is the preview
  hostname of a ``tls`` exposure makes the socket a raw connection (the sandbox's service
  terminates TLS and reads the very same ClientHello); anything else (another name, no name, a
  hello the parser does not read) goes to the edge's own TLS termination as before. The wait is
  bounded in bytes (``sni.MAX_PEEK``) and time (``head_timeout``); the socket's SO_RCVLOWAT is set
  to the bytes the parser asked for, so a slow client costs no wake-ups.

A ``RawConnection`` is a ``StreamEndpoint`` with nothing parsed: half-close maps to FIN, a reset
stream to RST (and the other way), and backpressure is the relay's. It opens its stream in
``connection_made`` on the sandbox's session here; in a cluster, when the session is on another
node, it asks that node through a node link (a ``direct`` link stream, spliced raw by the owner:
``Cluster._serve_direct``), with reading paused meanwhile. With ``proxy_protocol`` on, a PROXY v2
header with the client's address is the stream's first bytes (``EdgeSession.open_public_stream``
here, ``_route_to_owner`` on a link).

Limits are the public listener's: a connection counts towards ``max_connections`` and
``max_connections_per_ip`` (the same per-IP table), a new stream takes from the sandbox's
``stream_budget``, and ``idle_timeout`` closes a connection silent both ways (RST: a raw stream
has no way to say "idle" that a peer would not take for a normal end); a client still taking
what the edge sent is not silent (``taken_mark``). A clean close (both sides ended) is watched
as every public connection's (``StalledCloseWatch``, ``idle_timeout = 0`` or not): a client
that takes none of the rest for a look of the watch is reset, a slow one gets it all.
Refusals are RSTs, as a raw TCP client has no page to read.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from protocol.errors import LocalProtocolError, ResetCode
from protocol.hostnames import ExposureOptions, parse_preview_host
from relay.budget import RateLimitedLog
from relay.buffers import SHARED
from relay.mux import StalledCloseWatch, StreamEndpoint, abort_with_reset, taken_mark

from .listen import Acceptor, bind
from .proxyproto import encode_v2
from .public import stalled_close_period
from .registry import ExposureRecord, RegistryError
from .sni import MAX_PEEK, ClientHello, NeedMore, NotClientHello, parse_client_hello
from .store import StoreError

if TYPE_CHECKING:
    import ssl

    from .edge import EdgeServer

__all__ = ["RawConnection", "SniListener", "TcpExposures", "parse_port_range"]

log = logging.getLogger("tunneld.tcp")

# Refused connections are logged at most this often (a port scan must not flood the log).
_REFUSAL_LOG_INTERVAL: Final = 10.0
# Public TLS connections closed before or during their hand-over (an oversized ClientHello costs a
# client 9 bytes and no wait): one line each would let anyone write the log as fast as it connects.
_PEEK_CLOSED: Final = "lines about public TLS connections closed before their hand-over"
# Bytes a connection may have read while its stream is being opened on the owner node: reading
# is paused then, so this is at most a read or two of the shared buffer; past it, a bug.
MAX_HELD: Final = 1024 * 1024
# A peeking connection woken with no new byte and no hang-up: looked at again this much later.
_PEEK_RETRY: Final = 0.05


def parse_port_range(value: str) -> range:
    """``"20000-20100"`` (both included) or ``"20000"``; ValueError with a message otherwise."""
    text = value.strip()
    low, dash, high = text.partition("-")
    if not low.strip().isdigit() or (dash and not high.strip().isdigit()):
        raise ValueError(f"expected a port or a range FIRST-LAST, not {value!r}")
    first = int(low)
    last = int(high) if dash else first
    if not 1 <= first <= last <= 65535:
        raise ValueError(f"expected ports 1-65535 with FIRST <= LAST, not {value!r}")
    return range(first, last + 1)


def _peer_text(peer: Any) -> tuple[str, str]:
    """``(ip, "ip:port")`` of a peername (``[ip]:port`` for IPv6)."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        ip = str(peer[0])
        return ip, f"[{ip}]:{peer[1]}" if ":" in ip else f"{ip}:{peer[1]}"
    return "unknown", "unknown"


class RawConnection(StreamEndpoint):
    """One public connection of a ``tcp`` or ``tls`` exposure, relayed raw to one stream."""

    __slots__ = (
        "_close_watch",
        "_counted_ip",
        "_held",
        "_seen_activity",
        "_seen_taken",
        "activity",
        "kind",
        "manager",
        "peer",
        "peer_ip",
        "port",
        "sandbox_id",
        "token",
    )

    def __init__(
        self, manager: TcpExposures, sandbox_id: str, port: int, kind: str, token: str | None = None
    ) -> None:
        super().__init__(None, 0)  # type: ignore[arg-type]  # bound to a session on connect
        self.manager = manager
        self.sandbox_id = sandbox_id
        self.port = port
        self.kind = kind  # "tcp" or "tls"
        # a "tls" connection: the token of the server name it was routed by (None: tokens off);
        # when the exposure's token changes, the connection is cut (TcpExposures.sync)
        self.token = token
        self.peer = "unknown"
        self.peer_ip = "unknown"
        self._counted_ip: str | None = None
        self._held = bytearray()  # read while the stream was being opened on another node
        self.activity = 0
        self._seen_activity = -1
        self._seen_taken = 0  # taken_mark at the previous idle_check
        self._close_watch: StalledCloseWatch | None = None  # a clean close the client stalls

    def describe(self) -> str:
        return (
            f"{self.kind} connection from {self.peer} to sandbox {self.sandbox_id} port {self.port}"
        )

    # -- connection ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.peer_ip, self.peer = _peer_text(transport.get_extra_info("peername"))
        manager = self.manager
        if not manager.admit(self):
            return
        manager.connections.add(self)
        server = manager.server
        state = server.registry.get(self.sandbox_id)
        record = state.exposures.get(self.port) if state is not None else None
        if state is None or record is None or record.options.protocol != self.kind:
            self.refuse("the exposure is gone")
            return
        session = state.session
        if session is not None and session.can_open_streams():
            if not session.stream_budget.take(server.loop.time()):
                self.refuse(
                    "too many new connections per second to the sandbox", "TOO_MANY_STREAMS"
                )
                return
            try:
                session.open_public_stream(self, self.port, self.peer)
            except LocalProtocolError:
                self.refuse("the sandbox takes no more connections", "SANDBOX_BUSY")
                return
            self.mux = session
            session.schedule_flush()  # the SYN goes now: a server-speaks-first service answers
            return
        if server.cluster is None:
            self.refuse("the sandbox is not connected", "SANDBOX_NOT_CONNECTED")
            return
        # The sandbox's agent is on another node: read nothing until the stream there is open.
        self.transport.pause_reading()  # type: ignore[union-attr]
        task = server.loop.create_task(self._route_to_owner(record))
        server.background.add(task)
        task.add_done_callback(server.background.discard)

    async def _route_to_owner(self, record: ExposureRecord) -> None:
        from .cluster import RouteError

        server = self.manager.server
        cluster = server.cluster
        assert cluster is not None
        try:
            link, epoch = await cluster.route(self.sandbox_id)
        except RouteError as exc:
            self.refuse(exc.message, exc.code)
            return
        transport = self.transport
        if transport is None or transport.is_closing() or self._closed:
            return  # the client left meanwhile
        try:
            sid = link.session.open_stream(
                self.port, "direct", self.peer, sandbox=self.sandbox_id, epoch=epoch
            )
        except LocalProtocolError:
            self.refuse("the node link takes no more streams", "SANDBOX_BUSY")
            return
        self.stream_id = sid
        link.add_stream(self)
        self.mux = link
        server.metrics.forwarded.inc()
        if record.options.proxy_protocol:
            link.session.send_data(sid, proxy_header(transport, self.peer))
        held, self._held = self._held, bytearray()
        if held:
            self.forward(bytes(held))
        link.flush()
        transport.resume_reading()

    def refuse(self, why: str, code: str = "REFUSED") -> None:
        """End the connection with RST (a raw client has no page to read), logged sparingly."""
        self.manager.refused(self.peer, f"{self.describe()} refused: {why}", code)
        self._closed = True
        abort_with_reset(self.transport)

    def cut(self, code: ResetCode) -> None:
        """The edge ends this connection (unexpose, idle, shutdown): stream reset, client RST."""
        mux = self.mux
        if mux is not None and not self._closed and mux.streams.get(self.stream_id) is self:
            del mux.streams[self.stream_id]
            if not mux.session.closed:
                mux.session.reset_stream(self.stream_id, code)
                mux.flush()
        self._closed = True
        abort_with_reset(self.transport)

    # -- relay -----------------------------------------------------------------------------------
    def buffer_updated(self, nbytes: int) -> None:
        self.activity += 1
        if self.mux is not None:
            self.forward(SHARED.view[:nbytes])
        elif not self._closed:
            # Routing to the owner node: kept and sent first once the stream is open. uvloop
            # starts reading after connection_made even when it paused reading: pause again.
            self._held += SHARED.view[:nbytes]
            if self.transport is not None:
                self.transport.pause_reading()
            if len(self._held) > MAX_HELD:
                self.refuse("sent too much before its stream was open")

    def receive_from_peer(self, data: bytes) -> None:
        self.activity += 1
        super().receive_from_peer(data)

    def peer_ended(self) -> None:
        self.activity += 1
        super().peer_ended()

    def eof_received(self) -> bool:
        if self.mux is None:
            return False  # not routed yet (reading is paused, so only a race gets here)
        return super().eof_received()

    def close_gracefully(self) -> None:
        """Both sides ended: close with FIN once the client has taken the rest.

        A client that takes none of it would keep the close, its buffer and its place in the
        connection limits for ever where no idle sweep runs (``idle_timeout = 0``). So, as for
        every public connection (``PublicConnection.close_gracefully``), a ``StalledCloseWatch``
        resets (RST) the connection once the shorter of ``keepalive_timeout`` and
        ``idle_timeout`` passes without the client taking a byte: it did not get everything.
        Bytes it takes, however slowly, keep the connection."""
        super().close_gracefully()
        if self._close_watch is None and not self._closed:
            server = self.manager.server
            self._close_watch = StalledCloseWatch.start(
                self.transport,
                stalled_close_period(server.config),
                server.loop,
                self._close_stalled,
            )

    def _close_stalled(self, unsent: int, stalled: float | None) -> None:
        """The ``StalledCloseWatch`` resets the connection: say why."""
        log.info(
            "%s: the client took none of the last %d bytes of a closing connection for %gs; reset",
            self.describe(),
            unsent,
            stalled,
        )

    def idle_check(self) -> bool:
        """True when no byte moved either way since the previous check: none relayed, and none
        of what is still unsent taken by the client (one still draining the end of a stream the
        service finished is not idle; a cut would lose that end)."""
        taken = taken_mark(self.transport)
        idle = self.activity == self._seen_activity and taken <= self._seen_taken
        self._seen_activity = self.activity
        self._seen_taken = taken
        return idle

    def connection_lost(self, exc: Exception | None) -> None:
        if self._close_watch is not None:
            self._close_watch.cancel()
            self._close_watch = None
        self.manager.connections.discard(self)
        self.manager.uncount(self)
        if self.mux is None:
            self._closed = True
            return
        super().connection_lost(exc)


def proxy_header(transport: asyncio.BaseTransport | None, client: str) -> bytes:
    """The PROXY v2 header for a stream of ``client`` that reached the edge at ``transport``'s
    local address (the unspecified address when there is no socket: a node link)."""
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    return encode_v2(client, sockname)


@dataclass(slots=True)
class _Listener:
    sandbox_id: str
    port: int
    server: asyncio.Server


class TcpExposures:
    """The public TCP ports of ``tcp`` exposures, and the raw connections of both kinds."""

    def __init__(self, server: EdgeServer) -> None:
        self.server = server
        config = server.config
        self.ports: range = (
            parse_port_range(config.public_tcp_ports) if config.public_tcp_ports else range(0)
        )
        self.listeners: dict[int, _Listener] = {}  # public port -> its listener
        self.connections: set[RawConnection] = set()
        self.peeking = 0  # SniListener connections still waiting for their ClientHello
        self._sweeper: asyncio.Task[None] | None = None
        self._unlogged = 0
        self._last_log = float("-inf")
        self._allocating: set[int] = set()
        self._closing = False  # the edge is stopping: no new listeners

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the listeners of every stored ``tcp`` exposure (a port another process holds
        now is logged; the exposure stays, without a listener, until re-exposed)."""
        for state in self.server.registry.sandboxes():
            await self.sync(state.sandbox_id)
        timeout = self.server.config.idle_timeout
        if timeout > 0:
            self._sweeper = self.server.loop.create_task(self._sweep_idle(timeout))

    def close_listeners(self) -> None:
        """Stop accepting (the edge is stopping); live connections go on until ``close``."""
        self._closing = True
        for listener in self.listeners.values():
            listener.server.close()

    async def close(self) -> None:
        """Cut every raw connection (RST) and forget the listeners."""
        self.close_listeners()
        if self._sweeper is not None:
            self._sweeper.cancel()
        listeners, self.listeners = list(self.listeners.values()), {}
        for conn in list(self.connections):
            conn.cut(ResetCode.CANCEL)
        for listener in listeners:
            await listener.server.wait_closed()

    # -- exposures -------------------------------------------------------------------------------
    def check_enabled(self, protocol: str) -> None:
        """RegistryError 400 when this edge does not serve ``protocol`` exposures."""
        config = self.server.config
        if protocol == "tcp" and not self.ports:
            raise RegistryError(
                400,
                "TCP_EXPOSURES_DISABLED",
                "This edge has no public TCP ports (public_tcp_ports is not set).",
            )
        if protocol == "tls" and not config.public_tls_passthrough:
            raise RegistryError(
                400,
                "TLS_PASSTHROUGH_DISABLED",
                "This edge does not route TLS by server name (public_tls_passthrough is off).",
            )

    async def commit_expose(
        self,
        sandbox_id: str,
        port: int,
        name: str | None,
        token: str | None,
        options: ExposureOptions,
    ) -> ExposureRecord:
        """``Registry.commit_expose`` for every expose (admin API, SDK, agent): refused when
        the protocol is off here; a ``tcp`` exposure without a listener gets a public port,
        bound only once the registry's rules passed (``max_sandboxes``,
        ``max_exposures_per_sandbox``, the token: a refused expose never binds nor claims a
        port) and before the record is stored (a stored port is one that bound); then the
        listeners and connections of the sandbox follow the new record."""
        self.check_enabled(options.protocol)
        state = self.server.registry.get(sandbox_id)
        old = state.exposures.get(port) if state is not None else None
        allocated: list[int] = []

        async def assign_port() -> int | None:  # under the sandbox's lock, after the rules
            if options.protocol != "tcp" or self.held_port(sandbox_id, port) is not None:
                return None
            public_port = await self.allocate(sandbox_id, port)
            allocated.append(public_port)
            return public_port

        try:
            record = await self.server.registry.commit_expose(
                sandbox_id, port, name, token, options, assign_port=assign_port
            )
        except BaseException:
            for public_port in allocated:
                self.release(public_port)
                await self.unclaim(public_port, sandbox_id, port)
            raise
        if old is not None and old.public_port not in (None, record.public_port):
            await self.unclaim(old.public_port, sandbox_id, port)  # no longer a tcp exposure
        await self.sync(sandbox_id)
        return record

    def held_port(self, sandbox_id: str, port: int) -> int | None:
        """The public port a ``tcp`` exposure of ``sandbox_id`` already listens on."""
        for public_port, listener in self.listeners.items():
            if listener.sandbox_id == sandbox_id and listener.port == port:
                return public_port
        return None

    async def allocate(self, sandbox_id: str, port: int) -> int:
        """Bind the lowest free port of the range for ``sandbox_id``:``port`` (kept as its
        listener) and return it; RegistryError 503 when none is left."""
        taken = {p for p in self.listeners} | self._allocating | self._stored_ports()
        for candidate in self.ports:
            if candidate in taken:
                continue
            self._allocating.add(candidate)
            try:
                # Nodes sharing a store (workers bind with SO_REUSEPORT, so a bind is no lock)
                # must not hand one port to two exposures: the store's claim decides.
                if not await self._claim(candidate, sandbox_id, port):
                    continue
                if await self._listen(sandbox_id, port, candidate, quiet=True):
                    return candidate
                await self.unclaim(candidate, sandbox_id, port)
            finally:
                self._allocating.discard(candidate)
        raise RegistryError(
            503,
            "TCP_PORTS_EXHAUSTED",
            f"No public TCP port is free in {self.ports.start}-{self.ports.stop - 1}; "
            "unexpose a TCP exposure or widen public_tcp_ports.",
        )

    def _stored_ports(self) -> set[int]:
        return {
            r.public_port
            for s in self.server.registry.sandboxes()
            for r in s.exposures.values()
            if r.public_port is not None
        }

    async def _claim(self, public_port: int, sandbox_id: str, port: int) -> bool:
        store: Any = self.server.registry.store
        if not hasattr(store, "claim_public_port"):
            return True  # one writer (sqlite, memory): this node's view is the whole truth
        try:
            return bool(await store.claim_public_port(public_port, sandbox_id, port))
        except StoreError as exc:
            raise RegistryError(
                503,
                "STORE_UNAVAILABLE",
                # no exposure was made (a claim that did land goes stale: PORT_CLAIM_GRACE)
                f"The public port could not be claimed ({exc}); nothing changed.",
            ) from None

    async def unclaim(self, public_port: int, sandbox_id: str, port: int) -> None:
        """Give the store's claim of ``public_port`` up (the exposure is gone or was never
        stored); a failure leaves a claim that goes stale (PORT_CLAIM_GRACE), never an error."""
        store: Any = self.server.registry.store
        if hasattr(store, "release_public_port"):
            try:
                await store.release_public_port(public_port, sandbox_id, port)
            except StoreError as exc:
                log.warning("public port %d: claim not released (%s)", public_port, exc)

    def release(self, public_port: int) -> None:
        """Give up a port ``allocate`` bound whose exposure was not stored after all."""
        listener = self.listeners.pop(public_port, None)
        if listener is not None:
            listener.server.close()

    async def sync(self, sandbox_id: str) -> None:
        """Make the listeners and connections of ``sandbox_id`` match its exposures: a listener
        for each ``tcp`` exposure with a public port, none for anything else; connections of an
        exposure that is gone (or changed kind) are cut with ``UNEXPOSED``."""
        state = self.server.registry.get(sandbox_id)
        exposures = state.exposures if state is not None else {}
        for public_port, listener in list(self.listeners.items()):
            if listener.sandbox_id != sandbox_id:
                continue
            record = exposures.get(listener.port)
            if (
                record is None
                or record.options.protocol != "tcp"
                or record.public_port != public_port
            ):
                del self.listeners[public_port]
                listener.server.close()
                log.info(
                    "sandbox %s: public TCP port %d of port %d closed",
                    sandbox_id,
                    public_port,
                    listener.port,
                )
        for record in exposures.values():
            wanted = record.public_port
            if (
                record.options.protocol == "tcp"
                and wanted is not None
                and wanted not in self.listeners
            ):
                await self._listen(sandbox_id, record.port, wanted, quiet=False)
        for conn in list(self.connections):
            if conn.sandbox_id != sandbox_id:
                continue
            record = exposures.get(conn.port)
            if (
                record is None
                or record.options.protocol != conn.kind
                or (conn.token is not None and conn.token != record.token)
            ):
                conn.cut(ResetCode.UNEXPOSED)

    def sync_later(self, sandbox_ids: Iterable[str]) -> None:
        """``sync`` from synchronous code (the store feed); errors are logged."""
        ids = list(sandbox_ids)

        async def run() -> None:
            for sandbox_id in ids:
                try:
                    await self.sync(sandbox_id)
                except Exception:
                    log.exception("sandbox %s: public TCP listeners not synced", sandbox_id)

        task = self.server.loop.create_task(run())
        self.server.background.add(task)
        task.add_done_callback(self.server.background.discard)

    async def _listen(self, sandbox_id: str, port: int, public_port: int, *, quiet: bool) -> bool:
        config = self.server.config
        if self._closing:
            return False
        if public_port not in self.ports:
            log.error(
                "sandbox %s: port %d has public TCP port %d, outside public_tcp_ports (%s); "
                "no listener",
                sandbox_id,
                port,
                public_port,
                config.public_tcp_ports or "not set",
            )
            return False
        try:
            server = await self.server.loop.create_server(
                lambda: self._connection(sandbox_id, port, "tcp"),
                config.public_host,
                public_port,
                backlog=1024,
                reuse_port=config.reuse_port,
            )
        except OSError as exc:
            if not quiet:
                log.error(
                    "sandbox %s: cannot listen on public TCP port %d for port %d: %s",
                    sandbox_id,
                    public_port,
                    port,
                    exc.strerror or exc,
                )
            return False
        self.listeners[public_port] = _Listener(sandbox_id, port, server)
        log.info("sandbox %s: port %d on public TCP port %d", sandbox_id, port, public_port)
        return True

    def _connection(
        self, sandbox_id: str, port: int, kind: str, token: str | None = None
    ) -> RawConnection:
        self.server.metrics.public_connections.inc()
        return RawConnection(self, sandbox_id, port, kind, token)

    # -- TLS passthrough -------------------------------------------------------------------------
    def tls_route(self, server_name: str | None) -> tuple[str, int, str | None] | None:
        """``(sandbox_id, port, token)`` when ``server_name`` is the preview host of a ``tls``
        exposure (token checked in constant time; None when tokens are off: what a connection
        is cut by when it changes), else None: the edge terminates TLS. One registry lookup:
        ``SniListener.hand_off`` takes the route as it is."""
        if not server_name:
            return None
        config = self.server.config
        route = parse_preview_host(server_name, config.domain, tokens=config.tokens)
        if route is None:
            return None
        state = self.server.registry.match(route.sandbox_id, route.port, route.token)
        if state is None:
            return None
        record = state.exposures.get(route.port)
        if record is None or record.options.protocol != "tls":
            return None
        return route.sandbox_id, route.port, record.token if config.tokens else None

    # -- limits ----------------------------------------------------------------------------------
    def total(self) -> int:
        return len(self.server.public_connections) + len(self.connections) + self.peeking

    def admit(self, conn: RawConnection) -> bool:
        """Count ``conn`` against ``max_connections`` and ``max_connections_per_ip``; past
        them it is refused (RST)."""
        config = self.server.config
        per_ip = self.server.public_limits.per_ip
        ip = conn.peer_ip
        count = per_ip.get(ip, 0)
        if self.total() >= config.max_connections:
            conn.refuse(
                f"limit of {config.max_connections} public connections in total",
                "TOO_MANY_CONNECTIONS",
            )
            return False
        if count >= config.max_connections_per_ip:
            conn.refuse(
                f"limit of {config.max_connections_per_ip} connections from {ip}",
                "TOO_MANY_CONNECTIONS",
            )
            return False
        per_ip[ip] = count + 1
        conn._counted_ip = ip
        return True

    def uncount(self, conn: RawConnection) -> None:
        ip = conn._counted_ip
        if ip is not None:
            conn._counted_ip = None
            self.server.public_limits.release(ip)

    def refused(self, peer: str, message: str, code: str) -> None:
        self.server.metrics.public_refusals.labels(code).inc()
        now = self.server.loop.time()
        self._unlogged += 1
        if now - self._last_log >= _REFUSAL_LOG_INTERVAL:
            log.warning("%s (%d refused since the last such message)", message, self._unlogged)
            self._last_log = now
            self._unlogged = 0

    async def _sweep_idle(self, timeout: float) -> None:
        """Cut connections silent both ways for about ``timeout`` seconds (1x-1.5x)."""
        while True:
            await asyncio.sleep(timeout / 2)
            for conn in list(self.connections):
                if conn.idle_check() and conn.transport is not None:
                    log.info("%s: silent for %.0fs; closed (RST)", conn.describe(), timeout)
                    conn.cut(ResetCode.TIMEOUT)


# -- the public TLS port with passthrough ------------------------------------------------------


class SniListener:
    """The public listener when ``public_tls_passthrough`` is on: accepts connections itself,
    peeks at each ClientHello and hands the socket to a ``RawConnection`` (a ``tls`` exposure)
    or to ``fallback`` over the edge's TLS (everything else). Quacks like the
    ``asyncio.Server`` it replaces (``sockets``, ``close``, ``wait_closed``)."""

    def __init__(
        self,
        manager: TcpExposures,
        fallback: Callable[[], asyncio.BaseProtocol],
        context: ssl.SSLContext,
        *,
        handshake_timeout: float,
        shutdown_timeout: float,
    ) -> None:
        self.manager = manager
        self.loop = manager.server.loop
        self.fallback = fallback
        self.context = context
        self.handshake_timeout = handshake_timeout
        self.shutdown_timeout = shutdown_timeout
        self.sockets: list[socket.socket] = []
        self._acceptor = Acceptor(self.loop, "public TLS listener", self._on_accept)
        self._peeks: set[_Peek] = set()
        self._handoffs: set[asyncio.Task[Any]] = set()
        self._closed = False
        self.closed_log = RateLimitedLog(log, _PEEK_CLOSED, self.loop.time(), level=logging.INFO)

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> SniListener:
        sockets = await bind(self.loop, host, port, backlog=4096, reuse_port=reuse_port)
        self._acceptor.serve(sockets)
        self.sockets = sockets
        return self

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._acceptor.close()
        for peek in list(self._peeks):
            peek.drop()
        for task in self._handoffs:
            task.cancel()  # a fallback TLS handshake under way: its socket is closed

    async def wait_closed(self) -> None:
        tasks = list(self._handoffs)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _on_accept(self, sock: socket.socket, address: Any) -> None:
        peek = _Peek(self, sock, address)
        self._peeks.add(peek)
        peek.start()

    def hand_off(self, peek: _Peek, route: tuple[str, int, str | None] | None) -> None:
        """The ClientHello decided: ``route`` (a ``tls`` exposure) or None (the edge's TLS)."""
        sock = peek.sock
        manager = self.manager
        if route is None:
            coro = self.loop.connect_accepted_socket(
                self.fallback,
                sock,
                ssl=self.context,
                ssl_handshake_timeout=self.handshake_timeout,
                ssl_shutdown_timeout=self.shutdown_timeout,
            )
        else:
            sandbox_id, port, token = route
            coro = self.loop.connect_accepted_socket(
                lambda: manager._connection(sandbox_id, port, "tls", token), sock
            )
        task = self.loop.create_task(coro)
        self._handoffs.add(task)
        task.add_done_callback(self._handed_off)

    def _handed_off(self, task: asyncio.Task[Any]) -> None:
        self._handoffs.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.closed_log.log(
                self.loop.time(),
                "public TLS connection lost while handed on: %s",
                task.exception(),
            )


class _Peek:
    """One accepted socket waiting for its ClientHello (bounded by MAX_PEEK and a timer)."""

    __slots__ = ("address", "ip", "listener", "seen", "sock", "timer")

    def __init__(self, listener: SniListener, sock: socket.socket, address: Any) -> None:
        self.listener = listener
        self.sock = sock
        self.address = address
        self.ip = str(address[0]) if isinstance(address, tuple) else "unknown"
        self.seen = 0  # bytes peeked at the last look
        self.timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        listener = self.listener
        manager = listener.manager
        config = manager.server.config
        per_ip = manager.server.public_limits.per_ip
        if (
            manager.total() >= config.max_connections
            or per_ip.get(self.ip, 0) >= config.max_connections_per_ip
        ):
            _, peer = _peer_text(self.address)
            manager.refused(
                peer,
                f"public TLS connection from {peer} refused: connection limit",
                "TOO_MANY_CONNECTIONS",
            )
            self._close(reset=True)
            return
        per_ip[self.ip] = per_ip.get(self.ip, 0) + 1
        manager.peeking += 1
        self.timer = listener.loop.call_later(config.head_timeout, self._on_timeout)
        listener.loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            data = self.sock.recv(MAX_PEEK, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.drop()
            return
        if not data:
            self.drop()  # closed before a byte
            return
        result = parse_client_hello(data)
        if isinstance(result, NeedMore):
            if len(data) <= self.seen and self._hung_up():
                self.drop()  # a partial ClientHello, then FIN: nothing more will come
                return
            if len(data) <= self.seen:
                self._pause()  # woken with nothing new: look again a little later
                return
            self.seen = len(data)
            self._set_lowat(result.total)
            return
        if isinstance(result, NotClientHello) and result.too_large:
            listener = self.listener
            listener.closed_log.log(
                listener.loop.time(),
                "public TLS connection from %s: %s; closed",
                self.ip,
                result.reason,
            )
            self.drop(reset=True)
            return
        route = self.listener.manager.tls_route(
            result.server_name if isinstance(result, ClientHello) else None
        )
        self._finish()
        self._set_lowat(1)
        self.listener.hand_off(self, route)

    def _hung_up(self) -> bool:
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        return any(
            events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR)
            for _, events in poller.poll(0)
        )

    def _pause(self) -> None:
        loop = self.listener.loop
        loop.remove_reader(self.sock.fileno())
        loop.call_later(_PEEK_RETRY, self._resume)

    def _resume(self) -> None:
        if self in self.listener._peeks:
            self.listener.loop.add_reader(self.sock.fileno(), self._readable)

    def _set_lowat(self, n: int) -> None:
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, max(1, n))
        except OSError:  # pragma: no cover - every Linux has it
            pass

    def _on_timeout(self) -> None:
        self.timer = None
        listener = self.listener
        listener.closed_log.log(
            listener.loop.time(),
            "public TLS connection from %s: no ClientHello in time; closed",
            self.ip,
        )
        self.drop()

    def _finish(self) -> bool:
        """Stop watching this socket; False when that was done already."""
        listener = self.listener
        if self not in listener._peeks:
            return False
        listener._peeks.discard(self)
        listener.manager.peeking -= 1
        listener.manager.server.public_limits.release(self.ip)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        try:
            listener.loop.remove_reader(self.sock.fileno())
        except (OSError, ValueError):  # pragma: no cover - closed under us
            pass
        return True

    def drop(self, *, reset: bool = False) -> None:
        if self._finish():
            self._close(reset=reset)

    def _close(self, *, reset: bool) -> None:
        self.listener._peeks.discard(self)
        if reset:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:  # pragma: no cover
                pass
        self.sock.close()
