"""Bound: warnings about hand-over connections from other users are rate-limited
(tunneld/handover.py ``_REFUSED_LOG``).

A node's hand-over socket is an abstract Unix socket: no file permissions guard it, and its name
is in the node's Redis record and in /proc/net/unix, so any local user can connect to it. The node
checks the peer's uid (``SO_PEERCRED``) and closes a connection from another user at once; each
refusal was a warning of its own, so a local user could write the edge's log at will. Now: a
burst of 10, then one a second, the rest counted.

The test connects from this process and makes the node believe it runs as another user (its
module's ``os.getuid`` answers another uid), so the refusal path runs on real connections without
needing a second user.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import types

import pytest

import tunneld.handover
from relay.budget import LOG_BURST, LOG_RATE
from tests.cluster.nodes import Cluster

pytestmark = pytest.mark.anyio

CONNECTIONS = 120
BATCH = 20  # below the socket's listen backlog (64)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class _OtherUser(types.ModuleType):
    """``os`` as the hand-over module sees it, running as a user other than the test's."""

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)

    @staticmethod
    def getuid() -> int:
        return os.getuid() + 1


async def _refused(loop: asyncio.AbstractEventLoop, address: str) -> bool:
    """Connect to the hand-over socket; True when the node closes it at once."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, address), 10)
        return await asyncio.wait_for(loop.sock_recv(sock, 16), 10) == b""
    except ConnectionError:
        return True
    finally:
        sock.close()


async def test_connections_from_another_user_are_refused_and_logged_boundedly(
    nodes: Cluster, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, "tunneld.cluster")
    node = await nodes.node("edge-a", handover=True)
    handover = node.edge.handover
    assert handover is not None
    monkeypatch.setattr(tunneld.handover, "os", _OtherUser("os"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    refused: list[bool] = []
    for _ in range(CONNECTIONS // BATCH):
        refused += await asyncio.gather(*(_refused(loop, handover.address) for _ in range(BATCH)))
    elapsed = loop.time() - started
    assert all(refused), f"{refused.count(False)} connections were kept"
    lines = [r for r in caplog.records if "refused a connection from uid" in r.getMessage()]
    assert lines, "no refusal was logged"
    assert len(lines) <= LOG_BURST + LOG_RATE * elapsed + 1, (len(lines), elapsed)
    assert any("not logged one by one" in r.getMessage() for r in caplog.records)
