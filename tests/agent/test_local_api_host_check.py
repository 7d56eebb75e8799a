"""The local API's ``Host`` check on a wildcard bind, driven through real requests on loopback.

Tests never bind 0.0.0.0, so the wildcard case runs a server bound to 127.0.0.1 with the
:class:`agent.local_api.HostCheck` a ``0.0.0.0`` bind gets, and a separate test checks that a
``LocalAPI`` bound to a wildcard address does get that check. The check used to be skipped on a
wildcard bind, which let a DNS-rebinding page (its own name now resolving to this machine, and no
``Origin`` on a same-origin ``GET``) read every preview URL and token from ``GET /v1/ports``.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from agent.local_api import HostCheck, LocalAPI
from tests.e2e.procs import BIN, Processes

from .test_local_api import FakeController

pytestmark = pytest.mark.anyio

WILDCARDS = ["0.0.0.0", "::", ""]
# A rebinding page's Host is its own name; a browser sends an IP address only for a page loaded
# from that address (this API itself).
NAMES = ["evil.example", "evil.example:3000", "sandbox-host", "localhost.evil.example"]
ADDRESSES = ["10.1.2.3", "10.1.2.3:3000", "[fd00::1]:3000", "172.17.0.2"]
LOOPBACK = ["localhost:3000", "agent.localhost", "127.0.0.1:3000", "[::1]:3000"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def exposed() -> FakeController:
    controller = FakeController()
    await controller.expose(8000)
    return controller


@pytest.fixture(params=WILDCARDS)
async def wildcard_api(
    request: pytest.FixtureRequest, exposed: FakeController
) -> AsyncIterator[LocalAPI]:
    """Bound to 127.0.0.1, with the Host rule of a wildcard bind."""
    check = HostCheck(request.param)
    async with LocalAPI(exposed, "127.0.0.1", 0, host_check=check) as api:
        yield api


@pytest.fixture
async def loopback_api(exposed: FakeController) -> AsyncIterator[LocalAPI]:
    async with LocalAPI(exposed, "127.0.0.1", 0) as api:
        yield api


async def _ports(api: LocalAPI, host: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.port}", timeout=10) as c:
        return await c.get("/v1/ports", headers={"host": host})


@pytest.mark.parametrize("host", NAMES)
async def test_a_wildcard_bind_still_refuses_a_host_name(wildcard_api: LocalAPI, host: str) -> None:
    r = await _ports(wildcard_api, host)
    assert r.status_code == 403, r.text
    assert r.json() == {
        "error": f"Host {host.partition(':')[0]!r} is not allowed.",
        "code": "FORBIDDEN",
    }


@pytest.mark.parametrize("host", ADDRESSES + LOOPBACK)
async def test_a_wildcard_bind_answers_any_ip_address_and_localhost(
    wildcard_api: LocalAPI, host: str
) -> None:
    """Other machines reach a wildcard-bound API by one of its addresses: answered."""
    r = await _ports(wildcard_api, host)
    assert r.status_code == 200, r.text
    assert r.json()["ports"][0]["exposedAt"] == "http://8000-sb1-tok8000.localhost:8080/"


@pytest.mark.parametrize("host", NAMES + ADDRESSES)
async def test_a_loopback_bind_answers_loopback_names_only(
    loopback_api: LocalAPI, host: str
) -> None:
    r = await _ports(loopback_api, host)
    assert r.status_code == 403, r.text
    assert r.json()["code"] == "FORBIDDEN"


@pytest.mark.parametrize("host", LOOPBACK)
async def test_a_loopback_bind_answers_loopback(loopback_api: LocalAPI, host: str) -> None:
    assert (await _ports(loopback_api, host)).status_code == 200


@pytest.mark.parametrize(
    ("bind", "wildcard"),
    [
        ("0.0.0.0", True),
        ("::", True),
        ("", True),
        ("0:0:0:0:0:0:0:0", True),
        ("127.0.0.1", False),
        ("::1", False),
        ("10.0.0.5", False),
    ],
)
def test_a_local_api_gets_the_rule_of_the_address_it_binds(bind: str, wildcard: bool) -> None:
    """The decision the fixtures above inject is the one LocalAPI makes from its bind address
    (not started: tests bind loopback only)."""
    check = LocalAPI(FakeController(), bind, 0).host_check
    assert check.allows("evil.example") is False
    assert check.allows("localhost:3000") is True
    assert check.allows("172.17.0.2:3000") is wildcard
    if not wildcard:  # a specific address is answered under its own name
        assert check.allows(f"[{bind}]:3000" if ":" in bind else f"{bind}:3000") is True


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("agent-svc", 200),
        ("Agent-Svc:3000", 200),
        ("sandbox.internal", 200),
        ("other-svc", 403),
        ("agent-svc.evil.example", 403),
    ],
)
def test_api_allow_host_names_the_extra_names_a_real_agent_answers(
    tmp_path: Path, host: str, status: int
) -> None:
    """``tunnel-agent run --api-allow-host NAME`` (repeatable): the names an operator gives are
    answered (any case, with a port), every other name is still refused."""
    procs = Processes(tmp_path)
    try:
        procs.start_edge()
        extra = ["--api-allow-host", "agent-svc", "--api-allow-host", "Sandbox.Internal."]
        _agent, api_port = procs.start_agent("sb1", extra=extra)
        with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=10) as client:
            r = client.get("/v1/ports", headers={"host": host})
        assert r.status_code == status, r.text
        if status == 403:
            assert r.json()["code"] == "FORBIDDEN"
        else:
            assert r.json() == {"ports": []}
    finally:
        procs.close()


@pytest.mark.parametrize("name", ["a b", "*.example", "agent:3000", "", "agent/x"])
def test_api_allow_host_refuses_what_is_not_a_host_name(name: str) -> None:
    done = subprocess.run(
        [str(BIN / "tunnel-agent"), "run", "--sandbox-id", "sb1", "--api-allow-host", name],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    assert "argument --api-allow-host: expected a host name" in done.stderr
