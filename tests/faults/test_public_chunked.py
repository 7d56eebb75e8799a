"""Issue 7 row 11 end to end: a chunked body with a non-HTTP chunk size or a bare LF is refused.

Before, ``0x5``, ``+5``, ``1_0``, `` 5 `` and bare LF line ends were accepted by the edge and
forwarded unchanged, so the service might split the body elsewhere than the edge did. Now the
client gets 400 ``BAD_REQUEST`` (JSON) and the bad bytes never reach the service.
"""

from __future__ import annotations

import orjson
import pytest

from tests.e2e.conftest import any_parser_stack  # noqa: F401 - fixture
from tests.faults.conftest import Stack, raw_request

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    "body",
    [
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"+5\r\nhello\r\n0\r\n\r\n",
        b"1_0\r\n0123456789abcdef\r\n0\r\n\r\n",
        b" 5 \r\nhello\r\n0\r\n\r\n",
        b"5\nhello\n0\n\n",
    ],
    ids=["0x", "plus", "underscore", "spaces", "bare-lf"],
)
async def test_bad_chunk_framing_is_400(any_parser_stack: Stack, body: bytes) -> None:  # noqa: F811
    stack = any_parser_stack
    origin = await stack.origin()
    await stack.agent("sb1")
    exposed = await stack.expose("sb1", origin.port)
    host = stack.host_of(exposed["exposedAt"]).encode()
    assert stack.edge is not None
    head = b"POST /upload HTTP/1.1\r\nHost: " + host + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer = await raw_request(stack.edge.public_port, head + body)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["code"] == "BAD_REQUEST"
    assert b"hello" not in answer and b'"length"' not in answer  # the service never answered
