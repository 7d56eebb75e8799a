"""A SIGTERM'd tunneld exits within its grace period whatever its clients do (systemd's
``TimeoutStopSec`` must not be what stops it), on both event loops.

Clients that would hold the stop on Python 3.12+ with asyncio's loop, whose
``Server.wait_closed`` waits for every connection of its server (3.11's and uvloop's return at
once): an admin API client keeping its connection open between requests (the admin API's idle
timeout is 60 s) and a client that opened a TLS connection to the HTTPS listener but never sent
its ClientHello (its bound, ``head_timeout``, is 300 s here). The process must exit 0 a little
after its grace period (1 s); the bound below is a hang detector, not a measure of speed
(test_stop_closing_clients.py has the in-process cases).
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Final

import pytest

from tests.e2e.procs import Processes
from tests.faults.conftest import tls_files

# Far above the grace period plus what the stop adds after it; far below the 60 s and 300 s the
# clients would hold it otherwise.
EXIT_BOUND: Final = 30.0


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_sigterm_exits_within_its_grace_whatever_the_clients_hold(
    tmp_path: Path, loop: str
) -> None:
    procs = Processes(tmp_path, loop)
    sockets: list[socket.socket] = []
    try:
        _ca, cert, key = tls_files(tmp_path, "*.preview.test")
        ports = procs.start_edge(
            "--domain",
            "preview.test",
            "--public-tls-cert",
            cert,
            "--public-tls-key",
            key,
            "--grace-period",
            "1",
            env=procs.env(
                TUNNELD_ADMIN_TOKEN=procs.admin_token,
                TUNNELD_SECRET=procs.secret,
                TUNNELD_HEAD_TIMEOUT="300",
            ),
        )
        admin = socket.create_connection(("127.0.0.1", ports["admin"]), timeout=10)
        sockets.append(admin)
        admin.sendall(
            b"GET /v1/sandboxes HTTP/1.1\r\nHost: admin\r\n"
            b"Authorization: Bearer " + procs.admin_token.encode() + b"\r\n\r\n"
        )
        assert admin.recv(65536).startswith(b"HTTP/1.1 200 ")  # and the connection stays open
        sockets.append(socket.create_connection(("127.0.0.1", ports["public"]), timeout=10))
        edge = procs.edge
        assert edge is not None
        try:
            status = procs.stop(edge, timeout=EXIT_BOUND)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"tunneld (grace 1 s) still ran {EXIT_BOUND} s after SIGTERM:\n"
                + procs.output(edge)[-3000:]
            ) from None
        assert status == 0, procs.output(edge)[-3000:]
        assert "stopped" in procs.output(edge)
        try:
            assert admin.recv(65536) == b""  # the admin connection was closed
        except ConnectionResetError:
            pass
    finally:
        for sock in sockets:
            sock.close()
        procs.close()
