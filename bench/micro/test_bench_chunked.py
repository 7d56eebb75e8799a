"""Chunked request bodies (pytest-benchmark): how fast the public listener finds where one ends.

``ChunkedScanner`` runs on the event loop for every read of a chunked upload, so its cost per byte
bounds how long one client can hold the loop. The hostile case is a body of 1-byte chunks
(``1\\r\\nx\\r\\n``: 6 bytes of framing per byte of data), fed in 64 KiB reads as sockets deliver.

Verdict (2-core machine shared with other jobs, same run, 64 KiB reads): 1-byte chunks went from
0.4 MB/s (per-line ``bytes()`` copies of up to 4 KiB and a Python loop per chunk, issue 7 row 11;
about 3 MB/s on an idle machine) to 21-25 MB/s (one C-level regex match per run of small chunks,
one per larger chunk); 64 KiB chunks scan at memory speed either way (GB/s: data is skipped by
counting, never copied).
"""

from __future__ import annotations

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from tunneld.httphead import ChunkedScanner

READ = 64 * 1024
BODIES = {
    "1-byte-chunks": b"1\r\nx\r\n" * 40_000 + b"0\r\n\r\n",
    "1-byte-chunks-ext": b"1;e=v\r\nx\r\n" * 25_000 + b"0\r\n\r\n",
    "64k-chunks": (b"10000\r\n" + b"x" * 65536 + b"\r\n") * 16 + b"0\r\n\r\n",
}


def _scan(body: memoryview) -> int:
    scanner = ChunkedScanner()
    consumed = 0
    for i in range(0, len(body), READ):
        consumed += scanner.feed(body[i : i + READ])
    assert scanner.done
    return consumed


@pytest.mark.parametrize("body", list(BODIES))
def test_scan_chunked_body(benchmark: BenchmarkFixture, body: str) -> None:
    data = memoryview(BODIES[body])
    benchmark.group = "chunked-scan"
    benchmark.extra_info["bytes"] = len(data)
    assert benchmark(_scan, data) == len(data)
