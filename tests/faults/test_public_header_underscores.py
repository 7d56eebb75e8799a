"""Issue 7 row 6: header names with ``_`` never reach the service.

CGI, WSGI and many frameworks expose request headers as ``HTTP_<NAME>`` with ``-`` turned into
``_``, so ``X_Forwarded_For: 6.6.6.6`` and the edge's own ``X-Forwarded-For`` land in the same
variable and the client's value can win. The edge drops every header whose name contains ``_``
(what nginx does by default, ``underscores_in_headers off``). The service here is CGI-style: it
answers with the ``HTTP_*`` environment it would build, keeping every value it saw.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest

from tests.e2e.conftest import any_parser_stack  # noqa: F401 - fixture
from tests.faults.conftest import Stack
from tests.faults.origins import ScriptedOrigin

pytestmark = pytest.mark.anyio


class CgiOrigin(ScriptedOrigin):
    """Answers each request with JSON ``{HTTP_NAME: [values...]}`` as a CGI gateway names them."""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        environ: dict[str, list[str]] = {}
        for line in head.decode("latin-1").split("\r\n")[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                key = "HTTP_" + name.strip().upper().replace("-", "_")
                environ.setdefault(key, []).append(value.strip())
        body = orjson.dumps(environ)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body
        )
        await writer.drain()


async def test_underscore_headers_cannot_spoof_forwarding(any_parser_stack: Stack) -> None:  # noqa: F811
    stack = any_parser_stack
    async with CgiOrigin() as origin:
        await stack.agent("sb1")
        exposed = await stack.expose("sb1", origin.port)
        async with stack.client(exposed["exposedAt"]) as client:
            r = await client.get(
                "/",
                headers={
                    "X_Forwarded_For": "6.6.6.6",
                    "x-forwarded_host": "evil.example",
                    "X_Real_IP": "6.6.6.6",
                    "X_Sandbox_Name": "other",
                    "X_Tunnel_Internal": "spoof",
                    "My_Custom_Header": "dropped too",
                    "X-Kept": "yes",
                },
            )
    assert r.status_code == 200, r.text
    environ = r.json()
    assert environ["HTTP_X_FORWARDED_FOR"] == ["127.0.0.1"]  # only the edge's own
    assert environ["HTTP_X_FORWARDED_HOST"] == [stack.host_of(exposed["exposedAt"])]
    assert environ["HTTP_X_SANDBOX_NAME"] == ["sb1"]
    assert "HTTP_X_REAL_IP" not in environ and "HTTP_X_TUNNEL_INTERNAL" not in environ
    assert "HTTP_MY_CUSTOM_HEADER" not in environ
    assert environ["HTTP_X_KEPT"] == ["yes"]
    assert "6.6.6.6" not in r.text and "evil.example" not in r.text
