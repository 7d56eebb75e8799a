"""Bounds of a node's hand-over socket against a local process of the same user
(tunneld/handover.py ``MAX_HANDOVER_CONNECTIONS``, ``IDENTIFY_TIMEOUT``, ``_MAX_MESSAGE``,
``_BATCH``).

``SO_PEERCRED`` lets in any process of the service's user, and such a process is not trusted to be
a node (a compromised one): it must not be able to hold the node's descriptors without end, keep
connections that never hand anything over, or leave descriptors behind in the node by sending them
with messages the node refuses. The node's real ``HandoverServer`` is driven over real Unix
sockets, in this process; which descriptors the node still holds is read from ``/proc/self/fd``
(how many entries point at the pipe or socket the test sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import Any

import orjson
import pytest

import tunneld.handover
from relay.budget import LOG_BURST, LOG_RATE, RateLimitedLog
from tunneld.handover import _ANSWER, _BATCH, _MAX_MESSAGE, MAX_HANDOVER_CONNECTIONS

from .nodes import Cluster, Node, wait_for

pytestmark = pytest.mark.anyio

BACKLOG_BATCH = 32  # connections opened before waiting for the node to accept them (backlog 64)
EXTRA = 40  # connections past the cap


@pytest.fixture
def peer_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh budget for the warnings (the module's is shared by every test of the run)."""
    fresh = RateLimitedLog(
        tunneld.handover.log, "warnings about refused hand-over connections and messages"
    )
    monkeypatch.setattr(tunneld.handover, "_PEER_LOG", fresh)


async def _node(cluster: Cluster) -> tuple[Node, Any]:
    node = await cluster.node("edge-a", handover=True)
    handover = node.edge.handover
    assert handover is not None
    return node, handover


def _links(fd: int) -> int:
    """How many descriptors of this process refer to the pipe or socket behind ``fd``."""
    target = os.readlink(f"/proc/self/fd/{fd}")
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, or one closed since
            count += os.readlink(f"/proc/self/fd/{name}") == target
    return count


def _message(entries: object, preludes: bytes = b"") -> bytes:
    head = orjson.dumps(entries)
    return len(head).to_bytes(2, "big") + head + preludes


def _entry(request_id: int, sandbox: str = "sb1", n: int = 0) -> dict[str, Any]:
    return {"sandbox": sandbox, "port": 8000, "epoch": None, "id": request_id, "n": n}


def _connect(address: str) -> socket.socket:
    """A connection to the hand-over socket (the node accepts it when the loop runs: callers keep
    fewer than its backlog, 64, waiting; a full backlog would fail the connect after 5 s)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(5)
    sock.connect(address)
    sock.setblocking(False)
    return sock


async def _send(sock: socket.socket, message: bytes, fds: list[int]) -> None:
    socket.send_fds(sock, [message], fds)  # the node reads them all before the next


async def _recv(sock: socket.socket) -> bytes:
    """The node's next message on ``sock``; b"" once the node closed it (10 s at most)."""
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
    except ConnectionResetError:
        return b""


async def _closed_by_node(sock: socket.socket) -> bool:
    """True when the node ends the connection; False if it is still open after 10 s."""
    try:
        while await _recv(sock):  # answers before the end are read past
            pass
    except TimeoutError:
        return False
    return True


def _refusals(ids: list[int]) -> bytes:
    return b"".join(_ANSWER.pack(request_id, False) for request_id in ids)


