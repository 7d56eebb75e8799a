"""Claims of docs/sdk.md about the Ports calls (expose_port / unexpose_port / get_exposed_ports /
ws_connect, Cloudflare's exposePort / unexposePort / getExposedPorts / wsConnect) and their
errors, checked against a real in-process edge and agent (tests/e2e/conftest.py's Stack) rather
than the scripted admin of tests/sdk/test_client.py; and the SDK's dependencies, from a real
interpreter. Each test names the doc phrase it checks, asserted with it (``claim``), so changing
the doc or the behaviour alone fails here. The doc's runnable examples are
tests/test_doc_claims_sdk_examples.py's; the signatures tests/sdk/test_sdk_claims_signatures.py's;
the error table's classes tests/sdk/test_doc_claims_sdk.py's.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from importlib import metadata
from pathlib import Path

import pytest

from tests.e2e.conftest import Stack
from tests.e2e.conftest import no_unhandled_errors as no_unhandled_errors  # autouse there
from tests.e2e.test_public_tcp import port_range
from tests.test_doc_claims_sdk_examples import _ws_service
from tunneld.client import (
    ExposedPort,
    NotFoundError,
    SandboxNotConnectedError,
    TunnelClient,
    TunnelError,
)

ROOT = Path(__file__).resolve().parent.parent
DOC = " ".join((ROOT / "docs" / "sdk.md").read_text().split())  # lines joined

pytestmark = pytest.mark.anyio


def claim(phrase: str) -> None:
    """The doc still says ``phrase`` (whitespace-normalised, so line breaks do not matter)."""
    assert " ".join(phrase.split()) in DOC, f"docs/sdk.md no longer says {phrase!r}"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the edge under test is asyncio's


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    """An edge with public TCP ports (for a ``tcp`` exposure) and sandbox sb1's agent."""
    s = await Stack(public_tcp_ports=port_range(4)).start()
    try:
        await s.agent("sb1")
        yield s
    finally:
        await s.close()


@pytest.fixture
def service() -> Iterator[int]:
    """A WebSocket echo service on 127.0.0.1 (what the sandbox's port serves)."""
    yield from _ws_service()


def sdk(stack: Stack) -> TunnelClient:
    assert stack.edge is not None
    return TunnelClient(f"http://127.0.0.1:{stack.edge.admin_port}", stack.admin_token)


def _requirements(name: str) -> set[str]:
    """``name``'s own install requirements (any marker but an extra's), as module names."""
    found = set()
    for req in metadata.requires(name) or ():
        spec, _, marker = req.partition(";")
        if "extra ==" not in marker:
            found.add(re.split(r"[\s<>=!~\[(]", spec.strip(), maxsplit=1)[0].replace("-", "_"))
    return found


def test_the_sdk_imports_only_its_four_dependencies(tmp_path: Path) -> None:
    """'Its only dependencies are h11, wsproto, orjson and anyio.': a fresh interpreter that
    imports ``tunneld.client`` has loaded, besides the standard library and this project's own
    ``protocol`` (the server's validators, 'Validation before any request'), only those four and
    what they themselves require (anyio's ``typing_extensions`` on Python < 3.13 ...)."""
    claim("Its only dependencies are h11, wsproto, orjson and anyio.")
    program = (
        "import sys; before = set(sys.modules); import tunneld.client; "
        "print(' '.join(sorted({m.split('.')[0] for m in set(sys.modules) - before})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=tmp_path,  # not the checkout's root, which "-c" would put first on sys.path
    )
    loaded = {m for m in out.stdout.split() if m not in sys.stdlib_module_names}
    four = {"h11", "wsproto", "orjson", "anyio"}
    allowed = four | {"tunneld", "protocol"}
    for name in four:
        allowed |= _requirements(name)
    assert four <= loaded, loaded
    assert loaded <= allowed, f"tunneld.client also loads {sorted(loaded - allowed)}"


