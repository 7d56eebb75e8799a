"""An admin expose for a sandbox whose agent is connected to another node of the cluster.

Theory of operation
-------------------
``POST /v1/sandboxes/{id}/ports`` may land on any node, but only the **owner** node
(:mod:`tunneld.cluster`) can ask the agent, and the agent may refuse the port (its own control
API's: 400 ``INVALID_PORT``). So that the answer is the same on every node, a node that holds no
session for the sandbox while the feed names another node as its owner forwards the expose over
its node link (``EdgeServer.expose``, as ``EdgeServer.wait_port`` forwards a wait: the same
lookup and dial, :mod:`tunneld.waitfwd`) as one control request of the link: ``expose`` with the
validated fields and ``sandbox`` set. The owner runs it as its own admin API would
(``EdgeServer.expose`` with ``forward=False``: stored, told to the agent, removed again if the
agent refuses it; the owner's own validation, so a node can make another do no more than that
node's admin API does) and answers ``ok`` with the exposure, or ``error`` with the admin API's
code, message and HTTP status (``status_code``). The owner serves it only for a sandbox whose
live session it holds (else ``error`` ``SANDBOX_NOT_CONNECTED``), and never forwards it again.
The landing node then waits until its view of the store has caught up with the owner's write
(``RedisStore.caught_up``) and answers from it, or from the owner's answer while its view does
not have it yet (:class:`OwnersExposure`). That answer carries the exposure's public TCP port
(``public_port``, a ``tcp`` exposure's) only to a landing node whose link hello says
:data:`tunneld.nodelink.PUBLIC_PORT_LINK_VERSION`: an older one would take the field for a
protocol error.

Falling back. Whenever the owner cannot give the verdict, the landing node does what it did
before forwarding existed: it stores the exposure itself and answers 200, and the owner pushes
it to its agent through the store's feed (which may refuse it: then the owner removes it). That
is the case for an owner that cannot be reached, one whose link ``welcome`` says a version below
:data:`tunneld.nodelink.EXPOSE_LINK_VERSION` (a node from before this: an ``expose`` on its link
would be a protocol error), a link that drops, an owner that says it does not hold the session (or
is busy: :data:`MAX_SERVED_EXPOSES`), and an owner that does not answer within
:func:`reply_budget`. An owner that is asked keeps running the expose when the link drops, so
a change it made is told to its agent, or undone, as one it was asked for by its own client;
only its stop cancels it (:func:`stop_serving`, after its agents' sessions ended).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import TYPE_CHECKING, Final

from protocol import control
from protocol.errors import LocalProtocolError
from protocol.hostnames import ExposureOptions, ValidationError, validate_exposure_options

from .cluster import LINK_TIMEOUT, RouteError
from .registry import RegistryError
from .waitfwd import LinkLost

if TYPE_CHECKING:
    from .cluster import Cluster
    from .edge import EdgeServer
    from .nodelink import NodeLinkServer

__all__ = [
    "MAX_SERVED_EXPOSES",
    "OwnersExposure",
    "expose_elsewhere",
    "expose_message",
    "forward_expose",
    "reply_budget",
    "serve_expose",
    "stop_serving",
]

log = logging.getLogger("tunneld.cluster")

# Exposes one owner runs for one link at a time. Each is short (a store write and one control
# round trip), so this only bounds what another node can make us hold.
MAX_SERVED_EXPOSES: Final = 256
# The owner's errors that are no verdict on the expose: its agent left or moved meanwhile (so
# nobody can check the port now), or it runs too many forwarded exposes for this node.
_NO_VERDICT: Final = frozenset({"SANDBOX_NOT_CONNECTED", "NODE_BUSY"})


@dataclasses.dataclass(frozen=True, slots=True)
class OwnersExposure(control.Exposure):
    """The owner's answer to a forwarded expose, as ``EdgeServer.expose`` returns it when this
    node's view of the store has not caught up with the owner's write (the feed is away or
    slow): the admin API answers with it instead of its view's record."""


