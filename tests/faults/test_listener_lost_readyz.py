"""A listener that stops listening makes ``/readyz`` answer 503, naming it, with one ERROR line.

No ``accept`` error loses a listener on either loop today (test_listener_accept_errors.py), but
uvloop closes a listening socket without a log line if libuv ever hands it one, and then the
process and ``/healthz`` look fine while new clients are refused. ``/readyz`` checks that every
listener's sockets still listen (``SO_ACCEPTCONN``), so a load balancer or orchestrator takes
the node out and the log says which listener is gone. docs/operations.md, File descriptors.

A real ``tunneld serve`` per loop under the ``LD_PRELOAD`` shim of
test_listener_accept_errors.py, in its mode that shuts the public listener down for reading
at its next ``accept`` (the socket stays open but no longer listens, and refuses connections
as a closed one would). Such a listener is readable for ever: uvloop (libuv) retries its
``accept`` silently; asyncio's accept loop logged a traceback per attempt (about 2,500 in
2.5 s), and ``relay.accept.guard_accept`` now stops accepting on it with the one ERROR.
"""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from tests.e2e.procs import wait_for
from tests.faults.test_listener_accept_errors import shimmed_edge


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except (ConnectionRefusedError, ConnectionResetError):  # reset: met the shutdown
        return True
    return False


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_listener_that_stops_listening_makes_readyz_503(tmp_path: Path, loop: str) -> None:
    procs, trigger = shimmed_edge(tmp_path, loop)
    try:
        ports = procs.ports
        admin = f"http://127.0.0.1:{ports['admin']}"
        assert httpx.get(f"{admin}/readyz", timeout=10).status_code == 200
        trigger.write_text(f"{ports['public']} 1 -1\n")
        _refused(ports["public"])  # a client: the accept that shuts the listener down
        wait_for(lambda: not trigger.exists(), what="the shim to shut the listener down")
        wait_for(lambda: _refused(ports["public"]), what="the public listener to refuse")
        ready = httpx.get(f"{admin}/readyz", timeout=10)
        assert ready.status_code == 503
        assert ready.json() == {
            "status": "not ready",
            "reasons": ["listener lost: the public listener no longer listens"],
        }
        assert httpx.get(f"{admin}/healthz", timeout=10).status_code == 200  # liveness: alive
        assert httpx.get(f"{admin}/readyz", timeout=10).status_code == 503  # and stays so
        assert procs.edge is not None
        errors = [line for line in procs.output(procs.edge).splitlines() if " ERROR " in line]
        assert len(errors) == 1, errors  # once, not per probe nor per attempt
        if loop == "uvloop":  # seen by /readyz
            assert "public listener is no longer listening" in errors[0]
        else:  # seen by guard_accept, at the accept that failed (EINVAL)
            assert (
                f"listener 127.0.0.1:{ports['public']} (Invalid argument) is no longer" in errors[0]
            )
        assert "Traceback" not in procs.output(procs.edge)
    finally:
        procs.close()
