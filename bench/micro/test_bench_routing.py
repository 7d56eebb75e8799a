"""Routing micro-benchmarks (pytest-benchmark): what the public listener does per request head.

``parse_preview_host`` turns a Host header into (port, sandbox, token); the head parsers turn one
complete request head into a ``RequestHead``: httptools (llhttp, C, the default) vs h11 (pure
Python, the reference). Seeded, typical browser-sized heads.
"""

from __future__ import annotations

import random

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from protocol.hostnames import parse_preview_host
from tunneld.httphead import H11HeadParser, HttptoolsHeadParser

RNG = random.Random(11)
TOKEN = "".join(RNG.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(16))
HOST = f"8000-sb1-{TOKEN}.localhost:8080"

SMALL_HEAD = f"GET /1k HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
BROWSER_HEAD = (
    f"GET /static/app.{RNG.randbytes(8).hex()}.js HTTP/1.1\r\nHost: {HOST}\r\n"
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0 Safari/537.36\r\nAccept: */*\r\nAccept-Language: en-US,en;q=0.9\r\n"
    "Accept-Encoding: gzip, deflate, br\r\nConnection: keep-alive\r\nReferer: "
    f"http://{HOST}/\r\nCookie: session={RNG.randbytes(48).hex()}; theme=dark\r\n"
    "Sec-Fetch-Dest: script\r\nSec-Fetch-Mode: no-cors\r\nSec-Fetch-Site: same-origin\r\n\r\n"
).encode()
HEADS = {"small": SMALL_HEAD, "browser": BROWSER_HEAD}
PARSERS = {"httptools": HttptoolsHeadParser, "h11": H11HeadParser}


def test_parse_preview_host(benchmark: BenchmarkFixture) -> None:
    route = benchmark(parse_preview_host, HOST, "localhost", tokens=True)
    assert route is not None and route.port == 8000 and route.sandbox_id == "sb1"


def test_parse_preview_host_miss(benchmark: BenchmarkFixture) -> None:
    assert benchmark(parse_preview_host, "example.com", "localhost", tokens=True) is None


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("parser", list(PARSERS))
def test_parse_head(benchmark: BenchmarkFixture, parser: str, head: str) -> None:
    p = PARSERS[parser]()
    benchmark.group = f"head-{head}"
    result = benchmark(p.parse, HEADS[head])
    assert result.host == HOST.encode()
