"""docs/admin-api.md, "Authentication" and "Errors": the claims a caller and a security review
depend on, checked on a real in-process edge over real sockets.

- "Every endpoint except /healthz and /readyz needs Authorization: Bearer <admin token>", and
  the 401 is the documented answer, byte for byte, with its headers; "A wrong token gets the same
  answer". A refused request changes nothing (an unauthorised DELETE leaves the port exposed).
- "All responses carry cache-control: no-store."
- 404 NOT_FOUND: "No such endpoint: GET /v1/nothing".
(Constant-time comparison: tests/e2e/test_doc_claims_operations_2.py::
test_admin_and_agent_tokens_are_compared_in_constant_time.)
"""

from __future__ import annotations

import hmac

import httpx
import pytest

from tunneld.tcpws import BEARER_PREFIX, SUBPROTOCOL

from .conftest import WS_HANDSHAKE, Stack

pytestmark = pytest.mark.anyio

UNAUTHORIZED = (
    b'{"error":"Missing or invalid admin token (Authorization: Bearer <token>).",'
    b'"code":"UNAUTHORIZED"}'
)

# Every route that needs the token: (method, path, extra headers, JSON body).
AUTHED_ROUTES: list[tuple[str, str, dict[str, str], object]] = [
    ("GET", "/metrics", {}, None),
    ("GET", "/v1/sandboxes", {}, None),
    ("GET", "/v1/sandboxes/sb1", {}, None),
    ("GET", "/v1/sandboxes/sb1/ports", {}, None),
    ("POST", "/v1/sandboxes/sb1/ports", {}, {"port": 8001}),
    ("DELETE", "/v1/sandboxes/sb1/ports/8000", {}, None),
    ("POST", "/v1/sandboxes/sb1/ports/8000/wait", {}, {"timeout": 1}),
    ("GET", "/v1/sandboxes/sb1/ports/8000/ws", WS_HANDSHAKE, None),
    ("GET", "/v1/sandboxes/sb1/ports/8000/tcp", {"connection": "Upgrade", "upgrade": "tcp"}, None),
    ("PUT", "/v1/sandboxes/sb1/inspect", {}, None),
    ("DELETE", "/v1/sandboxes/sb1/inspect", {}, None),
    ("GET", "/v1/sandboxes/sb1/inspect", {}, None),
    ("GET", "/v1/sandboxes/sb1/requests", {}, None),
    ("GET", "/v1/sandboxes/sb1/requests/1", {}, None),
    ("GET", "/v1/nothing", {}, None),  # even an unknown endpoint: nothing is told without it
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def anonymous(stack: Stack) -> httpx.AsyncClient:
    assert stack.edge is not None
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{stack.edge.admin_port}", timeout=30)


def assert_the_401(r: httpx.Response, what: object) -> None:
    assert r.status_code == 401, (what, r.status_code, r.text)
    assert r.content == UNAUTHORIZED, what
    assert r.headers["content-type"] == "application/json", what
    assert r.headers["cache-control"] == "no-store", what
    assert r.headers["www-authenticate"] == 'Bearer realm="tunneld"', what


async def test_every_route_but_the_probes_answers_the_documented_401(stack: Stack) -> None:
    """The console example's 401 (status, body, content-type, cache-control, WWW-Authenticate)
    for no token, a wrong one and malformed headers, on every route that needs the token."""
    await stack.agent("sb1")
    await stack.expose("sb1", 8000)
    token = stack.admin_token
    wrong_headers = [
        {},
        {"authorization": "Bearer wrong"},
        {"authorization": f"Bearer {token}x"},  # the token as a prefix of the offer
        {"authorization": f"Bearer {token[:-1]}"},  # a prefix of the token
        {"authorization": f"Basic {token}"},  # the right token in another scheme
        {"authorization": token},  # no scheme at all
        {"authorization": "Bearer"},
    ]
    async with anonymous(stack) as anon:
        for method, path, extra, body in AUTHED_ROUTES:
            for auth in wrong_headers:
                r = await anon.request(method, path, headers={**extra, **auth}, json=body)
                assert_the_401(r, (method, path, auth))
        for path in ("/healthz", "/readyz"):  # no token needed, and a wrong one is no matter
            for auth in ({}, {"authorization": "Bearer wrong"}):
                r = await anon.get(path, headers=auth)
                assert r.status_code == 200, (path, auth, r.text)


async def test_a_refused_request_changes_nothing(stack: Stack) -> None:
    """Behind the 401 nothing happened: no expose, no unexpose, inspection not switched on."""
    assert stack.admin is not None
    await stack.agent("sb1")
    exposed = await stack.expose("sb1", 8000)
    async with anonymous(stack) as anon:
        wrong = {"authorization": "Bearer wrong"}
        for method, path, body in (
            ("DELETE", "/v1/sandboxes/sb1/ports/8000", None),
            ("POST", "/v1/sandboxes/sb1/ports", {"port": 8001}),
            ("POST", "/v1/sandboxes/sb2/ports", {"port": 8001}),
            ("POST", "/v1/sandboxes/sb1/ports", {"port": 8000, "token": "stolen"}),
            ("PUT", "/v1/sandboxes/sb1/inspect", None),
        ):
            r = await anon.request(method, path, headers=wrong, json=body)
            assert r.status_code == 401, (method, path)
    assert (await stack.admin.get("/v1/sandboxes/sb1/ports")).json() == {"ports": [exposed]}
    assert (await stack.admin.get("/v1/sandboxes/sb2/ports")).json() == {"ports": []}
    assert (await stack.admin.get("/v1/sandboxes/sb1/inspect")).json()["inspect"] is False


async def test_every_answer_carries_cache_control_no_store(stack: Stack) -> None:
    """'All responses carry cache-control: no-store': successes (JSON, 204, Prometheus text, the
    probes) and errors alike; and the NOT_FOUND sentence of the Errors table."""
    assert stack.admin is not None
    await stack.agent("sb1")
    answers = [
        await stack.admin.get("/healthz"),
        await stack.admin.get("/readyz"),
        await stack.admin.get("/metrics"),
        await stack.admin.get("/v1/sandboxes"),
        await stack.admin.get("/v1/sandboxes/sb1"),
        await stack.admin.post("/v1/sandboxes/sb1/ports", json={"port": 8000}),
        await stack.admin.get("/v1/sandboxes/sb1/ports"),
        await stack.admin.delete("/v1/sandboxes/sb1/ports/8000"),
        await stack.admin.post("/v1/sandboxes/sb1/ports", json={"port": 80}),
        await stack.admin.put("/v1/sandboxes/sb1/ports"),
        await stack.admin.get("/v1/sandboxes/nosuch"),
    ]
    not_found = await stack.admin.get("/v1/nothing")
    answers.append(not_found)
    assert [r.status_code for r in answers] == [
        200, 200, 200, 200, 200, 200, 200, 204, 400, 405, 404, 404,
    ]  # fmt: skip
    for r in answers:
        assert r.headers.get("cache-control") == "no-store", (r.request.url, r.status_code)
    assert not_found.json() == {"error": "No such endpoint: GET /v1/nothing", "code": "NOT_FOUND"}


async def test_ids_and_ports_are_validated_on_the_remaining_paths(stack: Stack) -> None:
    """'Sandbox ids are validated on every /v1/sandboxes/{id}/… path, ports on every path and
    body that carries one: a request with an invalid value never reaches the registry or the
    agent' (the ports, wait and ws paths: tests/e2e/test_doc_claims_admin_api.py)."""
    assert stack.admin is not None
    await stack.agent("sb1")
    tcp = {"connection": "Upgrade", "upgrade": "tcp"}
    for method, path, headers in (
        ("GET", "/v1/sandboxes/Bad_ID/ports/8000/tcp", tcp),
        ("PUT", "/v1/sandboxes/Bad_ID/inspect", {}),
        ("GET", "/v1/sandboxes/Bad_ID/requests", {}),
        ("GET", "/v1/sandboxes/Bad_ID/requests/1", {}),
    ):
        r = await stack.admin.request(method, path, headers=headers)
        assert (r.status_code, r.json()["code"]) == (400, "INVALID_SANDBOX_ID"), (method, path)
    for port in ("80", "3000", "abc", "70000", "0x1f90"):
        for kind, headers in (("tcp", tcp), ("ws", WS_HANDSHAKE)):
            path = f"/v1/sandboxes/sb1/ports/{port}/{kind}"
            r = await stack.admin.get(path, headers=headers)
            assert (r.status_code, r.json()["code"]) == (400, "INVALID_PORT"), path
    assert (await stack.admin.get("/v1/sandboxes")).json()["sandboxes"][0]["streams"] == 0


async def test_no_token_in_the_query_and_the_browser_token_compared_in_constant_time(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'Never put the token in the query string': the edge takes it nowhere but the header (and
    the raw TCP endpoint's subprotocol, 'compared in constant time')."""
    async with anonymous(stack) as anon:
        for name in ("token", "access_token", "authorization"):
            r = await anon.get(f"/v1/sandboxes?{name}={stack.admin_token}")
            assert_the_401(r, name)
        compared: list[tuple[bytes, bytes]] = []
        real = hmac.compare_digest

        def spy(a: bytes, b: bytes) -> bool:
            compared.append((a, b))
            return real(a, b)

        monkeypatch.setattr(hmac, "compare_digest", spy)
        wrong = BEARER_PREFIX + "d3Jvbmc"
        r = await anon.get(
            "/v1/sandboxes/sb1/ports/8000/tcp",
            headers={**WS_HANDSHAKE, "sec-websocket-protocol": f"{SUBPROTOCOL}, {wrong}"},
        )
        monkeypatch.undo()
        assert_the_401(r, "subprotocol")
        assert any(offered == wrong.encode() for offered, _ in compared), compared