async def test_the_ports_calls_against_a_real_edge(stack: Stack) -> None:
    """API: 'expose_port(...) → ExposedPort', '`.url` is an alias of `exposed_at`', the options
    '(`"http"`, `None`, `False`, `False` for a plain preview URL; `public_port` is a `tcp`
    exposure's port on the edge)', 'get_exposed_ports() → list[ExposedPort] (sorted by port)',
    'unexpose_port(8000) # idempotent', and the line on sandboxes never seen."""
    claim("`.url` is an alias of `exposed_at`")
    claim(
        '(`"http"`, `None`, `False`, `False` for a plain preview URL; `public_port` is a `tcp` '
        "exposure's port on the edge)"
    )
    claim("`await sb.get_exposed_ports()` → `list[ExposedPort]` (sorted by port)")
    claim("await sb.unexpose_port(8000)                    # idempotent")
    claim(
        "`unexpose_port` of a port that is not exposed, even of a sandbox tunneld has never "
        "seen, returns `None`, and `get_exposed_ports()` of such a sandbox is `[]`: neither "
        "raises `NotFoundError`"
    )
    assert stack.edge is not None
    listeners = stack.edge.tcp.listeners
    async with sdk(stack) as client:
        sb = client.sandbox("sb1")
        plain = await sb.expose_port(8002, name="api")
        assert isinstance(plain, ExposedPort) and plain.url == plain.exposed_at
        options = (plain.protocol, plain.public_port, plain.proxy_protocol, plain.inspect)
        assert options == ("http", None, False, False)
        assert plain.exposed_at.startswith("http://8002-sb1-") and plain.name == "api"
        tcp = await sb.expose_port(8000, protocol="tcp")
        assert tcp.protocol == "tcp" and tcp.public_port in listeners
        assert tcp.url.startswith("tcp://") and tcp.url.endswith(f":{tcp.public_port}")
        other = await sb.expose_port(8001, proxy_protocol=True)
        assert other.proxy_protocol is True
        assert await sb.get_exposed_ports() == [tcp, other, plain]  # by port, as answered
        assert await sb.unexpose_port(8000) is None
        assert await sb.unexpose_port(8000) is None  # again: idempotent
        assert await sb.get_exposed_ports() == [other, plain]
        assert tcp.public_port not in listeners  # its public TCP port closed
        never = client.sandbox("never-seen")
        assert await never.unexpose_port(8000) is None
        assert await never.get_exposed_ports() == []


async def test_ws_connect_needs_no_exposure_and_its_errors(stack: Stack, service: int) -> None:
    """WebSocket: 'The port needs no exposure. Errors before the connection are the SDK's
    exceptions, as for raw TCP: nothing listening ... `UPSTREAM_CONNECT_FAILED`, a sandbox
    tunneld has never seen `NotFoundError`, one whose agent is not connected
    `SandboxNotConnectedError`'."""
    claim(
        "The port needs no exposure. Errors before the connection are the SDK's exceptions, as "
        "for [raw TCP](#raw-tcp): nothing listening on the port is `TunnelError` with status 502 "
        "and code `UPSTREAM_CONNECT_FAILED`, a sandbox tunneld has never seen `NotFoundError`, "
        "one whose agent is not connected `SandboxNotConnectedError`"
    )
    async with sdk(stack) as client:
        sb = client.sandbox("sb1")
        assert await sb.get_exposed_ports() == []
        async with await sb.ws_connect(service, path="/ws") as ws:  # not exposed
            await ws.send("hi")
            assert await ws.receive() == "hi"
        with socket.socket() as held:  # bound, never listening: a connect to it is refused
            held.bind(("127.0.0.1", 0))
            with pytest.raises(TunnelError) as refused:
                await sb.ws_connect(held.getsockname()[1])
        assert type(refused.value) is TunnelError
        assert (refused.value.status, refused.value.code) == (502, "UPSTREAM_CONNECT_FAILED")
        with pytest.raises(NotFoundError) as unknown:
            await client.sandbox("never-seen").ws_connect(service)
        assert (unknown.value.status, unknown.value.code) == (404, "SANDBOX_NOT_FOUND")
        await client.sandbox("offline").expose_port(8000)  # known to tunneld, no agent
        with pytest.raises(SandboxNotConnectedError) as offline:
            await client.sandbox("offline").ws_connect(8000)
        assert (offline.value.status, offline.value.code) == (503, "SANDBOX_NOT_CONNECTED")
