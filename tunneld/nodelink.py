"""Node-to-node links: one multiplexed session from a node to another, for forwarded requests.

Theory of operation
-------------------
A link is the tunnel protocol of ``protocol/`` between two edge nodes, opened on demand by the
node that has something to forward (the *dialer*) to the node that owns the sandbox (the
*acceptor*): the dialer speaks the agent's side (``Role.AGENT``: it sends the ``Hello`` and
opens odd stream ids), the acceptor the edge's, with ``accept_remote_streams`` on. One link
per ordered node pair; the reverse direction, when needed, is the other node's own link.

Authentication: the ``Hello`` carries the dialer's node id and a token
``{unix time}.{HMAC-SHA256(secret, "tunneld-node-link" NUL node_id NUL time)}`` under the
cluster's shared ``secret`` (every node already holds it: it verifies agent tokens). The
acceptor compares in constant time and refuses a token older or newer than
``TOKEN_MAX_SKEW`` seconds, which bounds a replay; off loopback the link must use TLS (the same
rule and setting as agent links, ``allow_plaintext_agents``), and TLS is what makes a replay
impossible. A refused hello gets an ``Error`` and the connection closes.

Each forwarded client connection is one stream whose open metadata carries the sandbox and the
ownership epoch the dialer saw (docs/protocol.md). What the acceptor does with it is the
cluster's business (:mod:`tunneld.cluster`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from typing import TYPE_CHECKING, Any, Final

from protocol import control
from protocol.errors import GoAwayCode, ResetCode
from protocol.events import ConnectionTerminated, StreamOpened
from protocol.session import Role, Session, SessionConfig
from relay.budget import RateLimitedLog
from relay.mux import MuxProtocol

from .auth import plaintext_refusal

if TYPE_CHECKING:
    from .cluster import Cluster

__all__ = [
    "EXPOSE_LINK_VERSION",
    "LINK_VERSION",
    "PUBLIC_PORT_LINK_VERSION",
    "WAIT_LINK_VERSION",
    "NodeLinkClient",
    "NodeLinkServer",
    "node_link_token",
    "verify_node_link_token",
]

log = logging.getLogger("tunneld.cluster")

TOKEN_MAX_SKEW: Final = 300.0  # seconds between the nodes' clocks (and a replay's window)
# What a link's acceptor serves, said in its welcome as limits["version"] (absent: 1, streams
# only). 2: forwarded waits for a port, watch_port / unwatch_port requests (tunneld/waitfwd.py).
# 3: forwarded admin exposes, expose requests with ``sandbox`` set (tunneld/exposefwd.py). A
# dialer sends a request only to an acceptor whose welcome says its level: an older one would
# take it for a protocol error and drop the link. The dialer's hello says its own level in
# ``version`` (absent: 1); 4: it reads an exposure's ``public_port`` in the answer to a
# forwarded expose, which an acceptor sends only to such a dialer.
WAIT_LINK_VERSION: Final = 2
EXPOSE_LINK_VERSION: Final = 3
PUBLIC_PORT_LINK_VERSION: Final = 4
LINK_VERSION: Final = PUBLIC_PORT_LINK_VERSION
_DOMAIN: Final = b"tunneld-node-link\0"
# Node-link connections accepted and not authenticated yet (no valid hello), all peers together:
# past it a new one is closed at once. A link sends its hello first thing, so only a peer that is
# not a node (anyone who reaches node_port) holds one open until handshake_timeout.
MAX_PENDING_LINKS: Final = 256
# What anyone who reaches node_port can cause once per connection: a burst, then one a second.
_UNAUTHENTICATED_LOG: Final = RateLimitedLog(
    log, "warnings about node-link connections that do not authenticate"
)


def node_link_token(secret: str, node_id: str, now: float | None = None) -> str:
    stamp = str(int(time.time() if now is None else now))
    mac = hmac.new(
        secret.encode(), _DOMAIN + node_id.encode() + b"\0" + stamp.encode(), hashlib.sha256
    )
    return f"{stamp}.{mac.hexdigest()}"


def verify_node_link_token(secret: str, node_id: str, token: str, now: float | None = None) -> bool:
    stamp, _, _mac = token.partition(".")
    if not stamp.isdigit() or len(stamp) > 12:
        return False
    now = time.time() if now is None else now
    if abs(now - int(stamp)) > TOKEN_MAX_SKEW:
        return False
    expected = node_link_token(secret, node_id, int(stamp))
    return hmac.compare_digest(expected.encode(), token.encode())


def _link_session_config(cluster: Cluster, *, accept: bool) -> SessionConfig:
    config = cluster.server.config
    return SessionConfig(
        max_streams=config.max_streams,
        heartbeat_interval=config.heartbeat_interval,
        dead_timeout=config.dead_timeout,
        accept_remote_streams=accept,
    )


class NodeLinkServer(MuxProtocol):
    """The acceptor's end of a link from another node."""

    def __init__(self, cluster: Cluster) -> None:
        loop = cluster.server.loop
        super().__init__(
            Session(Role.EDGE, _link_session_config(cluster, accept=True), now=loop.time()), loop
        )
        self.cluster = cluster
        self.peer = "unknown"
        self.peer_node: str | None = None
        self.peer_version = 1  # the dialer's hello.version (LINK_VERSION)
        self._handshake_timer: asyncio.TimerHandle | None = None
        self.served_waits: dict[int, asyncio.Task[None]] = {}  # forwarded waits (waitfwd.py)
        self.served_exposes: dict[int, asyncio.Task[None]] = {}  # forwarded exposes (exposefwd.py)

    def describe(self) -> str:
        return f"node link from {self.peer_node or '(no hello yet)'} at {self.peer}"

    def on_connected(self) -> None:
        assert self.transport is not None
        peer = self.transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = f"{peer[0]}:{peer[1]}"
        links = self.cluster.server_links
        pending = sum(1 for link in links if link.peer_node is None)
        if pending >= MAX_PENDING_LINKS:
            _UNAUTHENTICATED_LOG.log(
                self.loop.time(),
                "node link from %s refused: %d connections already wait for their hello "
                "(MAX_PENDING_LINKS)",
                self.peer,
                pending,
            )
            self.transport.abort()
            return
        links.add(self)
        timeout = self.cluster.server.config.handshake_timeout
        self._handshake_timer = self.loop.call_later(timeout, self._on_handshake_timeout)

    def _on_handshake_timeout(self) -> None:
        self._handshake_timer = None
        if self.peer_node is None and self.transport is not None:
            _UNAUTHENTICATED_LOG.log(
                self.loop.time(), "node link from %s sent no hello in time; closing", self.peer
            )
            self.transport.abort()

    def on_control(self, message: Any) -> None:
        if self.peer_node is not None:
            from .waitfwd import serve_wait, stop_wait

            if isinstance(message, control.WatchPort) and message.sandbox is not None:
                serve_wait(self, message)
            elif isinstance(message, control.UnwatchPort):
                stop_wait(self, message.id)
            elif isinstance(message, control.Expose) and message.sandbox is not None:
                from .exposefwd import serve_expose

                serve_expose(self, message)
            return  # nothing else is asked on a link
        if not isinstance(message, control.Hello):
            return
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        transport = self.transport
        config = self.cluster.server.config
        refusal = (
            plaintext_refusal(
                transport.get_extra_info("peername"),
                tls=transport.get_extra_info("ssl_object") is not None,
                allowed=config.allow_plaintext_agents,
            )
            if transport is not None
            else "connection closed"
        )
        if refusal is None and not verify_node_link_token(
            config.secret, message.sandbox_id, message.token
        ):
            refusal = "bad node-link token (a different secret, or clocks more than 5 min apart)"
        if refusal is not None:
            _UNAUTHENTICATED_LOG.log(
                self.loop.time(), "node link from %s refused: %s", self.peer, refusal
            )
            self.session.send_control(control.Error("AUTH_FAILED", refusal, None))
            self.session.close(GoAwayCode.PROTOCOL_ERROR)
            self.flush()
            if transport is not None:
                transport.close()
            return
        self.peer_node = message.sandbox_id
        self.peer_version = message.version
        limits = {"version": LINK_VERSION}  # what this node serves on the link
        self.session.send_control(
            control.Welcome(self.cluster.node_id, config.heartbeat_interval, limits, ())
        )
        self.flush()
        log.info("node link from %s (%s) up", self.peer_node, self.peer)

    def on_stream_opened(self, event: StreamOpened) -> None:
        if self.peer_node is None or event.sandbox is None:
            self.session.reset_stream(event.stream_id, ResetCode.REFUSED_STREAM)
            return
        self.cluster.serve_forwarded(self, event)

    def on_terminated(self, event: ConnectionTerminated) -> None:
        if self.peer_node is not None and event.code not in (
            GoAwayCode.NORMAL,
            GoAwayCode.SHUTTING_DOWN,
        ):
            log.warning("node link from %s ended: %s", self.peer_node, event.reason)

    def on_disconnected(self, exc: Exception | None) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self.cluster.server_links.discard(self)
        for task in list(self.served_waits.values()):
            task.cancel()  # nobody to answer: stop the agent's probes


