"""Bound: the local connections ``tunneld port-forward`` carries at once (tunneld/portforward.py).

Anyone on the machine can connect to the port-forward's 127.0.0.1 listener, and each connection
costs it two descriptors (the local socket and its admin connection to tunneld). Without a bound,
a flood of local connections ran the process out of descriptors, and the failed ``accept`` ended
the whole command with a traceback, cutting every connection it carried. Now at most
``connection_limit()`` are carried (fewer than ``MAX_CONNECTIONS`` under a low ``RLIMIT_NOFILE``);
one past it is reset at once, the warnings about that are rate-limited, and the command goes on.

Real processes: tunneld, tunnel-agent and ``tunneld port-forward`` under ``prlimit --nofile=64``
(room for 16 connections), with tests/e2e/tcpserver.py's holding service in the sandbox.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time

from relay.budget import LOG_BURST, LOG_RATE
from tests.e2e.procs import BIN, Processes, is_connected, wait_for
from tests.e2e.tcpserver import HashServer

IO_TIMEOUT = 15.0
NOFILE = 64


def _start_port_forward(procs: Processes, port: int) -> tuple[subprocess.Popen[bytes], int, int]:
    environ = procs.env(
        TUNNELD_ADMIN_URL=f"http://127.0.0.1:{procs.ports['admin']}",
        TUNNELD_ADMIN_TOKEN=procs.admin_token,
    )
    prlimit = shutil.which("prlimit")
    assert prlimit is not None, "prlimit (util-linux) is needed"
    argv = [prlimit, f"--nofile={NOFILE}:{NOFILE}", "--", str(BIN / "tunneld")]
    proc = procs._spawn("port-forward", [*argv, "port-forward", "sb1", str(port)], environ)

    def listening() -> tuple[int, int] | None:
        match = re.search(
            r"listening on 127\.0\.0\.1:(\d+) .* \(at most (\d+) connections at once\)",
            procs.output(proc),
        )
        if match is None and proc.poll() is not None:
            raise AssertionError(f"port-forward exited: {procs.output(proc)}")
        return (int(match.group(1)), int(match.group(2))) if match else None

    local, limit = wait_for(listening, what="port-forward's listening line")
    return proc, local, limit


def _held(local: int) -> socket.socket:
    """A local connection carried to the sandbox's service, which keeps it open."""
    conn = socket.create_connection(("127.0.0.1", local), timeout=IO_TIMEOUT)
    conn.sendall(b"hold 1\n")
    assert conn.recv(1), "the service's byte: the connection is carried"
    return conn


def _connect(local: int) -> socket.socket | None:
    """A local connection held open; None when it was reset before ``connect`` returned."""
    try:
        return socket.create_connection(("127.0.0.1", local), timeout=IO_TIMEOUT)
    except ConnectionResetError:
        return None


def _is_reset(conn: socket.socket | None) -> bool:
    """Whether the port-forward reset ``conn`` instead of carrying it."""
    if conn is None:
        return True
    try:
        conn.sendall(b"hold 1\n")
        conn.recv(1)  # a byte: carried; a timeout: neither carried nor refused
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def test_a_local_connection_flood_is_refused_past_the_limit_and_the_command_goes_on(
    procs: Processes, hash_server: HashServer
) -> None:
    procs.start_edge()
    procs.start_agent("sb1")
    wait_for(lambda: is_connected(procs, "sb1"), what="the agent's session")
    forward, local, limit = _start_port_forward(procs, hash_server.port)
    assert limit == (NOFILE - 32) // 2  # the descriptor limit, not MAX_CONNECTIONS, bounds it
    held = [_held(local) for _ in range(limit)]
    flood: list[socket.socket | None] = []
    try:
        started = time.monotonic()
        flood = [_connect(local) for _ in range(3 * limit)]  # all open at once
        resets = sum(_is_reset(conn) for conn in flood)
        elapsed = time.monotonic() - started
        assert resets == len(flood), procs.output(forward)
        assert forward.poll() is None, procs.output(forward)  # still running
        for conn in held:  # the carried ones were not cut by the flood
            conn.sendall(b"x")
    finally:
        for conn in [*held, *flood]:
            if conn is not None:
                conn.close()
    # once they are gone, a new connection is carried again
    wait_for(
        lambda: procs.output(forward).count(": closed (") == limit or None,
        what="the held connections to close",
    )
    again = _held(local)
    again.close()
    output = procs.output(forward)
    assert "Traceback" not in output, output
    refusals = output.count("carried already, the limit")
    most = LOG_BURST + 1 + int(elapsed * LOG_RATE)  # a burst, then one a second
    assert 1 <= refusals <= most, output
    if most < len(flood):
        assert "too many warnings about refused local connections" in output, output


def test_the_limit_is_the_admin_apis_own() -> None:
    """256 (docs/operations.md, Port-forward): more could only be refused by tunneld."""
    from tunneld.config import ADMIN_MAX_CONNECTIONS
    from tunneld.portforward import MAX_CONNECTIONS

    assert MAX_CONNECTIONS == ADMIN_MAX_CONNECTIONS == 256
