"""A listener that stops listening makes ``/readyz`` answer 503, naming it, with one ERROR line.

No ``accept`` error loses a listener on either loop today (test_listener_accept_errors.py), but
uvloop closes a listening socket without a log line if libuv ever hands it one, and then the
process and ``/healthz`` look fine while new clients are refused. ``/readyz`` checks that every
listener's sockets still listen (``SO_ACCEPTCONN``), so a load balancer or orchestrator takes
the node out and the log says which listener is gone. docs/operations.md, File descriptors.

``/readyz`` names a lost listener by the name the edge opened it under
(``EdgeServer.listeners``), whichever listeners it has:
``test_readyz_names_the_lost_listener_with_and_without_the_redirect`` loses the agent
listener of an edge without and of one with the HTTP-to-HTTPS redirect listener, then that one.

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
import trustme

from tests.e2e.procs import Processes, wait_for
from tests.faults.test_listener_accept_errors import build_shim, shimmed_edge


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


def _lose(trigger: Path, port: int) -> None:
    """Make the listener on ``port`` stop listening at its next accept, and wait till it has."""
    trigger.write_text(f"{port} 1 -1\n")
    _refused(port)  # a client: the accept that shuts the listener down
    wait_for(lambda: not trigger.exists(), what=f"the shim to shut listener {port} down")
    wait_for(lambda: _refused(port), what=f"listener {port} to refuse")


def _reasons(admin: str) -> list[str]:
    ready = httpx.get(f"{admin}/readyz", timeout=10)
    assert ready.status_code == 503, ready.text
    reasons: list[str] = ready.json()["reasons"]
    return reasons


@pytest.mark.parametrize("redirect", [False, True], ids=["no-redirect", "redirect"])
def test_readyz_names_the_lost_listener_with_and_without_the_redirect(
    tmp_path: Path, redirect: bool
) -> None:
    """/readyz once zipped fixed names with the edge's listeners by position: right only while
    the edge opened exactly those, in that order. Now each listener is kept with its name."""
    shim = build_shim(tmp_path)
    args = ["--public-host", "127.0.0.1"]
    if redirect:
        issued = trustme.CA().issue_cert("*.localhost", "localhost")
        issued.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
        issued.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
        with socket.create_server(("127.0.0.1", 0)) as probe:
            free = probe.getsockname()[1]  # free a moment ago
        args += ["--public-tls-cert", str(tmp_path / "cert.pem")]
        args += ["--public-tls-key", str(tmp_path / "key.pem")]
        args += ["--public-redirect-port", str(free)]
    procs = Processes(tmp_path, "uvloop")
    trigger = tmp_path / "fail-accepts"
    env = procs.env(
        TUNNELD_ADMIN_TOKEN=procs.admin_token,
        TUNNELD_SECRET=procs.secret,
        LD_PRELOAD=str(shim),
        ACCEPT_FAIL_FILE=str(trigger),
    )
    try:
        ports = procs.start_edge(*args, env=env)
        assert ("redirect" in ports) is redirect, ports
        admin = f"http://127.0.0.1:{ports['admin']}"
        assert httpx.get(f"{admin}/readyz", timeout=10).status_code == 200
        _lose(trigger, ports["agent"])
        assert _reasons(admin) == ["listener lost: the agent listener no longer listens"]
        if redirect:
            _lose(trigger, ports["redirect"])
            assert _reasons(admin) == [
                "listener lost: the agent listener no longer listens",
                "listener lost: the HTTP-to-HTTPS redirect listener no longer listens",
            ]
        assert httpx.get(f"{admin}/healthz", timeout=10).status_code == 200
        assert procs.edge is not None
        assert "Traceback" not in procs.output(procs.edge)
    finally:
        procs.close()
