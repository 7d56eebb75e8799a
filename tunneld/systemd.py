"""sd_notify without libsystemd: READY=1, WATCHDOG=1, STOPPING=1 over ``$NOTIFY_SOCKET``.

Both ends of it. :func:`notify` is what every tunneld process sends. The receiving end
(:func:`open_notify_socket`, :func:`receive_notification`) is what the supervisor of
``tunneld serve --workers N`` plays for its workers, the way systemd does it: an ``AF_UNIX``
datagram socket with ``SO_PASSCRED``, so the kernel stamps every message with the sender's pid
and a message from anyone but a worker is recognised as such.
"""

from __future__ import annotations

import os
import secrets
import socket
import struct
from typing import Final

# struct ucred {pid_t pid; uid_t uid; gid_t gid;}: what SCM_CREDENTIALS carries.
_UCRED: Final = struct.Struct("iII")
# A notification is a few short KEY=VALUE lines; systemd itself reads at most a page or so.
MAX_NOTIFICATION: Final = 4096


def _address(value: str) -> str:
    return "\0" + value[1:] if value.startswith("@") else value  # @: abstract namespace


def notify(state: str) -> bool:
    """Send ``state`` to systemd; False when not run under systemd (no NOTIFY_SOCKET)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(_address(address))
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def watchdog_usec() -> int | None:
    """``$WATCHDOG_USEC`` when it is meant for this process (``$WATCHDOG_PID`` unset or ours)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value if value > 0 else None


def watchdog_interval() -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds (ping twice per period), or None."""
    usec = watchdog_usec()
    return None if usec is None else usec / 2_000_000


def open_notify_socket() -> tuple[socket.socket, str]:
    """A non-blocking datagram socket to receive notifications on, and the ``NOTIFY_SOCKET``
    value naming it (an abstract address: nothing to clean up on disk)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        name = f"tunneld-notify-{os.getpid()}-{secrets.token_hex(8)}"
        sock.bind("\0" + name)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock, "@" + name


def receive_notification(sock: socket.socket) -> tuple[int, dict[str, str]] | None:
    """One pending message as (sender pid, its KEY=VALUE fields); None when none is pending.

    The pid is the kernel's (``SCM_CREDENTIALS``), not the sender's word: 0 if it is missing.
    """
    try:
        data, ancdata, _flags, _addr = sock.recvmsg(
            MAX_NOTIFICATION, socket.CMSG_SPACE(_UCRED.size)
        )
    except (BlockingIOError, InterruptedError):
        return None
    pid = 0
    for level, kind, payload in ancdata:
        if (
            level == socket.SOL_SOCKET
            and kind == socket.SCM_CREDENTIALS
            and len(payload) >= _UCRED.size
        ):
            pid = _UCRED.unpack_from(payload)[0]
    fields: dict[str, str] = {}
    for line in data.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return pid, fields
