"""docs/admin-api.md, "Expose a port" and "List a sandbox's ports", on a real in-process edge:

- "Custom token ... a token is unique per sandbox, and passing a different token to an exposed
  port changes its URL" (the old URL then answers what a port not exposed gets, 404
  INVALID_TOKEN, as Cloudflare's rotation does); "Idempotent. Exposing a port again returns the
  same token and URL" (a custom one included: Cloudflare's ``options.token ?? existing.token``).
- "The preview URL is {scheme}://{port}-{id}-{token}.{domain}[:{url_port}]/ (no token part when
  the edge runs with tokens = false); the port is left out when it is the scheme's default.
  Auto tokens are 16 characters of [a-z0-9]"; the list is "Sorted by port".
- Port rules: the expose path refuses what the SDK refuses, with Cloudflare's message.
"""

from __future__ import annotations

import re

import pytest

from .conftest import Stack, wait_until

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def get_status(stack: Stack, url: str) -> tuple[int, str | None]:
    async with stack.client(url) as client:
        r = await client.get("/")
    return r.status_code, (r.json().get("code") if r.status_code >= 400 else None)


async def test_a_new_custom_token_moves_the_url_and_the_old_one_stops(stack: Stack) -> None:
    assert stack.admin is not None and stack.edge is not None
    origin = await stack.origin()
    await stack.agent("sb1")
    port = origin.port
    first = await stack.expose("sb1", port)
    assert await get_status(stack, first["exposedAt"]) == (200, None)
    mine = await stack.expose("sb1", port, token="mine")
    assert mine["exposedAt"] == f"http://{port}-sb1-mine.localhost:{stack.edge.public_port}/"
    assert await get_status(stack, mine["exposedAt"]) == (200, None)
    assert await get_status(stack, first["exposedAt"]) == (404, "INVALID_TOKEN")
    # a re-expose without a token, or with the port's own token, keeps it: same URL
    assert await stack.expose("sb1", port) == mine
    assert await stack.expose("sb1", port, token="mine") == mine
    r = await stack.admin.post("/v1/sandboxes/sb1/ports", json={"port": 8001, "token": "mine"})
    assert (r.status_code, r.json()) == (
        409,
        {
            "error": f"Token 'mine' is already in use by port {port}. "
            "Please use a different token.",
            "code": "TOKEN_IN_USE",
        },
    )
    assert [
        p["port"] for p in (await stack.admin.get("/v1/sandboxes/sb1/ports")).json()["ports"]
    ] == [port]  # the refused expose stored nothing
    # another token for the port frees "mine" for another port; unique per sandbox only
    await stack.expose("sb1", port, token="other")
    assert (await stack.expose("sb1", 8001, token="mine"))["exposedAt"].startswith(
        "http://8001-sb1-mine."
    )
    assert (await stack.expose("sb2", 8001, token="mine"))["exposedAt"].startswith(
        "http://8001-sb2-mine."
    )
    assert await get_status(stack, mine["exposedAt"]) == (404, "INVALID_TOKEN")


async def test_url_layout_auto_tokens_and_sorting() -> None:
    stack = await Stack(domain="example.test", url_port=80).start()
    try:
        assert stack.admin is not None
        ports = list(range(9019, 8999, -1))  # exposed in descending order
        urls = {p: (await stack.expose("sb1", p))["exposedAt"] for p in ports}
        for port, url in urls.items():  # 80 is http's default: no port in the URL
            assert re.fullmatch(rf"http://{port}-sb1-[a-z0-9]{{16}}\.example\.test/", url), url
        assert len({url.split("-")[2] for url in urls.values()}) == len(ports)  # all different
        listed = (await stack.admin.get("/v1/sandboxes/sb1/ports")).json()["ports"]
        assert [p["port"] for p in listed] == sorted(ports)
        assert {p["port"]: p["exposedAt"] for p in listed} == urls
    finally:
        await stack.close()
    stack = await Stack(domain="example.test", url_port=8443, scheme="https", tokens=False).start()
    try:
        shown = await stack.expose("my-sb", 8000)
        assert shown["exposedAt"] == "https://8000-my-sb.example.test:8443/"
    finally:
        await stack.close()
    stack = await Stack(domain="example.test", url_port=443, scheme="https").start()
    try:
        shown = await stack.expose("sb1", 8000)
        assert re.fullmatch(r"https://8000-sb1-[a-z0-9]{16}\.example\.test/", shown["exposedAt"])
    finally:
        await stack.close()


@pytest.mark.parametrize(
    ("port", "shown"),
    [(1023, "1023"), (65536, "65536"), (8080.0, "8080.0"), (True, "true"), (None, "null")],
)
async def test_the_port_rules_of_the_body(stack: Stack, port: object, shown: str) -> None:
    """'an integer in 1024-65535, not 3000 ... "8080" (a string), 8080.0 and true are refused'
    (80, 3000, 70000 and "8080": tests/e2e/test_admin.py); the edges 1024 and 65535 are fine."""
    assert stack.admin is not None
    r = await stack.admin.post("/v1/sandboxes/sb1/ports", json={"port": port})
    assert (r.status_code, r.json()) == (
        400,
        {
            "error": f"Invalid port number: {shown}. Must be 1024-65535, excluding 3000 "
            "(sandbox control plane).",
            "code": "INVALID_PORT",
        },
    )
    for fine in (1024, 65535):
        assert (await stack.expose("sb1", fine))["port"] == fine


async def test_a_sandbox_is_listed_while_it_has_exposures_or_a_connected_agent(
    stack: Stack,
) -> None:
    """docs/admin-api.md, List sandboxes: "A sandbox is listed while it has exposures or a
    connected agent"; GET /v1/sandboxes/{id} is 404 SANDBOX_NOT_FOUND once it has neither."""
    assert stack.admin is not None

    async def listed() -> list[str]:
        return [s["id"] for s in (await stack.admin.get("/v1/sandboxes")).json()["sandboxes"]]

    await stack.expose("offline-1", 8000)
    await stack.expose("offline-1", 8001)
    agent = await stack.agent("sb1")  # connected, nothing exposed
    assert await listed() == ["offline-1", "sb1"]
    await stack.admin.delete("/v1/sandboxes/offline-1/ports/8000")
    assert await listed() == ["offline-1", "sb1"]  # one exposure left
    await stack.admin.delete("/v1/sandboxes/offline-1/ports/8001")
    assert await listed() == ["sb1"]
    r = await stack.admin.get("/v1/sandboxes/offline-1")
    assert (r.status_code, r.json()["code"]) == (404, "SANDBOX_NOT_FOUND")
    await agent.stop()
    await wait_until(lambda: stack.edge.registry.get("sb1") is None, 10, "sb1 forgotten")
    assert await listed() == []
    r = await stack.admin.get("/v1/sandboxes/sb1")
    assert (r.status_code, r.json()["code"]) == (404, "SANDBOX_NOT_FOUND")