class NodeLinkClient(MuxProtocol):
    """The dialer's end: forwarded connections go out on it as streams."""

    def __init__(self, cluster: Cluster, node_id: str) -> None:
        loop = cluster.server.loop
        super().__init__(
            Session(Role.AGENT, _link_session_config(cluster, accept=False), now=loop.time()),
            loop,
        )
        self.cluster = cluster
        self.node_id = node_id  # the node dialled
        self.welcomed: asyncio.Future[None] = loop.create_future()
        self._going_away = False
        self.peer_version = 1  # the acceptor's limits["version"] (LINK_VERSION)
        from .waitfwd import LinkWaits

        self.waits = LinkWaits(loop)  # waits forwarded on this link, waiting for their reply

    def describe(self) -> str:
        return f"node link to {self.node_id}"

    def on_connected(self) -> None:
        config = self.cluster.server.config
        node = self.cluster.node_id
        token = node_link_token(config.secret, node)
        self.session.send_control(control.Hello(node, token, LINK_VERSION))
        self.flush()

    def on_control(self, message: Any) -> None:
        if isinstance(message, control.Welcome):
            if not self.welcomed.done():
                self.peer_version = message.limits.get("version", 1)
                self.welcomed.set_result(None)
        elif isinstance(message, control.Error) and not self.welcomed.done():
            refused = ConnectionRefusedError(f"{message.code}: {message.message}")
            self.welcomed.set_exception(refused)
        elif isinstance(message, (control.Ok, control.Error)):
            self.waits.resolve(message)

    def usable(self) -> bool:
        return (
            self.welcomed.done()
            and self.welcomed.exception() is None
            and not self._going_away
            and not self.session.closed
            and self.transport is not None
        )

    def on_go_away(self, code: GoAwayCode) -> None:
        self._going_away = True
        self.cluster.forget_link(self)

    def on_terminated(self, event: ConnectionTerminated) -> None:
        self._going_away = True
        self.cluster.forget_link(self)
        self.waits.fail_all(f"link ended: {event.reason}")

    def on_disconnected(self, exc: Exception | None) -> None:
        self._going_away = True
        self.waits.fail_all(f"link lost: {exc}" if exc else "link closed")
        if not self.welcomed.done():
            self.welcomed.set_exception(
                ConnectionError(f"closed before the welcome: {exc}" if exc else "closed")
            )
        self.cluster.forget_link(self)
