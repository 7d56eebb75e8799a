"""docs/operations.md (Limits): "Every refusal of the public side is counted in
`tunneld_public_refusals_total{code}`", the HTTP-to-HTTPS redirect listener's
(`public_redirect_port`) too, with the public side's codes only (a bounded label); its 308s
are no refusal."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trustme

from .conftest import raw_request
from .test_public_tls import redirect_stack

pytestmark = pytest.mark.anyio

REFUSALS = re.compile(r'^tunneld_public_refusals_total\{code="([A-Z_]+)"\} ([0-9.]+)$', re.M)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_the_redirect_listeners_refusals_are_counted_by_code(
    ca: trustme.CA, tmp_path: Path
) -> None:
    async with redirect_stack(ca, tmp_path) as (stack, port):
        expected = {
            # many hosts, one series: the label is the code, never the host
            b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n": b"404",
            b"GET / HTTP/1.1\r\nHost: other.example\r\n\r\n": b"404",
            b"GET http://evil.example/ HTTP/1.1\r\nHost: x.preview.test\r\n\r\n": b"400",
            b"garbage\r\n\r\n": b"400",
            b"GET / HTTP/1.1\r\nHost: x.preview.test\r\nX: " + b"a" * 20_000 + b"\r\n\r\n": b"431",
            b"GET /a HTTP/1.1\r\nHost: x.preview.test\r\n\r\n": b"308",  # no refusal
        }
        for request, status in expected.items():
            answer = await raw_request(port, request)
            assert answer.startswith(b"HTTP/1.1 " + status + b" "), (request[:40], answer)
        stack.edge.config.head_timeout = 0.3
        answer = await raw_request(port, b"GET / HTTP/1.1\r\n")  # a head never finished
        assert answer.startswith(b"HTTP/1.1 408 ")
        text = (await stack.admin.get("/metrics")).text
        counted = {code: float(n) for code, n in REFUSALS.findall(text)}
        assert counted == {
            "UNKNOWN_HOST": 2,
            "BAD_REQUEST": 2,
            "HEADERS_TOO_LARGE": 1,
            "REQUEST_TIMEOUT": 1,
        }, text
