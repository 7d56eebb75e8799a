"""A ``"protocol":"tcp"`` expose the registry's rules refuse (``max_sandboxes``,
``max_exposures_per_sandbox``, a token in use) never binds nor claims a public TCP port: the
rules are checked first, under the sandbox's lock, and only then is a port of
``public_tcp_ports`` bound (``TcpExposures.commit_expose`` hands ``Registry.commit_expose`` the
allocation to run after them).

A real edge on 127.0.0.1 over real HTTP, with a range of one port. Two ways to see that no port
is bound: while another socket listens on that port, the refusal is the rule's 409 (had the edge
tried the port first, the answer would be 503 ``TCP_PORTS_EXHAUSTED``); and with the port free,
``TcpExposures._listen`` (where every public TCP listener is opened) is not called for the
refusal, while it is for the same expose once the rule lets it through.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.e2e.conftest import (  # the e2e suite's fixtures: both loops, no unhandled errors
    Stack,
    anyio_backend,
    no_unhandled_errors,
)

__all__ = ["anyio_backend", "no_unhandled_errors"]

# rule -> (edge settings, the exposure that fills it, the tcp expose it refuses, its code)
Exposure = tuple[str, dict[str, Any]]
CASES: dict[str, tuple[dict[str, Any], Exposure, Exposure, str]] = {
    "max_sandboxes": (
        {"max_sandboxes": 1},
        ("sb1", {"port": 8000}),
        ("sb2", {"port": 8001, "protocol": "tcp"}),
        "TOO_MANY_SANDBOXES",
    ),
    "max_exposures_per_sandbox": (
        {"max_exposures_per_sandbox": 1},
        ("sb1", {"port": 8000}),
        ("sb1", {"port": 8001, "protocol": "tcp"}),
        "TOO_MANY_EXPOSURES",
    ),
    "token_in_use": (
        {},
        ("sb1", {"port": 8000, "token": "t1"}),
        ("sb1", {"port": 8001, "protocol": "tcp", "token": "t1"}),
        "TOKEN_IN_USE",
    ),
}  # fmt: skip


@contextmanager
def listening_port() -> Iterator[socket.socket]:
    """A socket listening on a free port of 127.0.0.1 (closed at the end)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock
    finally:
        sock.close()


@pytest.mark.anyio
@pytest.mark.parametrize("rule", sorted(CASES))
async def test_a_refused_tcp_expose_binds_no_public_port(rule: str) -> None:
    settings, (holder, held), (sandbox, body), code = CASES[rule]
    with listening_port() as other:
        public_port = other.getsockname()[1]
        stack = await Stack(
            public_host="127.0.0.1", public_tcp_ports=str(public_port), **settings
        ).start()
        try:
            assert stack.edge is not None and stack.admin is not None
            tcp = stack.edge.tcp
            opened: list[int] = []
            listen = tcp._listen

            async def counted(sandbox_id: str, port: int, public: int, *, quiet: bool) -> bool:
                opened.append(public)
                return await listen(sandbox_id, port, public, quiet=quiet)

            tcp._listen = counted  # type: ignore[method-assign,assignment]
            r = await stack.admin.post(f"/v1/sandboxes/{holder}/ports", json=held)
            assert r.status_code == 200, r.text
            url = f"/v1/sandboxes/{sandbox}/ports"

            # the only port of the range is another process's: only a bind attempt would see it
            r = await stack.admin.post(url, json=body)
            assert (r.status_code, r.json()["code"]) == (409, code), r.text
            other.close()
            r = await stack.admin.post(url, json=body)  # the port is free now: still not bound
            assert (r.status_code, r.json()["code"]) == (409, code), r.text
            assert opened == [] and tcp.listeners == {}
            reuse = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                reuse.bind(("127.0.0.1", public_port))  # free for anyone
            finally:
                reuse.close()

            # once the rule lets it through, the same expose binds that very port
            r = await stack.admin.delete(f"/v1/sandboxes/{holder}/ports/{held['port']}")
            assert r.status_code == 204, r.text
            r = await stack.admin.post(url, json=body)
            assert r.status_code == 200, r.text
            assert r.json()["publicPort"] == public_port
            assert opened == [public_port] and set(tcp.listeners) == {public_port}
        finally:
            await stack.close()
