"""Row 14 of issue 7: a port in an admin path is ASCII digits or a 400, never a 500 or a port.

``str.isdigit()`` accepts superscripts (``²``: then ``int()`` raises, a 500 with a traceback)
and full-width or Arabic-Indic digits (U+FF18 U+FF10 U+FF18 U+FF10 is 8080 to ``int()``, so it
named port 8080).
"""

from __future__ import annotations

import logging
from urllib.parse import quote

import httpx
import pytest

from .conftest import Stack, raw_request

pytestmark = pytest.mark.anyio

NOT_PORTS = [
    "²",  # superscript two: isdigit() but not int()
    "\uff18\uff10\uff18\uff10",  # full-width 8080: int() parses it
    "٨٠٨٠",  # Arabic-Indic 8080
    "८०८०",  # Devanagari 8080
    "8080\u200b",  # zero-width space after the digits
    "+8080",
    "-1",
    "8_080",
    " 8080",
    "0x1f90",
    "99999999999999999999",
]

ROUTES = [
    ("DELETE", "/v1/sandboxes/sb1/ports/{port}"),
    ("GET", "/v1/sandboxes/sb1/ports/{port}/ws"),
]


def _assert_json_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["code"] == code and isinstance(body["error"], str), body
    assert "Traceback" not in r.text


@pytest.mark.parametrize("text", NOT_PORTS)
@pytest.mark.parametrize(("method", "route"), ROUTES)
async def test_admin_routes_refuse_non_ascii_ports(
    stack: Stack, caplog, method: str, route: str, text: str
) -> None:
    caplog.set_level(logging.ERROR)
    await stack.expose("sb1", 8080)
    r = await stack.admin.request(method, route.format(port=quote(text, safe="")))
    _assert_json_error(r, 400, "INVALID_PORT")
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    # Nothing was unexposed by a look-alike of 8080.
    listing = await stack.admin.get("/v1/sandboxes/sb1/ports")
    assert [p["port"] for p in listing.json()["ports"]] == [8080]


async def test_superscript_port_answer_on_the_wire(stack: Stack) -> None:
    """The exact request of the report, as raw bytes: a 400 JSON answer, not a 500."""
    answer = await raw_request(
        stack.edge.admin_port,
        b"DELETE /v1/sandboxes/sb1/ports/%C2%B2 HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer " + stack.admin_token.encode() + b"\r\n"
        b"Connection: close\r\n\r\n",
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer
    assert b'"INVALID_PORT"' in body


@pytest.mark.parametrize("text", ["²", "\uff18", "٣"])
async def test_non_ascii_sandbox_ids_in_paths_are_400(stack: Stack, text: str) -> None:
    for method, path in [
        ("GET", "/v1/sandboxes/{sid}/ports"),
        ("POST", "/v1/sandboxes/{sid}/ports"),
        ("DELETE", "/v1/sandboxes/{sid}/ports/8080"),
        ("GET", "/v1/sandboxes/{sid}/ports/8080/ws"),
    ]:
        kwargs = {"json": {"port": 8080}} if method == "POST" else {}
        r = await stack.admin.request(method, path.format(sid=quote(text)), **kwargs)
        assert r.status_code == 400, (method, path, r.status_code, r.text)
        assert r.json()["code"].startswith("INVALID_SANDBOX_ID")


@pytest.mark.parametrize("port", ["\uff18\uff10\uff18\uff10", "²", "8080"])
async def test_expose_body_port_must_be_a_json_number(stack: Stack, port: str) -> None:
    r = await stack.admin.post("/v1/sandboxes/sb1/ports", json={"port": port})
    _assert_json_error(r, 400, "INVALID_PORT")


async def test_ascii_ports_in_paths_still_work(stack: Stack) -> None:
    await stack.expose("sb1", 8080)
    r = await stack.admin.delete("/v1/sandboxes/sb1/ports/8080")
    assert r.status_code == 204
    r = await stack.admin.delete("/v1/sandboxes/sb1/ports/08080")  # leading zero: still 8080
    assert r.status_code == 204
