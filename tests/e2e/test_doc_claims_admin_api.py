"""Claims of docs/admin-api.md that no other test checked on a single real edge: the sandbox id
errors on paths, INVALID_NAME, a JSON body that is not an object, GET /v1/sandboxes/{id}, the
WebSocket connect's refusals, SANDBOX_BUSY, AGENT_TIMEOUT (expose and wait), and the limits."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from tunneld.admin import LIMITS
from tunneld.metrics import Metrics

from .conftest import WS_HANDSHAKE, Stack, raw_request

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("sandbox_id", "code", "message"),
    [
        ("a" * 64, "INVALID_SANDBOX_ID_LENGTH", "Sandbox ID must be 1-63 characters long."),
        (
            "-sb1",
            "INVALID_SANDBOX_ID_HYPHENS",
            "Sandbox ID cannot start or end with hyphens (DNS requirement).",
        ),
        ("sb1-", "INVALID_SANDBOX_ID_HYPHENS", None),
        ("admin", "RESERVED_SANDBOX_ID", "Reserved sandbox ID 'admin' is not allowed."),
        ("workers", "RESERVED_SANDBOX_ID", None),
        (
            "Bad_ID",
            "INVALID_SANDBOX_ID",
            "Sandbox ID must contain only lowercase letters (a-z), numbers (0-9), and hyphens (-) "
            "(DNS requirement). Invalid sandbox ID: 'Bad_ID'.",
        ),
    ],
)
async def test_sandbox_ids_are_validated_on_every_path(
    stack: Stack, sandbox_id: str, code: str, message: str | None
) -> None:
    assert stack.admin is not None
    base = f"/v1/sandboxes/{sandbox_id}"
    for method, path, body in (
        ("POST", f"{base}/ports", {"port": 8000}),
        ("GET", f"{base}/ports", None),
        ("GET", base, None),
        ("DELETE", f"{base}/ports/8000", None),
        ("POST", f"{base}/ports/8000/wait", {}),
        ("GET", f"{base}/ports/8000/ws", None),
    ):
        r = await stack.admin.request(method, path, json=body)
        assert r.status_code == 400, (method, path, r.text)
        assert r.json()["code"] == code, (method, path)
        if message is not None:
            assert r.json()["error"] == message
    assert (await stack.admin.get("/v1/sandboxes")).json() == {"sandboxes": []}


async def test_body_errors_name_and_non_object(stack: Stack) -> None:
    assert stack.admin is not None
    ports = "/v1/sandboxes/sb1/ports"
    r = await stack.admin.post(ports, json={"port": 8000, "name": "n" * 257})
    assert (r.status_code, r.json()) == (
        400,
        {"error": "Port name must be a string of at most 256 characters.", "code": "INVALID_NAME"},
    )
    r = await stack.admin.post(ports, json={"port": 8000, "name": 7})
    assert r.json()["code"] == "INVALID_NAME"
    r = await stack.admin.post(ports, json={"port": 8000, "name": "n" * 256})
    assert r.status_code == 200  # 256 is allowed
    for body in (b"[8000]", b'"x"', b"8000", b"null"):
        r = await stack.admin.post(ports, content=body)
        assert (r.status_code, r.json()) == (
            400,
            {"error": "The request body must be a JSON object.", "code": "INVALID_JSON"},
        ), body
    r = await stack.admin.post(ports, json={"port": 8000, "foo": 1, "bar": 2})
    assert r.json() == {"error": "Unknown field(s): bar, foo.", "code": "INVALID_REQUEST"}
    r = await stack.admin.post(ports, json={"name": "x"})
    assert r.json() == {"error": "Missing field: port.", "code": "INVALID_REQUEST"}


async def test_path_ports_and_methods(stack: Stack) -> None:
    """'/ports/abc and /ports/80 get 400 INVALID_PORT'; a wrong method is 405 with Allow."""
    assert stack.admin is not None
    for path in ("/v1/sandboxes/sb1/ports/abc", "/v1/sandboxes/sb1/ports/80"):
        r = await stack.admin.delete(path)
        assert (r.status_code, r.json()["code"]) == (400, "INVALID_PORT"), path
    r = await stack.admin.delete("/v1/sandboxes/sb1/ports/8765")  # not exposed: idempotent
    assert r.status_code == 204 and r.content == b""
    assert r.headers["cache-control"] == "no-store"
    for method, path, allow in (
        ("POST", "/v1/sandboxes", "GET"),
        ("DELETE", "/v1/sandboxes/sb1", "GET"),
        ("PUT", "/v1/sandboxes/sb1/ports", "GET, POST"),
        ("GET", "/v1/sandboxes/sb1/ports/8000", "DELETE"),
        ("POST", "/v1/sandboxes/sb1/ports/8000/ws", "GET"),
        ("POST", "/healthz", "GET"),
    ):
        r = await stack.admin.request(method, path)
        assert r.status_code == 405, (method, path)
        assert r.json() == {
            "error": f"Method {method} not allowed here.",
            "code": "METHOD_NOT_ALLOWED",
        }
        assert r.headers["allow"] == allow


async def test_one_sandbox_is_its_list_entry_or_404(stack: Stack) -> None:
    """'GET /v1/sandboxes/{id} answers one entry of that list, or 404 SANDBOX_NOT_FOUND';
    'An unknown (but valid) sandbox id gives {"ports":[]}, not 404'."""
    assert stack.admin is not None
    r = await stack.admin.get("/v1/sandboxes/nosuch")
    assert (r.status_code, r.json()["code"]) == (404, "SANDBOX_NOT_FOUND")
    assert r.json()["error"].startswith("Sandbox nosuch is unknown")
    r = await stack.admin.get("/v1/sandboxes/nosuch/ports")
    assert (r.status_code, r.json()) == (200, {"ports": []})
    await stack.expose("offline-1", 8001, name="web")
    await stack.agent("sb1")
    listed = {s["id"]: s for s in (await stack.admin.get("/v1/sandboxes")).json()["sandboxes"]}
    assert list(listed) == ["offline-1", "sb1"]  # sorted by id
    for sandbox_id in ("offline-1", "sb1"):
        one = (await stack.admin.get(f"/v1/sandboxes/{sandbox_id}")).json()
        for volatile in ("connectedAt", "rttMs", "streams"):
            one.pop(volatile, None)
            listed[sandbox_id].pop(volatile, None)
        assert one == listed[sandbox_id]
    offline = listed["offline-1"]
    assert set(offline) == {"id", "connected", "ports"} and offline["connected"] is False
    assert {"session", "peer"} <= set(listed["sb1"]) and listed["sb1"]["connected"] is True


async def test_ws_connect_refusals_before_the_switch(stack: Stack, closed_port: int) -> None:
    assert stack.admin is not None
    await stack.agent("sb1")
    r = await stack.admin.get(f"/v1/sandboxes/sb1/ports/{closed_port}/ws", headers=WS_HANDSHAKE)
    assert (r.status_code, r.json()) == (
        502,
        {
            "error": "Nothing is listening on that port in the sandbox.",
            "code": "UPSTREAM_CONNECT_FAILED",
        },
    )
    for target in ("x", "ws", "/a b"):
        r = await stack.admin.get(
            "/v1/sandboxes/sb1/ports/8000/ws", params={"path": target}, headers=WS_HANDSHAKE
        )
        assert (r.status_code, r.json()) == (
            400,
            {"error": "path must be an absolute path, e.g. /ws.", "code": "INVALID_PATH"},
        ), target
    await stack.expose("offline-1", 8000)
    r = await stack.admin.get("/v1/sandboxes/offline-1/ports/8000/ws", headers=WS_HANDSHAKE)
    assert (r.status_code, r.json()) == (
        503,
        {"error": "Sandbox offline-1 is not connected.", "code": "SANDBOX_NOT_CONNECTED"},
    )
    r = await stack.admin.get("/v1/sandboxes/nosuch/ports/8000/ws", headers=WS_HANDSHAKE)
    assert (r.status_code, r.json()) == (
        404,
        {"error": "Sandbox nosuch is unknown.", "code": "SANDBOX_NOT_FOUND"},
    )


async def test_ws_connect_at_the_stream_limit_is_sandbox_busy(holding_service: int) -> None:
    stack = await Stack(max_streams=1).start()
    try:
        assert stack.edge is not None and stack.admin is not None
        await stack.agent("sb1")
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.admin_port)
        writer.write(
            f"GET /v1/sandboxes/sb1/ports/{holding_service}/tcp HTTP/1.1\r\nHost: admin\r\n"
            f"Authorization: Bearer {stack.admin_token}\r\nConnection: Upgrade\r\n"
            "Upgrade: tcp\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101 "), head  # the session's one stream is taken
        r = await stack.admin.get(
            f"/v1/sandboxes/sb1/ports/{holding_service}/ws", headers=WS_HANDSHAKE
        )
        assert (r.status_code, r.json()) == (
            503,
            {
                "error": "Sandbox sb1 cannot take more connections right now.",
                "code": "SANDBOX_BUSY",
            },
        )
        writer.close()
    finally:
        await stack.close()


async def test_an_agent_that_does_not_acknowledge_is_agent_timeout_yet_recorded() -> None:
    """'If the agent does not answer within control_timeout the call fails with 504
    AGENT_TIMEOUT, but the exposure is recorded; retrying is safe', and the wait 'never hangs':
    no answer within timeout + control_timeout is 504 AGENT_TIMEOUT."""
    stack = await Stack(control_timeout=1.0).start()  # the retry's ack: 1 s of margin
    try:
        assert stack.admin is not None
        agent = await stack.agent("sb1")
        transport = agent.session.transport if agent.session is not None else None
        assert transport is not None
        transport.pause_reading()  # frozen, as with kill -STOP: nothing it is sent is read
        r = await stack.admin.post("/v1/sandboxes/sb1/ports", json={"port": 8003})
        assert (r.status_code, r.json()) == (
            504,
            {
                "error": "The agent of sandbox sb1 did not acknowledge in time.",
                "code": "AGENT_TIMEOUT",
            },
        )
        recorded = (await stack.admin.get("/v1/sandboxes/sb1/ports")).json()["ports"]
        assert [p["port"] for p in recorded] == [8003]
        r = await stack.admin.post("/v1/sandboxes/sb1/ports/8003/wait", json={"timeout": 0.3})
        assert (r.status_code, r.json()["code"]) == (504, "AGENT_TIMEOUT")
        transport.resume_reading()
        r = await stack.admin.post("/v1/sandboxes/sb1/ports", json={"port": 8003})
        assert r.status_code == 200, r.text
        assert r.json()["exposedAt"] == recorded[0]["exposedAt"]  # the same URL on the retry
    finally:
        await stack.close()


async def test_the_admin_head_limit_is_431(stack: Stack) -> None:
    assert stack.edge is not None
    head = (
        b"GET /v1/sandboxes HTTP/1.1\r\nHost: admin\r\nX-Big: " + b"a" * (16 * 1024) + b"\r\n\r\n"
    )
    data = await raw_request(stack.edge.admin_port, head)
    assert data.startswith(b"HTTP/1.1 431 "), data[:80]
    assert b'"code":"HEADERS_TOO_LARGE"' in data


def test_the_admin_limits_are_the_documented_ones() -> None:
    """'head ≤ 16 KiB, body ≤ 64 KiB, the whole request within 10 s of its first byte, an idle
    keep-alive connection closed after 60 s, at most 256 connections', 'drains for up to 1 s'."""
    assert (LIMITS.max_head_bytes, LIMITS.max_body_bytes) == (16 * 1024, 64 * 1024)
    assert (LIMITS.request_timeout, LIMITS.idle_timeout) == (10.0, 60.0)
    assert (LIMITS.max_connections, LIMITS.linger_seconds) == (256, 1.0)


def test_the_metrics_table_is_what_tunneld_exports() -> None:
    """docs/admin-api.md's Metrics table: every series tunneld exports, with its type, and no
    other (the ``_created`` samples of the counters aside)."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "admin-api.md").read_text("utf-8")
    section = doc.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    documented: dict[str, str] = {}
    for names, kind in re.findall(r"^\| ((?:`tunneld_[^`]+`(?:, )?)+) \| (\w+) \|", section, re.M):
        for name in re.findall(r"`(tunneld_[a-z_]+)(?:\{\w+\})?`", names):
            documented[name] = kind
    exported = dict(re.findall(r"^# TYPE (\S+) (\S+)$", Metrics().render().decode(), re.M))
    exported = {k: v for k, v in exported.items() if not k.endswith("_created")}
    assert documented == exported
    # "the usual _created sample" for prometheus-client's counters, none for tunneld_http_*
    metrics = Metrics()
    metrics.requests.observe(0.01, 0.005, 200, 10, 20)
    samples = re.findall(r"^(tunneld_\w+?)(?:\{[^}]*\})? ", metrics.render().decode(), re.M)
    assert "tunneld_public_connections_created" in samples
    assert not [name for name in samples if name.startswith("tunneld_http_") and "created" in name]