async def test_hand_over_connections_past_the_cap_are_closed_at_once_and_warned_in_bounds(
    cluster: Cluster,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    peer_log: None,
) -> None:
    caplog.set_level(logging.WARNING, "tunneld.cluster")
    monkeypatch.setattr(tunneld.handover, "IDENTIFY_TIMEOUT", 600.0)  # only the cap closes here
    _node_a, handover = await _node(cluster)
    held: list[socket.socket] = []
    extra: list[socket.socket] = []
    try:
        while len(held) < MAX_HANDOVER_CONNECTIONS:
            for _ in range(min(BACKLOG_BATCH, MAX_HANDOVER_CONNECTIONS - len(held))):
                held.append(_connect(handover.address))
            await wait_for(lambda: len(handover._accepted) == len(held), what="the accepts")
        loop = asyncio.get_running_loop()
        started = loop.time()
        extra = [_connect(handover.address) for _ in range(EXTRA)]
        closed = await asyncio.gather(*(_closed_by_node(sock) for sock in extra))
        elapsed = loop.time() - started
        assert all(closed), f"{closed.count(False)} connections past the cap were kept"
        assert len(handover._accepted) == MAX_HANDOVER_CONNECTIONS
        lines = [r for r in caplog.records if "MAX_HANDOVER_CONNECTIONS" in r.getMessage()]
        assert lines, "no refusal was logged"
        assert len(lines) <= LOG_BURST + LOG_RATE * elapsed + 1, (len(lines), elapsed)
        # the cap counts connections open now: once those held end, a new one is served
        for sock in held:
            sock.close()
        held.clear()
        await wait_for(lambda: not handover._accepted, what="the node to see them end")
        with _connect(handover.address) as sock:
            await _send(sock, _message([_entry(7, sandbox="nobody")]), [])
            assert await _recv(sock) == _refusals([7])  # a descriptor short: refused, answered
    finally:
        for sock in held + extra:
            sock.close()


async def test_a_connection_that_sends_no_well_formed_hand_over_is_closed_after_the_deadline(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, peer_log: None
) -> None:
    monkeypatch.setattr(tunneld.handover, "IDENTIFY_TIMEOUT", 1.0)
    _node_a, handover = await _node(cluster)
    r_fd, w_fd = os.pipe()
    # A node: its first message is well-formed (refused: it owns nothing here), which ends its
    # deadline; it is accepted first, so its deadline would have passed before the others'
    node_like = _connect(handover.address)
    silent: socket.socket | None = None
    garbage: socket.socket | None = None
    try:
        await _send(node_like, _message([_entry(1, sandbox="nobody")]), [r_fd])
        assert await _recv(node_like) == _refusals([1])
        silent = _connect(handover.address)
        garbage = _connect(handover.address)
        await _send(garbage, b"\x00\x05{bad}", [r_fd])
        assert await _recv(garbage) == _ANSWER.pack(0, False)
        assert await _closed_by_node(silent), "a connection that sent nothing was kept"
        assert await _closed_by_node(garbage), "a connection that sent only garbage was kept"
        await wait_for(lambda: len(handover._accepted) == 1, what="the node to drop them")
        await _send(node_like, _message([_entry(2, sandbox="nobody")]), [r_fd])
        assert await _recv(node_like) == _refusals([2])  # the node's connection still serves
        assert _links(r_fd) == 2  # the test's own two ends: nothing sent was kept
    finally:
        for sock in (node_like, silent, garbage):
            if sock is not None:
                sock.close()
        os.close(r_fd)
        os.close(w_fd)


async def test_a_message_over_the_size_bound_ends_the_connection_and_its_descriptors_are_closed(
    cluster: Cluster, peer_log: None
) -> None:
    _node_a, handover = await _node(cluster)
    r_fd, w_fd = os.pipe()
    prelude = b"x" * (_MAX_MESSAGE + 1000)  # all of it announced: only the size is wrong
    try:
        with _connect(handover.address) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * _MAX_MESSAGE)
            await _send(sock, _message([_entry(1, n=len(prelude))], prelude), [r_fd] * 3)
            assert await _recv(sock) == _refusals([1])
            assert await _closed_by_node(sock), "a message over the bound left it open"
        assert _links(r_fd) == 2, "descriptors of the cut message were kept"
        assert handover.received == 0
    finally:
        os.close(r_fd)
        os.close(w_fd)


async def test_more_hand_overs_than_a_message_may_list_end_the_connection(
    cluster: Cluster, peer_log: None
) -> None:
    _node_a, handover = await _node(cluster)
    r_fd, w_fd = os.pipe()
    ids = list(range(1, _BATCH + 2))
    try:
        with _connect(handover.address) as sock:
            await _send(sock, _message([_entry(i, sandbox="nobody") for i in ids]), [r_fd] * 4)
            assert await _recv(sock) == _ANSWER.pack(0, False)
            assert await _closed_by_node(sock), f"{len(ids)} hand-overs in one message were read"
        assert _links(r_fd) == 2
    finally:
        os.close(r_fd)
        os.close(w_fd)


