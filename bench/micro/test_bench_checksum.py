"""What a per-frame checksum would cost, against the frame codec (issue 7, row 3).

Measured to choose between a CRC on every frame and "TLS required off loopback" for the integrity
of the agent link. zlib.crc32 is always there; CRC32C (the ``crc32c`` package, SSE4.2/ARMv8
instructions) is measured when installed. Compare with test_bench_codec.py's
``test_decode_64k_frames`` (64 frames of 64 KiB per round) and ``test_encode_header``.

Verdict (docs/operations.md "Integrity of the agent link", docs/protocol.md): no checksum.
Medians on the shared 2-core machine (2026-12, pytest-benchmark, crc32c 2.9):
  decode 64 frames of 64 KiB         533 us   (8.3 us per frame)
  zlib.crc32 over the same 4 MiB    1284 us   (20 us per frame, ~3.3 GB/s: 2.4x the decode)
  crc32c over the same 4 MiB         233 us   (3.6 us per frame, ~18 GB/s: 0.44x the decode)
  16-byte payload: zlib.crc32 179 ns, crc32c 238 ns (encode_header 571 ns, decode ~3.4 us/frame)
A checksum is affordable with CRC32C (a new dependency) but not with zlib, needs a protocol
version, and only detects accidents TCP's own checksum missed: it protects nothing against a
deliberate change on a path we do not control. TLS (AEAD tag per record) detects both at no
cost to the frame codec, so plaintext agent links are accepted from loopback only, unless
explicitly allowed (--allow-plaintext-agents / --insecure-plaintext).
"""

from __future__ import annotations

import random
import zlib

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from protocol.frames import MAX_FRAME_PAYLOAD

RNG = random.Random(42)
LARGE = RNG.randbytes(MAX_FRAME_PAYLOAD)
SMALL = RNG.randbytes(16)


def _frames_crc32(payload: bytes) -> int:
    crc = 0
    for _ in range(64):  # the same 64 frames a round of test_decode_64k_frames decodes
        crc = zlib.crc32(payload, crc)
    return crc


def test_zlib_crc32_64k_frames(benchmark: BenchmarkFixture) -> None:
    benchmark.extra_info["bytes"] = 64 * len(LARGE)
    benchmark(_frames_crc32, LARGE)


def test_zlib_crc32_16_bytes(benchmark: BenchmarkFixture) -> None:
    benchmark(zlib.crc32, SMALL)


def test_crc32c_64k_frames(benchmark: BenchmarkFixture) -> None:
    crc32c = pytest.importorskip("crc32c")

    def frames(payload: bytes) -> int:
        crc = 0
        for _ in range(64):
            crc = crc32c.crc32c(payload, crc)
        return crc

    benchmark.extra_info["bytes"] = 64 * len(LARGE)
    benchmark(frames, LARGE)


def test_crc32c_16_bytes(benchmark: BenchmarkFixture) -> None:
    crc32c = pytest.importorskip("crc32c")
    benchmark(crc32c.crc32c, SMALL)
