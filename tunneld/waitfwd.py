"""Waiting for a port of a sandbox whose agent is connected to another node of the cluster.

Theory of operation
-------------------
``POST /v1/sandboxes/{id}/ports/{port}/wait`` may land on any node (the load balancer picks
one), but only the **owner** node (:mod:`tunneld.cluster`) holds the agent's session that can
probe the port. A node without the session forwards the wait over its authenticated node link
to the owner (``Cluster.route``: the same owner lookup, dial and ``NODE_UNREACHABLE`` answer as
a forwarded preview request) as one control request of the link, not a stream: the landing
node sends ``watch_port`` with the validated fields and ``sandbox`` set; the owner runs its own
``EdgeServer.wait_port`` for it (never forwarding again, so two nodes with different views of
the owner cannot bounce a wait between them) and answers the link request as the admin API
would, in control form: ``ok`` (200), or ``error`` with the admin API's code and message
(``PORT_NOT_READY`` with the last status in ``status_code``, ``SANDBOX_NOT_CONNECTED`` when the
agent left or is not there, ...), which the landing node maps back to the same HTTP status.

Ending early. When the landing node's admin client leaves, the landing node sends
``unwatch_port {id}`` on the link; the owner cancels the wait it serves, which sends
``unwatch_port`` to the agent (when the agent says it understands it): the probes stop. When
the link drops (the owner died or was cut off), the landing node fails every wait on it with
502 ``NODE_UNREACHABLE`` at once, and the owner cancels every wait it served for that link.
A wait that gets no answer at all within its timeout plus the control timeout plus
``LINK_TIMEOUT`` is 504 ``NODE_TIMEOUT``: never a hang.

Compatibility. An owner from before forwarded waits would take the ``sandbox`` field for a
protocol error and drop the link, so it is asked only when its link ``welcome`` says
``limits["version"] >=`` :data:`tunneld.nodelink.WAIT_LINK_VERSION`; an older owner's sandbox is
a 501 ``NODE_TOO_OLD``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import TYPE_CHECKING, Final

from protocol import control
from protocol.errors import LocalProtocolError
from protocol.hostnames import ValidationError

from .cluster import LINK_TIMEOUT, RouteError
from .edge import PortNotReady
from .registry import RegistryError

if TYPE_CHECKING:
    from .cluster import Cluster
    from .nodelink import NodeLinkClient, NodeLinkServer

__all__ = ["MAX_SERVED_WAITS", "LinkWaits", "forward_wait", "serve_wait", "stop_wait"]

log = logging.getLogger("tunneld.cluster")

# Waits one owner serves for one link at a time. An agent runs at most 64 watches
# (agent.portwatch.MAX_WATCHES); a landing node forwards for every sandbox of the owner, so the
# link allows many more, while still bounding the tasks another node can make us hold.
MAX_SERVED_WAITS: Final = 4096

# The owner's error codes and the HTTP status the admin API gives each (what is not listed: 502).
_STATUSES: Final = {
    "SANDBOX_NOT_CONNECTED": 503,
    "AGENT_TOO_OLD": 501,
    "AGENT_TIMEOUT": 504,
    "INVALID_PORT": 400,
    "INVALID_REQUEST": 400,
    "INVALID_SANDBOX_ID": 400,
    "TOO_MANY_WATCHES": 429,
}


class LinkLost(Exception):
    """The node link ended before the owner answered."""


class LinkWaits:
    """The landing node's forwarded waits on one link, by request id: their reply futures."""

    __slots__ = ("_loop", "_next", "_waiting")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._next = 0
        self._waiting: dict[int, asyncio.Future[control.Ok | control.Error]] = {}

    def new(self) -> tuple[int, asyncio.Future[control.Ok | control.Error]]:
        self._next = self._next % (2**31 - 1) + 1
        future: asyncio.Future[control.Ok | control.Error] = self._loop.create_future()
        self._waiting[self._next] = future
        return self._next, future

    def forget(self, request_id: int) -> None:
        self._waiting.pop(request_id, None)

    def resolve(self, reply: control.Ok | control.Error) -> None:
        future = self._waiting.pop(reply.id, None) if reply.id is not None else None
        if future is not None and not future.done():
            future.set_result(reply)

    def fail_all(self, why: str) -> None:
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(LinkLost(why))


# -- the landing node -----------------------------------------------------------------------------