def reply_budget(cluster: Cluster) -> float:
    """How long the landing node waits for the owner's verdict: the owner's store writes (the
    expose, and its removal when refused; each at most ``2 x timeout + 0.5`` with its retry),
    the agent's ``control_timeout``, and the link's own ``LINK_TIMEOUT``."""
    store_call = 2 * cluster.store.timeout + 0.5
    return cluster.server.config.control_timeout + 2 * store_call + LINK_TIMEOUT


# -- the landing node -----------------------------------------------------------------------------


async def expose_elsewhere(
    server: EdgeServer,
    sandbox_id: str,
    port: int,
    name: str | None,
    token: str | None,
    options: ExposureOptions,
) -> control.Exposure | None:
    """``EdgeServer.expose`` of a validated expose in a cluster, when another node holds the
    sandbox's session: run there (:func:`forward_expose`), then answered once this node's view
    caught up with the owner's write: the view's exposure, or the owner's
    (:class:`OwnersExposure`) when the view does not have it yet. :class:`RegistryError` with
    the owner's status and code when it refused it. None when the session is here, no other
    node owns the sandbox, or the owner gave no verdict: the caller exposes it itself."""
    cluster = server.cluster
    if cluster is None:
        return None
    state = server.registry.get(sandbox_id)
    session = state.session if state is not None else None
    owner = cluster.owners.get(sandbox_id)
    if session is not None or owner is None or owner[0] == cluster.node_id:
        return None
    exposure = await forward_expose(cluster, sandbox_id, expose_message(port, name, token, options))
    if exposure is None:
        return None
    # The owner stored it before answering: once this node's feed delivered everything
    # published before now, the view has it (or a later change, which is the truth now).
    caught_up = getattr(cluster.store, "caught_up", None)
    if caught_up is not None:
        await caught_up(cluster.store.timeout)
    state = server.registry.get(sandbox_id)
    record = state.exposures.get(port) if state is not None else None
    if record is not None:
        return server.exposure_message(sandbox_id, record)
    # The feed is away (or slow): answer with what the owner said it exposed.
    return OwnersExposure(
        exposure.port, exposure.token, exposure.url, exposure.name, exposure.public_port
    )


async def forward_expose(
    cluster: Cluster, sandbox_id: str, message: control.Expose
) -> control.Exposure | None:
    """Run the validated ``message`` on the sandbox's owner node: its exposure when the owner
    exposed it, :class:`RegistryError` with the owner's status and code when it answered an
    error, None when it gave no verdict (the caller exposes it itself, as before forwarding
    existed)."""
    from .nodelink import EXPOSE_LINK_VERSION

    try:
        link, _epoch = await cluster.route(sandbox_id)
    except RouteError as exc:
        log.info("sandbox %s: expose of port %d not checked: %s", sandbox_id, message.port, exc)
        return None
    if link.peer_version < EXPOSE_LINK_VERSION:
        return None  # a node from before this: `expose` on its link would be a protocol error
    request_id, future = link.waits.new()
    budget = reply_budget(cluster)
    try:
        link.session.send_control(_with(message, request_id, sandbox_id))
        link.flush()
        reply = await asyncio.wait_for(future, budget)
    except TimeoutError:
        log.warning(
            "sandbox %s: node %s did not answer the expose of port %d within %g s; "
            "exposing it here",
            sandbox_id,
            link.node_id,
            message.port,
            budget,
        )
        return None
    except (LinkLost, LocalProtocolError) as exc:
        log.warning(
            "sandbox %s: node %s went away during the expose of port %d (%s); exposing it here",
            sandbox_id,
            link.node_id,
            message.port,
            exc,
        )
        return None
    finally:
        link.waits.forget(request_id)
    if isinstance(reply, control.Ok):
        return reply.exposures[0] if reply.exposures else None
    if reply.code in _NO_VERDICT:
        return None
    raise RegistryError(reply.status_code or 502, reply.code, reply.message)


