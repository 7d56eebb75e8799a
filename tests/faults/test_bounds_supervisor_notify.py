"""Bound: the work one flood of sd_notify datagrams makes the ``--workers`` supervisor do per turn
of its loop (tunneld/supervisor.py ``MAX_NOTIFICATIONS_PER_WAKEUP``).

The supervisor's notification socket is in the abstract namespace, which has no permissions:
any process on the host can send to it (the name is in /proc/net/unix). ``_on_notify`` used to
read until the socket was empty, so a sender that kept it full kept the supervisor's loop in
that callback: SIGCHLD (worker restarts), SIGTERM and the watchdog waited. Now a wake-up reads
a bounded number, and the level-triggered reader reads the rest at the next turn, after
everything else that was due.

Real datagram sockets: the supervisor's own (``systemd.open_notify_socket``) and a sender that
fills its queue as far as the kernel lets it (``net.unix.max_dgram_qlen``).
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from tunneld import systemd
from tunneld.config import Config
from tunneld.supervisor import MAX_NOTIFICATIONS_PER_WAKEUP, Supervisor

pytestmark = pytest.mark.anyio

MOST_QUEUED = 1000  # the kernel's queue is far shorter; this only bounds the loop


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _fill(address: str) -> tuple[socket.socket, int]:
    """A stranger's socket and how many datagrams it got queued before the queue was full."""
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.connect("\0" + address.removeprefix("@"))
    sender.setblocking(False)
    queued = 0
    while queued < MOST_QUEUED:
        try:
            sender.send(b"READY=1\nSTATUS=flood")
        except BlockingIOError:
            break
        queued += 1
    return sender, queued


def _pending(sock: socket.socket) -> int:
    count = 0
    while count < MOST_QUEUED and systemd.receive_notification(sock) is not None:
        count += 1
    return count


async def test_one_wakeup_reads_a_bounded_number_of_notifications() -> None:
    supervisor = Supervisor(Config(admin_token="a", secret="s", workers=2), None, None, {})
    supervisor._loop = asyncio.get_running_loop()
    notify, address = systemd.open_notify_socket()
    supervisor._notify = notify
    sender, queued = _fill(address)
    try:
        assert MAX_NOTIFICATIONS_PER_WAKEUP == 8  # docs/operations.md, --workers
        assert queued > MAX_NOTIFICATIONS_PER_WAKEUP, f"the kernel queued only {queued}"
        supervisor._on_notify()  # one wake-up
        assert _pending(notify) == queued - MAX_NOTIFICATIONS_PER_WAKEUP
        assert not any(w.ready for w in supervisor.workers)  # strangers are not workers
    finally:
        sender.close()
        notify.close()