async def forward_wait(
    cluster: Cluster, sandbox_id: str, message: control.WatchPort, control_timeout: float
) -> None:
    """Run the validated wait ``message`` on the sandbox's owner node; return when the port is
    ready, raise :class:`PortNotReady` or :class:`RegistryError` as ``EdgeServer.wait_port``
    does (plus 502 ``NODE_UNREACHABLE``, 501 ``NODE_TOO_OLD``, 504 ``NODE_TIMEOUT``)."""
    from .nodelink import WAIT_LINK_VERSION

    try:
        link, _epoch = await cluster.route(sandbox_id)
    except RouteError as exc:
        raise RegistryError(exc.status, exc.code, exc.message) from None
    if link.peer_version < WAIT_LINK_VERSION:
        raise RegistryError(
            501,
            "NODE_TOO_OLD",
            f"Sandbox {sandbox_id} is connected to node {link.node_id}, which runs an older "
            "tunneld that cannot wait for ports on behalf of other nodes; upgrade it, or send "
            "the wait to that node.",
        )
    request_id, future = link.waits.new()
    try:
        link.session.send_control(dataclasses.replace(message, id=request_id, sandbox=sandbox_id))
        link.flush()
        budget = message.timeout_s + control_timeout + LINK_TIMEOUT
        reply = await asyncio.wait_for(future, budget)
    except (asyncio.CancelledError, TimeoutError) as exc:
        _unwatch(link, request_id)  # the client left, or the owner is stuck: stop its probes
        if isinstance(exc, TimeoutError):
            raise RegistryError(
                504,
                "NODE_TIMEOUT",
                f"Node {link.node_id}, which holds sandbox {sandbox_id}, did not answer the wait "
                f"for port {message.port} within {budget:g} s.",
            ) from None
        raise
    except (LinkLost, LocalProtocolError) as exc:
        raise RegistryError(
            502,
            "NODE_UNREACHABLE",
            f"Node {link.node_id}, which holds sandbox {sandbox_id}, went away while waiting "
            f"for port {message.port} ({exc}).",
        ) from None
    finally:
        link.waits.forget(request_id)
    if isinstance(reply, control.Ok):
        return
    if reply.code == "PORT_NOT_READY":
        raise PortNotReady(message.port, reply.message, reply.status_code)
    raise RegistryError(_STATUSES.get(reply.code, 502), reply.code, reply.message)


def _unwatch(link: NodeLinkClient, request_id: int) -> None:
    if link.session.closed:
        return
    with contextlib.suppress(LocalProtocolError):
        link.session.send_control(control.UnwatchPort(request_id))
        link.flush()


# -- the owner node -------------------------------------------------------------------------------


def serve_wait(link: NodeLinkServer, message: control.WatchPort) -> None:
    """A wait another node forwarded: run it here (the agent's session is here) and answer."""
    served = link.served_waits
    if message.id in served or len(served) >= MAX_SERVED_WAITS:
        link.session.send_control(
            control.Error(
                "TOO_MANY_WATCHES",
                f"Node {link.cluster.node_id} serves too many waits for node {link.peer_node}.",
                message.id,
            )
        )
        link.flush()
        return
    task = link.loop.create_task(_serve(link, message))
    served[message.id] = task
    task.add_done_callback(lambda t: served.pop(message.id, None))


def stop_wait(link: NodeLinkServer, request_id: int) -> None:
    """``unwatch_port`` from the landing node: its client left."""
    task = link.served_waits.get(request_id)
    if task is not None:
        task.cancel()


async def _serve(link: NodeLinkServer, message: control.WatchPort) -> None:
    assert message.sandbox is not None
    reply: control.Ok | control.Error
    try:
        await link.cluster.server.wait_port(
            message.sandbox,
            message.port,
            mode=message.mode,
            path=message.path,
            status_min=message.status_min,
            status_max=message.status_max,
            interval_ms=message.interval_ms,
            timeout_s=message.timeout_s,
            forward=False,
        )
    except PortNotReady as exc:
        reply = control.Error(exc.code, exc.message, message.id, exc.last_status)
    except ValidationError as exc:  # RegistryError too: the admin API's answers
        reply = control.Error(exc.code, exc.message[:4096], message.id)
    except Exception:  # a bug: the landing node still gets an answer
        log.exception("forwarded wait from %s failed", link.peer_node)
        reply = control.Error("INTERNAL_ERROR", "Internal error; see the tunneld log.", message.id)
    else:
        reply = control.Ok(message.id)
    if not link.session.closed:
        with contextlib.suppress(LocalProtocolError):
            link.session.send_control(reply)
            link.flush()