def _with(message: control.Expose, request_id: int, sandbox_id: str) -> control.Expose:
    return control.Expose(
        request_id,
        message.port,
        message.name,
        message.token,
        message.protocol,
        message.proxy_protocol,
        message.inspect,
        sandbox_id,
    )


# -- the owner node -------------------------------------------------------------------------------


def serve_expose(link: NodeLinkServer, message: control.Expose) -> None:
    """An expose another node forwarded: run it here, where the agent's session is."""
    served = link.served_exposes
    if message.id in served or len(served) >= MAX_SERVED_EXPOSES:
        _reply(
            link,
            control.Error(
                "NODE_BUSY",
                f"Node {link.cluster.node_id} runs too many exposes for node {link.peer_node}.",
                message.id,
                503,
            ),
        )
        return
    task = link.loop.create_task(_serve(link, message))
    served[message.id] = task
    task.add_done_callback(lambda t: served.pop(message.id, None))
    everywhere = link.cluster.served_exposes
    everywhere.add(task)
    task.add_done_callback(everywhere.discard)


async def stop_serving(cluster: Cluster, timeout: float) -> None:
    """The node stops: cancel the forwarded exposes it still runs and wait up to ``timeout``
    for them to end, so that none is left pending past the stop (the edge ended its agents'
    sessions before, so one still running waits for something else: the store, or a change
    of the sandbox before it). Their landing nodes see the link close: no verdict, so each
    stores its exposure itself."""
    tasks = list(cluster.served_exposes)
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=timeout)


async def _serve(link: NodeLinkServer, message: control.Expose) -> None:
    sandbox_id = message.sandbox
    assert sandbox_id is not None
    server = link.cluster.server
    state = server.registry.get(sandbox_id)
    session = state.session if state is not None else None
    reply: control.Ok | control.Error
    if session is None or not session.can_open_streams():
        reply = control.Error(
            "SANDBOX_NOT_CONNECTED",
            f"Sandbox {sandbox_id} is not connected to node {link.cluster.node_id}.",
            message.id,
            503,
        )
    else:
        try:
            options = validate_exposure_options(
                message.protocol, message.proxy_protocol, message.inspect
            )
            exposure = await server.expose(
                sandbox_id, message.port, message.name, message.token, options, forward=False
            )
        except ValidationError as exc:  # RegistryError too: the admin API's answers
            reply = control.Error(exc.code, exc.message[:4096], message.id, exc.status)
        except Exception:  # a bug: the landing node still gets an answer
            log.exception("forwarded expose from %s failed", link.peer_node)
            reply = control.Error(
                "INTERNAL_ERROR", "Internal error; see the tunneld log.", message.id, 500
            )
        else:
            reply = control.Ok(message.id, (_with_public_port(link, sandbox_id, exposure),))
    _reply(link, reply)


def _with_public_port(
    link: NodeLinkServer, sandbox_id: str, exposure: control.Exposure
) -> control.Exposure:
    """``exposure`` with the public TCP port its record has, for a dialer that reads it (the
    landing node answers with it while its view has not caught up: ``publicPort``)."""
    from .nodelink import PUBLIC_PORT_LINK_VERSION

    if link.peer_version < PUBLIC_PORT_LINK_VERSION:
        return exposure  # a node from before this: it would take the field for an error
    state = link.cluster.server.registry.get(sandbox_id)
    record = state.exposures.get(exposure.port) if state is not None else None
    if record is None or record.public_port is None:
        return exposure
    return dataclasses.replace(exposure, public_port=record.public_port)


def _reply(link: NodeLinkServer, reply: control.Ok | control.Error) -> None:
    if not link.session.closed:
        with contextlib.suppress(LocalProtocolError):
            link.session.send_control(reply)
            link.flush()


def expose_message(
    port: int, name: str | None, token: str | None, options: ExposureOptions
) -> control.Expose:
    """The request a landing node forwards (its ``id`` and ``sandbox`` are set when sent)."""
    return control.Expose(
        0, port, name, token, options.protocol, options.proxy_protocol, options.inspect
    )
