"""Admin API (HTTP/1.1 on h11, JSON on orjson, Bearer token): what orchestrators and the SDK call.

    GET    /healthz                                   liveness, no auth
    GET    /readyz                                    readiness (200 / 503 with reasons), no auth
    GET    /metrics                                   Prometheus text
    GET    /v1/sandboxes                              sandboxes with their session state and ports
    GET    /v1/sandboxes/{id}                         one of them (404 when unknown)
    GET    /v1/sandboxes/{id}/ports                   {"ports": [{port, exposedAt, name}]}
    POST   /v1/sandboxes/{id}/ports                   {"port": 8000, "name"?: "api", "token"?: "t"}
    DELETE /v1/sandboxes/{id}/ports/{port}            204, idempotent
    GET    /v1/sandboxes/{id}/ports/{port}/ws?path=/  WebSocket handshake relayed to the sandbox
    GET    /v1/sandboxes/{id}/ports/{port}/tcp        Upgrade: tcp -> 101, then raw bytes to
                                                      127.0.0.1:PORT (502 when the connect fails);
                                                      Upgrade: websocket: the same as binary
                                                      messages (tunneld/tcpws.py)
    POST   /v1/sandboxes/{id}/ports/{port}/wait       {"mode"?, "path"?, "timeout"?...}: 200 ready,
                                                      504 PORT_NOT_READY, 503 not connected
    GET    /v1/sandboxes/{id}/requests?since=&follow= inspected requests (tunneld/inspect.py)
    GET    /v1/sandboxes/{id}/requests/{rid}          one record: heads, body prefixes, timings
    PUT    /v1/sandboxes/{id}/inspect                 inspection on/off for the sandbox (DELETE)

The connection loop, limits and error rendering are the shared server's (:mod:`relay.httpapi`, also
behind the agent's local API); this module owns the routes and the hand-over of a connection to a
tunnel stream (WebSocket connect, raw TCP).

In a cluster (tunneld/cluster.py) every node answers for every sandbox: exposures are shared, a
sandbox whose agent is connected to another node is reported connected with that node (from the
ownership feed), and a WebSocket connect or raw TCP for it is routed to the owner over a node link
as one ``direct`` stream carrying exactly the bytes the local path would send to the agent. The
owner accepts that link stream only when the agent accepted its own (it connected to the port), so
the landing node learns of the connect the way a single node does. A wait for a port goes to the
owner as one control request on the node link instead (tunneld/waitfwd.py), and so does an expose
(``EdgeServer.expose``: tunneld/exposefwd.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any, Final, cast
from urllib.parse import parse_qs, unquote

import orjson

from protocol.errors import LocalProtocolError
from protocol.hostnames import (
    ExposureOptions,
    ValidationError,
    validate_exposure_options,
    validate_port,
    validate_sandbox_id,
)
from relay.accept import lost_listeners
from relay.httpapi import (
    ApiError,
    ApiServer,
    ClientGone,
    Exchange,
    Limits,
    Request,
    Response,
    json_response,
)
from relay.mux import MuxProtocol

from .auth import verify_bearer
from .budget import RequestBudget
from .cluster import RouteError
from .config import ADMIN_MAX_CONNECTIONS
from .direct import DirectEndpoint
from .edge import PortNotReady
from .httphead import H11HeadParser, HeadError
from .public import forward_head
from .registry import ExposureRecord
from .store import StoreError
from .tcpws import (
    WebSocketTcpEndpoint,
    accept_response,
    verify_subprotocol_bearer,
    without_bearer,
)

if TYPE_CHECKING:
    from protocol import control

    from .edge import EdgeServer

__all__ = ["LIMITS", "AdminServer", "ApiError"]

log = logging.getLogger("tunneld.admin")

# Orchestrators keep a few keep-alive connections; WebSocket connects stop counting once they are
# handed over to a tunnel stream. Past this, 503 TOO_MANY_CONNECTIONS; also past
# admin_max_connections_per_ip from one client IP (set by AdminServer from the config).
LIMITS: Final = Limits(
    idle_timeout=60.0, request_timeout=10.0, max_connections=ADMIN_MAX_CONNECTIONS
)


class AdminServer:
    def __init__(self, edge: EdgeServer) -> None:
        self.edge = edge
        # every admin request but the probes, all clients together (admin_rate / admin_burst)
        config = edge.config
        self.budget = RequestBudget(config.admin_rate, config.admin_burst, edge.loop.time())
        # requests without the token have a budget of their own, so they cannot spend the
        # token holder's (and token guessing stays rate-limited)
        self.unauthorized_budget = RequestBudget(
            config.admin_rate, config.admin_burst, edge.loop.time()
        )
        self.http = ApiServer(
            self._handle,
            name="admin API",
            limits=dataclasses.replace(
                LIMITS, max_connections_per_ip=config.admin_max_connections_per_ip
            ),
            accept_upgrades=True,
            internal_error="Internal error; see the tunneld log.",
            logger=log,
        )

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> asyncio.Server:
        return await self.http.start(host, port, reuse_port=reuse_port)

    async def close(self) -> None:
        await self.http.close()

    async def _handle(self, request: Request, exchange: Exchange) -> Response | None:
        try:
            return await self._dispatch(request, exchange)
        except ValidationError as exc:  # RegistryError too
            raise ApiError(exc.status, exc.code, exc.message) from None

    # -- routing ---------------------------------------------------------------------------------
    async def _dispatch(self, request: Request, exchange: Exchange) -> Response | None:
        method = request.method
        path = request.path
        parts = [unquote(p) for p in path.split("/") if p]
        if parts == ["healthz"]:
            self._allow(method, "GET")
            return json_response(200, {"status": "ok"})
        if parts == ["readyz"]:
            self._allow(method, "GET")
            return self._readiness()
        token = self.edge.config.admin_token
        authorized = verify_bearer(token, request.header(b"authorization")) or (
            len(parts) == 6 and parts[5] == "tcp" and _websocket_bearer(token, request)
        )
        budget = self.budget if authorized else self.unauthorized_budget
        if not budget.take(self.edge.loop.time()):
            self.edge.metrics.admin_rate_limited.inc()
            raise ApiError(
                429,
                "RATE_LIMITED",
                "Too many admin API requests; retry later.",
                [("retry-after", "1")],
            )
        if not authorized:
            raise ApiError(
                401,
                "UNAUTHORIZED",
                "Missing or invalid admin token (Authorization: Bearer <token>).",
                [("www-authenticate", 'Bearer realm="tunneld"')],
            )
        edge = self.edge
        if parts == ["metrics"]:
            self._allow(method, "GET")
            return Response(200, edge.metrics.render(), content_type="text/plain; version=0.0.4")
        if parts == ["v1", "sandboxes"]:
            self._allow(method, "GET")
            ids = {s.sandbox_id for s in edge.registry.sandboxes()}
            if edge.cluster is not None:
                ids.update(edge.cluster.owners)  # connected to a node, nothing exposed
            return json_response(200, {"sandboxes": [self._sandbox_json(i) for i in sorted(ids)]})
        if len(parts) == 3 and parts[:2] == ["v1", "sandboxes"]:
            self._allow(method, "GET")
            return json_response(200, await self._one_sandbox(validate_sandbox_id(parts[2])))
        if 4 <= len(parts) <= 5 and parts[:2] == ["v1", "sandboxes"] and parts[3] in _INSPECTION:
            from .inspect import handle_admin  # request inspection: tunneld/inspect.py

            sandbox_id = validate_sandbox_id(parts[2])
            return await handle_admin(edge, method, sandbox_id, parts[3:], request.query)
        if len(parts) >= 4 and parts[:2] == ["v1", "sandboxes"] and parts[3] == "ports":
            sandbox_id = validate_sandbox_id(parts[2])
            if len(parts) == 4:
                if method == "GET":
                    return json_response(200, {"ports": self._ports_json(sandbox_id)})
                self._allow(method, "GET", "POST")
                payload = self._json_body(request.body)
                unknown = set(payload) - _EXPOSE_FIELDS
                if unknown:
                    raise ApiError(
                        400, "INVALID_REQUEST", f"Unknown field(s): {', '.join(sorted(unknown))}."
                    )
                if "port" not in payload:
                    raise ApiError(400, "INVALID_REQUEST", "Missing field: port.")
                options = validate_exposure_options(
                    payload.get("protocol"), payload.get("proxyProtocol"), payload.get("inspect")
                )
                exposure = await edge.expose(
                    sandbox_id, payload["port"], payload.get("name"), payload.get("token"), options
                )
                return json_response(200, self._exposed_json(sandbox_id, exposure, options))
            port = _path_port(parts[4])
            if len(parts) == 5:
                self._allow(method, "DELETE")
                await edge.unexpose(sandbox_id, port)
                return Response(204)
            if len(parts) == 6 and parts[5] == "ws":
                self._allow(method, "GET")
                target = parse_qs(request.query).get("path", ["/"])[0]
                await self._ws_connect(sandbox_id, validate_port(port), target, request, exchange)
                return None
            if len(parts) == 6 and parts[5] == "tcp":
                self._allow(method, "GET")
                await self._tcp_connect(sandbox_id, validate_port(port), request, exchange)
                return None
            if len(parts) == 6 and parts[5] == "wait":
                self._allow(method, "POST")
                return await self._wait_port(sandbox_id, port, request.body, exchange)
        raise ApiError(404, "NOT_FOUND", f"No such endpoint: {method} {path}")

    @staticmethod
    def _allow(method: str, *allowed: str) -> None:
        if method not in allowed:
            raise ApiError(
                405,
                "METHOD_NOT_ALLOWED",
                f"Method {method} not allowed here.",
                [("allow", ", ".join(allowed))],
            )

    def _readiness(self) -> Response:
        """200 while this node should get traffic: listeners bound and exposures loaded
        (``start()`` finished), not draining. 503 otherwise, saying why (a load balancer's or
        orchestrator's readiness probe; no token, as /healthz). A Redis store that is away does
        not make a node unready: it keeps serving what it has (its ``store`` field says so)."""
        edge = self.edge
        reasons = []
        if not edge.ready:
            reasons.append("starting: listeners or stored exposures not ready yet")
        if edge.draining:
            reasons.append("draining: stopping, no new traffic")
        elif edge.ready:
            for name in lost_listeners(list(edge.listeners.items())):
                reasons.append(f"listener lost: the {name} listener no longer listens")
        body: dict[str, Any] = {"status": "ready" if not reasons else "not ready"}
        if reasons:
            body["reasons"] = reasons
        store: Any = edge.registry.store
        if hasattr(store, "feed_connected"):
            body["store"] = "connected" if store.feed_connected else "unavailable"
        return json_response(503 if reasons else 200, body)

    @staticmethod
    def _json_body(body: bytes) -> dict[str, Any]:
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ApiError(400, "INVALID_JSON", "The request body is not valid JSON.") from None
        if not isinstance(payload, dict):
            raise ApiError(400, "INVALID_JSON", "The request body must be a JSON object.")
        return payload

    def _ports_json(self, sandbox_id: str) -> list[dict[str, Any]]:
        return [
            exposure_json(self.edge.preview_url(sandbox_id, r), r)
            for r in self.edge.registry.exposures(sandbox_id)
        ]

    def _exposed_json(
        self, sandbox_id: str, exposure: control.Exposure, options: ExposureOptions
    ) -> dict[str, Any]:
        """The answer to an expose: the exposure as this node's view has it, else (exposed
        by the owner node, and this node's view has not caught up: tunneld/exposefwd.py) as
        the owner answered it, with the URL this node's view will give it (a ``tcp`` one's
        needs its public port, which an owner from before ``public_port`` does not say: then
        the owner's URL)."""
        from .exposefwd import OwnersExposure

        state = self.edge.registry.get(sandbox_id)
        if isinstance(exposure, OwnersExposure) and (
            state is None or exposure.port not in state.exposures
        ):
            record = ExposureRecord(
                exposure.port,
                exposure.token,
                exposure.name,
                options=options,
                public_port=exposure.public_port,
            )
            if options.protocol == "tcp" and exposure.public_port is None:
                return exposure_json(exposure.url, record)
            return exposure_json(self.edge.preview_url(sandbox_id, record), record)
        return self._port_json(sandbox_id, exposure.port)

    def _port_json(self, sandbox_id: str, port: int) -> dict[str, Any]:
        state = self.edge.registry.get(sandbox_id)
        record = state.exposures.get(port) if state is not None else None
        if record is None:  # unexposed by another request while this one was answered
            raise ApiError(409, "CONFLICT", f"Port {port} was unexposed meanwhile; retry.")
        return exposure_json(self.edge.preview_url(sandbox_id, record), record)

    def _sandbox_json(
        self, sandbox_id: str, owner: tuple[str, int] | None = None, *, read: bool = False
    ) -> dict[str, Any]:
        """In a cluster, the sandbox's owner (node id, epoch) is ``owner`` when ``read`` from
        the store, else the ownership feed's view (``Cluster.owners``). Session details exist
        only on the node that holds the session."""
        state = self.edge.registry.get(sandbox_id)
        session = state.session if state is not None else None
        cluster = self.edge.cluster
        out: dict[str, Any] = {"id": sandbox_id, "connected": session is not None}
        if cluster is not None:
            if session is not None:
                out["node"] = cluster.node_id
                epoch = cluster.epochs.get(sandbox_id)
                if epoch:
                    out["epoch"] = epoch
            else:
                if not read:
                    owner = cluster.owners.get(sandbox_id)
                if owner is not None and owner[0] != cluster.node_id:
                    # its agent holds its one connection to another node
                    out["connected"] = True
                    out["node"], out["epoch"] = owner
        out["ports"] = self._ports_json(sandbox_id)
        if session is not None:
            out["session"] = session.session_id
            out["peer"] = session.peer
            out["streams"] = len(session.streams)
            connected_at = state.connected_at if state is not None else None
            if connected_at is not None:
                out["connectedAt"] = time.time() - (self.edge.loop.time() - connected_at)
            if session.rtt is not None:
                out["rttMs"] = round(session.rtt * 1000, 3)
        return out

    async def _one_sandbox(self, sandbox_id: str) -> dict[str, Any]:
        """``GET /v1/sandboxes/{id}``: in a cluster, the owner is read from the store (the feed
        does not see a lease expire)."""
        state = self.edge.registry.get(sandbox_id)
        cluster = self.edge.cluster
        owner: tuple[str, int] | None = None
        if cluster is not None and (state is None or state.session is None):
            try:
                owner = await cluster.store.owner(sandbox_id)
            except StoreError:
                owner = cluster.owners.get(sandbox_id)  # the feed's view, the best we have
            if owner is not None and owner[0] == cluster.node_id:
                owner = None  # ours, yet no session here: it just ended
        if state is None and owner is None:
            raise ApiError(
                404,
                "SANDBOX_NOT_FOUND",
                f"Sandbox {sandbox_id} is unknown (nothing exposed, no agent connected).",
            )
        return self._sandbox_json(sandbox_id, owner, read=cluster is not None)

    # -- wait for a port -------------------------------------------------------------------------
    async def _wait_port(
        self, sandbox_id: str, port: object, body: bytes, exchange: Exchange
    ) -> Response:
        """Ask the agent to probe the port until it is ready (Cloudflare's ``waitForPort``).

        Answers 200 once ready, 504 PORT_NOT_READY with the last status the probe saw, 503
        SANDBOX_NOT_CONNECTED when the agent is not connected or leaves meanwhile; in a cluster
        the wait runs on the owner node (tunneld/waitfwd.py). The wait is bounded by ``timeout``
        plus the edge's control timeout. A client that closes its connection meanwhile stops
        the wait, and with it the agent's probes (``unwatch_port``)."""
        payload = self._json_body(body) if body.strip() else {}
        unknown = set(payload) - _WAIT_FIELDS
        if unknown:
            raise ApiError(
                400, "INVALID_REQUEST", f"Unknown field(s): {', '.join(sorted(unknown)[:5])}."
            )
        port = validate_port(port)
        interval = payload.get("interval", 500)
        if isinstance(interval, int | float) and not isinstance(interval, bool):
            interval = round(min(max(interval, 100), 10_000))  # clamped, as Cloudflare does
        wait = self.edge.wait_port(
            sandbox_id,
            port,
            mode=payload.get("mode", "http"),
            path=payload.get("path", "/"),
            status_min=payload.get("statusMin", 200),
            status_max=payload.get("statusMax", 399),
            interval_ms=interval,
            timeout_s=payload.get("timeout", 30.0),
        )
        try:
            await exchange.unless_client_leaves(wait)
        except ClientGone:
            log.info(
                "sandbox %s: the client waiting for port %d left; wait stopped", sandbox_id, port
            )
            raise
        except PortNotReady as exc:
            return json_response(
                504,
                {
                    "error": exc.message,
                    "code": exc.code,
                    "port": exc.port,
                    "lastStatus": exc.last_status,
                },
            )
        return json_response(200, {"port": port, "ready": True})

    # -- wsConnect -------------------------------------------------------------------------------
    async def _ws_connect(
        self, sandbox_id: str, port: int, target: str, request: Request, exchange: Exchange
    ) -> None:
        """Relay the WebSocket handshake to the sandbox and hand the connection over to a tunnel
        stream (the shared server stops serving HTTP on it): a ``direct`` stream of the agent's
        session here, or, in a cluster, of a node link to the node that holds the session."""
        # A request target: printable ASCII without spaces (the rest percent-encoded). Else the
        # head rebuilt below is malformed, and the client got a 400 BAD_REQUEST quoting it.
        printable = target.isascii() and target.isprintable() and " " not in target
        if not target.startswith("/") or not printable:
            raise ApiError(400, "INVALID_PATH", "path must be an absolute path, e.g. /ws.")
        # Rebuild the handshake for the sandbox's server: its path, no admin credentials.
        raw = b"GET " + target.encode() + b" HTTP/1.1\r\n"
        for name, value in request.raw_headers:
            lower = name.lower()
            if lower == b"authorization":
                continue
            if lower == b"sec-websocket-protocol":  # a browser's token (tunneld/tcpws.py) too
                value = without_bearer(value)
                if not value:
                    continue
            raw += name + b": " + value + b"\r\n"
        raw += b"\r\n"
        try:
            head = H11HeadParser().parse(raw)
        except HeadError as exc:
            raise ApiError(exc.status, exc.code, exc.message) from None
        client = _client(request)
        trailer = (
            b"x-forwarded-for: "
            + client.rsplit(":", 1)[0].encode()
            + b"\r\nx-sandbox-name: "
            + sandbox_id.encode()
            + b"\r\n\r\n"
        )
        mux, stream_id, where = await self._open_direct(sandbox_id, port, client, exchange)
        endpoint = DirectEndpoint(mux, stream_id)
        transport, leftover = self._hand_over(endpoint, mux, exchange)
        endpoint.forward(forward_head(head, b"host: localhost:%d\r\n" % port, trailer))
        if leftover:
            endpoint.forward(leftover)
        if not transport.is_reading():
            transport.resume_reading()
        log.info(
            "sandbox %s: admin WebSocket connect to port %d%s%s", sandbox_id, port, target, where
        )

    async def _tcp_connect(
        self, sandbox_id: str, port: int, request: Request, exchange: Exchange
    ) -> None:
        """Raw TCP to 127.0.0.1:PORT in the sandbox: ``Connection: Upgrade`` + ``Upgrade: tcp``,
        answered ``101`` only once the agent connected to the port (its ACK of the stream), or
        with a JSON page when it could not; then the connection carries the bytes both ways."""
        upgrade = (request.header(b"upgrade") or b"").strip().lower()
        tokens = {t.strip() for t in (request.header(b"connection") or b"").lower().split(b",")}
        accept = b""
        if upgrade == b"websocket":  # the same bytes as WebSocket binary messages
            accept = accept_response(request)  # a bad handshake: 400/426 before any stream
        elif upgrade != b"tcp" or b"upgrade" not in tokens:
            raise ApiError(
                426,
                "UPGRADE_REQUIRED",
                "Raw TCP needs the headers Connection: Upgrade and Upgrade: tcp "
                "(or a WebSocket handshake).",
                [("upgrade", "tcp")],
            )
        client = _client(request)
        mux, stream_id, where = await self._open_direct(sandbox_id, port, client, exchange)
        if accept:
            endpoint: DirectEndpoint = WebSocketTcpEndpoint(mux, stream_id, accept)
        else:
            endpoint = DirectEndpoint(mux, stream_id, upgrade=_SWITCHED_TO_TCP)
        transport, leftover = self._hand_over(endpoint, mux, exchange)
        # The client waits for the 101 before it sends; anything it sent anyway waits in the
        # agent's LocalEndpoint until the connect (bounded by the stream window).
        transport.pause_reading()
        if leftover:
            endpoint.forward(leftover)
        mux.flush()  # the SYN goes now: no request head follows it
        endpoint.arm_connect_timer(self.edge.loop, TCP_CONNECT_TIMEOUT)
        log.info(
            "sandbox %s: admin raw TCP%s to port %d%s (client %s)",
            sandbox_id,
            " (WebSocket)" if accept else "",
            port,
            where,
            client,
        )

    async def _open_direct(
        self, sandbox_id: str, port: int, client: str, exchange: Exchange
    ) -> tuple[MuxProtocol, int, str]:
        """Open a ``direct`` stream to ``port``: of the agent's session here, or, in a cluster, of
        a node link to the node that holds the session. Returns the mux, the stream id and a
        note for the log. Nothing is awaited between the open and the caller's endpoint."""
        state = self.edge.registry.get(sandbox_id)
        cluster = self.edge.cluster
        if state is None and cluster is None:
            raise ApiError(404, "SANDBOX_NOT_FOUND", f"Sandbox {sandbox_id} is unknown.")
        session = state.session if state is not None else None
        if (session is None or not session.can_open_streams()) and cluster is None:
            raise ApiError(503, "SANDBOX_NOT_CONNECTED", f"Sandbox {sandbox_id} is not connected.")
        if session is not None and session.can_open_streams():
            try:
                return session, session.session.open_stream(port, "direct", client), ""
            except LocalProtocolError:
                raise _busy(sandbox_id) from None
        assert cluster is not None
        if state is None and sandbox_id not in cluster.owners:
            await self._known_in_cluster(sandbox_id)
        try:
            link, epoch = await cluster.route(sandbox_id)
        except RouteError as exc:
            raise ApiError(exc.status, exc.code, exc.message) from None
        if exchange.writer.transport.is_closing():
            raise ApiError(400, "CLIENT_GONE", "The client left while its owner was found.")
        try:
            stream_id = link.session.open_stream(
                port, "direct", client, sandbox=sandbox_id, epoch=epoch
            )
        except LocalProtocolError:
            raise _busy(sandbox_id) from None
        return link, stream_id, f" via node {link.node_id}"

    @staticmethod
    def _hand_over(
        endpoint: DirectEndpoint, mux: MuxProtocol, exchange: Exchange
    ) -> tuple[asyncio.Transport, bytes]:
        """The admin connection becomes ``endpoint``'s socket (the shared server lets go of it);
        returns its transport and the bytes the client sent after the request head."""
        writer = exchange.writer
        transport = cast(asyncio.Transport, writer.transport)
        # asyncio's StreamWriter closes its transport when garbage-collected (3.11.5+): the
        # endpoint keeps it alive for as long as the relay uses that transport.
        endpoint.writer = writer
        mux.add_stream(endpoint)
        leftover = exchange.detach()
        transport.set_protocol(endpoint)
        endpoint.connection_made(transport)
        return transport, leftover

    async def _known_in_cluster(self, sandbox_id: str) -> None:
        """404 for a sandbox no node knows: nothing exposed here and no owner in the store."""
        cluster = self.edge.cluster
        assert cluster is not None
        try:
            owner = await cluster.store.owner(sandbox_id)
        except StoreError:
            return  # cannot tell: the route says the store is unavailable
        if owner is None:
            raise ApiError(404, "SANDBOX_NOT_FOUND", f"Sandbox {sandbox_id} is unknown.")


# Raw TCP: the agent tries each of its dial hosts (127.0.0.1, then ::1) for up to 10 s
# (agent.core.CONNECT_TIMEOUT); past this the admin client gets 504 instead of waiting forever on
# an agent that never answers.
TCP_CONNECT_TIMEOUT: Final = 30.0

_SWITCHED_TO_TCP: Final = (
    b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: tcp\r\n\r\n"
)


def _websocket_bearer(token: str, request: Request) -> bool:
    """Raw TCP over WebSocket from a browser, which cannot set Authorization: the token as the
    subprotocol ``tunneld.bearer.<base64url>`` (tunneld/tcpws.py; this endpoint only)."""
    return verify_subprotocol_bearer(token, request)


def _client(request: Request) -> str:
    peer = request.peer
    return f"{peer[0]}:{peer[1]}" if peer is not None else ""


# The body of POST .../ports/{port}/wait: Cloudflare's port-watch fields; timeout in seconds.
_WAIT_FIELDS: Final = frozenset({"mode", "path", "statusMin", "statusMax", "interval", "timeout"})


# The body of POST .../ports: Cloudflare's fields, then the exposure options (issue 11).
_EXPOSE_FIELDS: Final = frozenset({"port", "name", "token", "protocol", "proxyProtocol", "inspect"})


def exposure_json(url: str, record: ExposureRecord) -> dict[str, Any]:
    """An exposure as the admin API shows it: Cloudflare's ``{port, exposedAt, name}``, then
    the options that differ from a plain preview URL."""
    options = record.options
    out: dict[str, Any] = {"port": record.port, "exposedAt": url, "name": record.name}
    if options.protocol != "http":
        out["protocol"] = options.protocol
    if record.public_port is not None:
        out["publicPort"] = record.public_port
    if options.proxy_protocol:
        out["proxyProtocol"] = True
    if options.inspect:
        out["inspect"] = True
    return out


# The request-inspection routes under /v1/sandboxes/{id}/ (tunneld/inspect.py)
_INSPECTION: Final = frozenset({"requests", "inspect"})


def _busy(sandbox_id: str) -> ApiError:
    return ApiError(
        503, "SANDBOX_BUSY", f"Sandbox {sandbox_id} cannot take more connections right now."
    )


def _path_port(text: str) -> object:
    """A port from a path segment: ASCII digits only (``str.isdigit()`` also accepts ``²``,
    which ``int()`` rejects, and full-width digits, which it parses); anything else is returned
    as is for ``validate_port`` to refuse with 400 INVALID_PORT."""
    return int(text) if text.isascii() and text.isdigit() and len(text) < 7 else text