async def test_more_descriptors_than_a_message_may_carry_end_it_and_none_is_adopted(
    cluster: Cluster, peer_log: None
) -> None:
    """The node reads room for ``_BATCH`` descriptors; the kernel drops the rest (MSG_CTRUNC).
    A message whose descriptors were cut is not the message that was sent: none of the sockets
    it carried is adopted (even with a header for as many), all are closed, and the connection
    ends."""
    node_a, handover = await _node(cluster)
    await cluster.agent(node_a, "sb1")  # node A owns sb1: it would adopt sockets for it
    listener = socket.create_server(("127.0.0.1", 0))
    pairs: list[tuple[socket.socket, socket.socket]] = []
    try:
        for _ in range(1 + _BATCH + 1):  # the control's, then one more than a message may carry
            client = socket.create_connection(listener.getsockname()[:2], timeout=10)
            accepted, _ = listener.accept()
            pairs.append((client, accepted))
        fds = [accepted.fileno() for _client, accepted in pairs]
        with _connect(handover.address) as sock:
            # first the control: one socket in a well-formed message is adopted
            await _send(sock, _message([_entry(1)]), fds[:1])
            assert await _recv(sock) == _ANSWER.pack(1, True)
            assert handover.received == 1
            ids = list(range(2, _BATCH + 2))  # one entry per descriptor that fits
            await _send(sock, _message([_entry(i) for i in ids]), fds[1:])  # one more
            assert await _recv(sock) == _refusals(ids)
            assert await _closed_by_node(sock), "a message with its descriptors cut was read"
        assert handover.received == 1, "a socket of a message with its descriptors cut was adopted"
        assert [_links(fd) for fd in fds[1:]] == [1] * (_BATCH + 1), "received ones were kept"
    finally:
        listener.close()
        for client, accepted in pairs:
            client.close()
            accepted.close()


async def test_descriptors_of_refused_and_malformed_messages_are_closed(
    cluster: Cluster, peer_log: None
) -> None:
    node_a, handover = await _node(cluster)
    await cluster.agent(node_a, "sb1")
    r_fd, w_fd = os.pipe()
    three = [r_fd] * 3
    cases: list[tuple[str, bytes, list[int], bytes]] = [
        ("a truncated header", b"\x00", three, _ANSWER.pack(0, False)),
        ("not JSON", b"\x00\x05{bad}", three, _ANSWER.pack(0, False)),
        ("not a list", _message({"id": 1}), three, _ANSWER.pack(0, False)),
        ("no hand-over in it", _message([]), three, _ANSWER.pack(0, False)),
        ("an id out of range", _message([_entry(0)]), three, _ANSWER.pack(0, False)),
        ("a descriptor short", _message([_entry(1), _entry(2)]), [r_fd], _refusals([1, 2])),
        ("a descriptor more", _message([_entry(3)]), [r_fd, r_fd], _refusals([3])),
        ("not a socket", _message([_entry(4)]), [r_fd], _refusals([4])),
        ("a sandbox not served here", _message([_entry(5, "nobody")]), [r_fd], _refusals([5])),
        ("bytes missing", _message([_entry(6, n=10)], b"abc"), [r_fd], _refusals([6])),
        ("bytes not announced", _message([_entry(7, n=1)], b"abc"), [r_fd], _refusals([7])),
        (
            "a sandbox id not a string",
            _message([{**_entry(8), "sandbox": ["sb1"]}, _entry(9)]),
            [r_fd, r_fd],
            _refusals([8, 9]),
        ),
        ("no prelude length", _message([{"sandbox": "sb1", "id": 10}]), [r_fd], _refusals([10])),
    ]
    try:
        with _connect(handover.address) as sock:
            for what, message, fds, answer in cases:
                await _send(sock, message, fds)
                assert await _recv(sock) == answer, what
                assert _links(r_fd) == 2, f"{what}: the descriptors it carried were kept"
            # refused, not ended: these fit the format's bounds (a node with a bug is answered)
            await _send(sock, _message([_entry(11, "nobody")]), [r_fd])
            assert await _recv(sock) == _refusals([11])
        assert handover.received == 0
    finally:
        os.close(r_fd)
        os.close(w_fd)
