"""Several nodes, one set of preview URLs: who owns a sandbox, and reaching the owner.

Theory of operation
-------------------
With a Redis store (:mod:`tunneld.redis_store`) every node serves every exposure; a sandbox's
agent holds its one connection to one node, its **owner**. This module is the runtime part:

Ownership. When an agent's hello is accepted, the node claims the sandbox in Redis
(``RedisStore.claim``): a lease of ``lease_s`` seconds and a fencing **epoch** higher than any
before, so the newest session wins wherever it is. The lease is renewed every ``lease_s / 3``.
A node gives its session up (GO_AWAY ``REPLACED``) as soon as it learns that the epoch moved on:
from the feed (another node's claim is published) or when a renewal is refused. While Redis
cannot be reached nobody can claim, so the owner keeps serving; after the outage a renewal
tells it whether it still owns the sandbox (a lease that merely expired meanwhile is claimed
again). The lease is released when the session ends.

Forwarding. A preview request that lands on a node without the sandbox's session (the load
balancer picked another node) is routed to the owner: the owner is known from the feed
(``OwnerChanged`` and the ``Resync`` snapshot), else read from Redis, and the owner's node
record gives the address of its node-link listener. The landing node opens (once per node pair,
on demand) an authenticated node link (:mod:`tunneld.nodelink`) and hands the client connection
on as one stream: the bytes it already read, then everything in both directions, unparsed. The
owner serves the stream exactly as a client socket (:class:`relay.linked.LinkedTransport` under
its ``PublicConnection``): it parses, checks the token and every later request, and answers.
The stream's metadata names the sandbox and the epoch the landing node saw; an owner that holds
no live session for it, or only an older epoch, refuses the stream (``REFUSED_STREAM``), and
the landing node answers 503 ``SANDBOX_NOT_CONNECTED``. An owner that cannot be reached is a
502 ``NODE_UNREACHABLE`` within ``LINK_TIMEOUT``, never a hang.

Between nodes of one host the landing node first tries to pass the client's socket itself to
the owner (:mod:`tunneld.handover`), which then serves it directly; the node link is the
fallback.

The admin API works on every node: exposures are in Redis; an expose through node A reaches an
agent on node B through the feed (``EdgeServer._apply_store_change``); a WebSocket connect
(wsConnect) through node A for a sandbox owned by B goes to B as one ``direct`` link stream
carrying the rebuilt handshake, which B splices to a ``direct`` stream of its agent
(``_serve_direct``; resets cross with their code); a wait for a port goes to B as one control
request on the link (:mod:`tunneld.waitfwd`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import TYPE_CHECKING, Any, Final

from protocol.errors import GoAwayCode, LocalProtocolError, ResetCode
from protocol.events import StreamOpened
from relay.linked import LinkedTransport

from .nodelink import NodeLinkClient, NodeLinkServer
from .store import StoreError

if TYPE_CHECKING:
    from .edge import EdgeServer, EdgeSession
    from .redis_store import Change, RedisStore

__all__ = ["Cluster", "RouteError"]

log = logging.getLogger("tunneld.cluster")

LINK_TIMEOUT: Final = 3.0  # dial + TLS + welcome of a node link
NODE_TTL_FACTOR: Final = 3  # a node record lives lease_s x this without renewal


class RouteError(Exception):
    """The owner cannot be reached: ``status``/``code``/``message`` for the client's error page."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Cluster:
    """One node's part of a cluster (see the module docstring)."""

    def __init__(self, server: EdgeServer, store: RedisStore) -> None:
        self.server = server
        self.store = store
        self.node_id = store.node_id
        self.lease_s = server.config.lease_s
        self.owners: dict[str, tuple[str, int]] = {}  # sandbox -> (node, epoch), from the feed
        self.epochs: dict[str, int] = {}  # sandbox -> epoch this node holds for its session
        self.nodes: dict[str, dict[str, Any]] = {}  # node id -> record (link address...)
        self.links: dict[str, asyncio.Future[NodeLinkClient]] = {}
        self.server_links: set[NodeLinkServer] = set()
        # Forwarded admin exposes this node runs for others, whatever link asked (they outlive
        # a link that drops: tunneld/exposefwd.py); a stop cancels them.
        self.served_exposes: set[asyncio.Task[None]] = set()
        self.advertise = ""
        self.port = 0
        self._listener: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._client_tls: ssl.SSLContext | None = None
        self._redis_down = False
        # False once a store call failed or a lease expired: the node record may have expired
        # too, and is made sure of before the next claim (``_ensure_node``).
        self._node_ok = True
        # More of what other nodes read in this node's record (the hand-over socket: handover.py)
        self.node_info: dict[str, Any] = {}

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self, tls: ssl.SSLContext | None) -> None:
        config = self.server.config
        loop = self.server.loop
        try:
            self._listener = await loop.create_server(
                lambda: NodeLinkServer(self), config.node_host, config.node_port, ssl=tls
            )
        except OSError as exc:  # said as the other listeners say it (tunneld/edge.py _listening)
            where = f"{config.node_host or '*'}:{config.node_port} (node_host, node_port)"
            error = OSError(f"cannot open the node link listener on {where}: {exc}")
            error.errno = exc.errno  # str() without a second "[Errno N]"
            raise error from None
        self.port = self._listener.sockets[0].getsockname()[1]
        self.advertise = config.node_advertise or f"{config.node_host}:{self.port}"
        if config.node_tls_ca:
            self._client_tls = ssl.create_default_context(cafile=config.node_tls_ca)
        self.store.watch(self._on_change)
        await self._register()
        self._loops = [
            loop.create_task(self._renew_leases(), name="tunneld-cluster-leases"),
            loop.create_task(self._renew_node(), name="tunneld-cluster-node"),
        ]
        log.info(
            "cluster node %s: node links on %s:%d (advertised as %s%s)",
            self.node_id,
            config.node_host,
            self.port,
            self.advertise,
            ", TLS" if tls else "",
        )

    async def stop(self) -> None:
        from .exposefwd import stop_serving

        for task in self._loops:
            task.cancel()
        await stop_serving(self, self.store.timeout)
        if self._listener is not None:
            self._listener.close()
        for link in list(self.server_links):
            if link.transport is not None:
                link.session.close(GoAwayCode.SHUTTING_DOWN)
                link.flush()
                link.transport.close()
        for future in list(self.links.values()):
            if future.done() and not future.cancelled() and future.exception() is None:
                client = future.result()
                if client.transport is not None:
                    client.transport.close()
            else:
                future.cancel()
        self.links.clear()
        self.store.unwatch(self._on_change)
        for sandbox_id, epoch in list(self.epochs.items()):
            with contextlib.suppress(StoreError):
                await self.store.release(sandbox_id, self.node_id, epoch)
        self.epochs.clear()
        with contextlib.suppress(StoreError):
            await self.store.unregister_node(self.node_id)
        if self._tasks:  # releases of sessions that just ended: let them reach Redis
            await asyncio.wait(list(self._tasks), timeout=self.store.timeout * 2)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._loops, *self._tasks, return_exceptions=True)
        if self._listener is not None:
            await self._listener.wait_closed()

    def _spawn(self, coro: Any) -> None:
        task = self.server.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- node record -----------------------------------------------------------------------------
    async def _register(self) -> None:
        info = {"link": self.advertise, "tls": self._listener_tls(), **self.node_info}
        await self.store.register_node(self.node_id, info, self.lease_s * NODE_TTL_FACTOR)

    def _listener_tls(self) -> bool:
        return bool(self.server.config.tls_cert)

    async def _renew_node(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s)
            try:
                await self._ensure_node()
            except StoreError:
                self._node_ok = False  # the lease loop logs Redis outages once

    async def _ensure_node(self) -> None:
        """Extend this node's record, or write it again when it expired (an outage longer than
        its TTL). Other nodes reach an owner through its record, so a claim must never be
        visible before it: ``_claim`` calls this first whenever the record may have lapsed."""
        if not await self.store.renew_node(self.node_id, self.lease_s * NODE_TTL_FACTOR):
            log.info("cluster: node record %s had expired; registering again", self.node_id)
            await self._register()
        self._node_ok = True

    # -- ownership -------------------------------------------------------------------------------
    def on_attach(self, session: EdgeSession) -> None:
        """An agent's hello was accepted here: claim its sandbox (newest session wins)."""
        sandbox_id = session.sandbox_id
        assert sandbox_id is not None
        self._spawn(self._claim(sandbox_id, session))

    async def _claim(self, sandbox_id: str, session: EdgeSession) -> None:
        try:
            if not self._node_ok:
                await self._ensure_node()
            epoch = await self.store.claim(sandbox_id, self.node_id, self.lease_s)
        except StoreError as exc:
            self._node_ok = False
            # Nobody can claim while Redis is away; the lease loop claims once it is back.
            log.warning("sandbox %s: ownership not recorded (%s); serving anyway", sandbox_id, exc)
            self.epochs.setdefault(sandbox_id, 0)
            return
        if self._session_of(sandbox_id) is not session:
            # the session ended (or was replaced) while the claim was in flight
            if self._session_of(sandbox_id) is None:
                with contextlib.suppress(StoreError):
                    await self.store.release(sandbox_id, self.node_id, epoch)
            return
        self.epochs[sandbox_id] = epoch
        self.owners[sandbox_id] = (self.node_id, epoch)
        log.info("sandbox %s: owned by this node (epoch %d)", sandbox_id, epoch)

    def on_detach(self, session: EdgeSession) -> None:
        """The sandbox's session here ended: release the lease if it is still ours."""
        sandbox_id = session.sandbox_id
        if sandbox_id is None or self._session_of(sandbox_id) not in (None, session):
            return
        epoch = self.epochs.pop(sandbox_id, None)
        if epoch:
            if self.owners.get(sandbox_id) == (self.node_id, epoch):
                del self.owners[sandbox_id]
            self._spawn(self._release(sandbox_id, epoch))

    async def _release(self, sandbox_id: str, epoch: int) -> None:
        with contextlib.suppress(StoreError):
            await self.store.release(sandbox_id, self.node_id, epoch)

    def _session_of(self, sandbox_id: str) -> EdgeSession | None:
        state = self.server.registry.get(sandbox_id)
        return state.session if state is not None else None

    def _give_up(self, sandbox_id: str, why: str) -> None:
        """Another node owns the sandbox now: end our session (no split brain)."""
        self.epochs.pop(sandbox_id, None)
        session = self._session_of(sandbox_id)
        if session is not None:
            log.info("sandbox %s: %s; closing the session here", sandbox_id, why)
            session.replaced()

    async def _renew_leases(self) -> None:
        interval = self.lease_s / 3
        while True:
            await asyncio.sleep(interval)
            for sandbox_id, epoch in list(self.epochs.items()):
                session = self._session_of(sandbox_id)
                if session is None:
                    self.epochs.pop(sandbox_id, None)
                    continue
                try:
                    if epoch == 0:  # never recorded (Redis was away at the hello)
                        await self._claim(sandbox_id, session)
                    elif not await self.store.renew(sandbox_id, self.node_id, epoch, self.lease_s):
                        current = await self.store.owner(sandbox_id)
                        if current is None:
                            self._node_ok = False  # the lease lapsed: perhaps the record too
                            await self._claim(sandbox_id, session)  # expired, nobody took it
                        else:
                            self._give_up(sandbox_id, f"node {current[0]} owns it now")
                    if self._redis_down:
                        self._redis_down = False
                        log.info("cluster: leases renewed again")
                except StoreError as exc:
                    self._node_ok = False
                    if not self._redis_down:
                        self._redis_down = True
                        log.warning("cluster: cannot renew leases (%s); serving on", exc)
                    break

    def _on_change(self, change: Change) -> None:
        from .redis_store import OwnerChanged, Resync

        if isinstance(change, OwnerChanged):
            sandbox_id = change.sandbox_id
            if change.owner is None:
                if self.owners.get(sandbox_id, ("", 0))[0] == change.node:
                    self.owners.pop(sandbox_id, None)
                return
            node, epoch = change.owner
            self.owners[sandbox_id] = (node, epoch)
            mine = self.epochs.get(sandbox_id)
            if node != self.node_id and mine is not None and epoch > mine:
                self._give_up(sandbox_id, f"its agent connected to node {node} (epoch {epoch})")
        elif isinstance(change, Resync):
            self.owners = dict(change.owners)
            for sandbox_id, epoch in list(self.epochs.items()):
                owner = change.owners.get(sandbox_id)
                if owner is not None and owner[0] != self.node_id and owner[1] > epoch:
                    self._give_up(sandbox_id, f"node {owner[0]} owns it now (epoch {owner[1]})")

    def serves(self, sandbox_id: str, epoch: int | None) -> bool:
        """A forwarded stream for ``sandbox_id`` at ``epoch`` may be served here."""
        session = self._session_of(sandbox_id)
        if session is None or not session.can_open_streams():
            return False
        mine = self.epochs.get(sandbox_id)
        # The landing node's view may lag (an older epoch of ours is fine); a newer epoch than
        # ours means another node claimed the sandbox after us: we are the stale one.
        return epoch is None or mine is None or mine == 0 or epoch <= mine

    # -- forwarding (landing node) ---------------------------------------------------------------
    async def route(self, sandbox_id: str) -> tuple[NodeLinkClient, int]:
        """A usable link to the sandbox's owner, and the owner's epoch; RouteError otherwise.

        A failed dial is tried once more with the owner and its node record read again from
        Redis (the sandbox may have moved; a worker restarted under the same node id listens on
        another port), unless both turn out unchanged: then the owner really is unreachable.
        Redis failing on the way (the owner, or its node record on a first dial) is a 503, never
        an exception of the store's (tests/cluster/test_route_store_down.py)."""
        owner = self.owners.get(sandbox_id)
        failed: tuple[tuple[str, int], object] | None = None  # (owner, its link address)
        last = ""
        for attempt in range(2):
            try:
                if owner is None or attempt:
                    owner = await self.store.owner(sandbox_id)
                if attempt:
                    self.nodes = await self.store.nodes()
            except StoreError as exc:
                raise RouteError(
                    503,
                    "SANDBOX_NOT_CONNECTED",
                    f"Sandbox {sandbox_id} is not connected to this node and the cluster "
                    f"store cannot be read ({exc}).",
                ) from None
            if owner is None or owner[0] == self.node_id:
                raise RouteError(
                    503,
                    "SANDBOX_NOT_CONNECTED",
                    f"Sandbox {sandbox_id} is not connected; its agent is offline.",
                )
            address = (self.nodes.get(owner[0]) or {}).get("link")
            if failed is not None and failed == (owner, address):
                break  # the same owner at the same address: it really is unreachable
            try:
                return await self._link(owner[0]), owner[1]
            # StoreError: the owner's node record could not be read (a first dial to it); the
            # second try reads Redis again and answers 503 if it still cannot.
            except (OSError, TimeoutError, ConnectionError, LookupError, StoreError) as exc:
                log.warning("sandbox %s: owner node %s unreachable: %s", sandbox_id, owner[0], exc)
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                failed = (owner, (self.nodes.get(owner[0]) or {}).get("link"))
        assert owner is not None
        raise RouteError(
            502,
            "NODE_UNREACHABLE",
            f"Sandbox {sandbox_id} is connected to node {owner[0]}, which cannot be reached "
            f"from this node ({last}).",
        )

    async def _link(self, node_id: str) -> NodeLinkClient:
        future = self.links.get(node_id)
        if future is not None and future.done():
            if not future.cancelled() and future.exception() is None and future.result().usable():
                return future.result()
            self.links.pop(node_id, None)
            future = None
        if future is None:
            future = self.server.loop.create_future()
            self.links[node_id] = future
            self._spawn(self._dial(node_id, future))
        return await asyncio.wait_for(asyncio.shield(future), LINK_TIMEOUT + 1)

    async def _dial(self, node_id: str, future: asyncio.Future[NodeLinkClient]) -> None:
        try:
            client = await asyncio.wait_for(self._connect(node_id), LINK_TIMEOUT)
        except BaseException as exc:
            if self.links.get(node_id) is future:
                del self.links[node_id]
            if not future.done():
                future.set_exception(
                    exc if isinstance(exc, Exception) else ConnectionError("cancelled")
                )
                future.exception()  # retrieved: a failed dial nobody awaited is not an error
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        if not future.done():
            future.set_result(client)

    async def _connect(self, node_id: str) -> NodeLinkClient:
        info = self.nodes.get(node_id)
        if info is None:
            self.nodes = await self.store.nodes()
            info = self.nodes.get(node_id)
        if info is None:
            raise LookupError(f"node {node_id} has no record (it stopped or expired)")
        host, _, port = str(info.get("link", "")).rpartition(":")
        tls = self._client_tls if info.get("tls") else None
        if info.get("tls") and tls is None:
            raise ConnectionError(f"node {node_id} uses TLS and node_tls_ca is not set here")
        _transport, client = await self.server.loop.create_connection(
            lambda: NodeLinkClient(self, node_id),
            host.strip("[]"),
            int(port),
            ssl=tls,
            server_hostname=host.strip("[]") if tls else None,
        )
        await client.welcomed
        log.info("node link to %s (%s) up", node_id, info.get("link"))
        return client

    def forget_link(self, client: NodeLinkClient) -> None:
        future = self.links.get(client.node_id)
        if (
            future is not None
            and future.done()
            and not future.cancelled()
            and future.exception() is None
            and future.result() is client
        ):
            del self.links[client.node_id]

    # -- forwarded streams (owner node) ----------------------------------------------------------
    def serve_forwarded(self, link: NodeLinkServer, event: StreamOpened) -> None:
        """Serve a stream another node forwarded as if its client had connected here."""
        from .public import PublicConnection

        sandbox_id = event.sandbox
        assert sandbox_id is not None
        if event.via not in ("preview", "direct") or not self.serves(sandbox_id, event.epoch):
            link.session.reset_stream(event.stream_id, ResetCode.REFUSED_STREAM)
            link.flush()
            return
        if event.via == "direct":
            self._serve_direct(link, event, sandbox_id)
            return
        try:
            link.session.accept_stream(event.stream_id)
        except LocalProtocolError:
            return
        server = self.server
        server.metrics.public_connections.inc()
        conn = PublicConnection(server, server.parser)
        transport = LinkedTransport(link, event.stream_id, conn, {"peername": _peer(event.client)})
        transport.start()
        link.flush()

    def _serve_direct(self, link: NodeLinkServer, event: StreamOpened, sandbox_id: str) -> None:
        """An admin WebSocket connect or raw TCP another node received (tunneld/admin.py): the
        landing node already rebuilt any handshake, so the link stream is spliced, unparsed, to a
        ``direct`` stream of the agent's session here; the agent's accept and resets cross with
        their code both ways."""
        from .direct import LinkedDirectStream

        session = self._session_of(sandbox_id)
        assert session is not None  # serves() said so
        try:
            agent_stream = session.session.open_stream(event.port, "direct", event.client)
        except LocalProtocolError:  # the agent's stream limit, or it started going away
            link.session.reset_stream(event.stream_id, ResetCode.REFUSED_STREAM)
            link.flush()
            return
        # The link stream is accepted when the agent accepts its stream (it connected to the
        # port: LinkedDirectStream.peer_accepted), so the landing node learns of it as one would.
        endpoint = LinkedDirectStream(session, agent_stream)
        session.add_stream(endpoint)
        peer = {"peername": _peer(event.client)}
        LinkedTransport(link, event.stream_id, endpoint, peer).start()
        link.flush()
        session.flush()


def _peer(client: str) -> tuple[str, int]:
    """``"1.2.3.4:5678"`` / ``"[::1]:5678"`` -> (host, port), as a socket's peername."""
    host, _, port = client.rpartition(":")
    return host.strip("[]") or "unknown", int(port) if port.isdigit() else 0
