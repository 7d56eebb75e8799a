"""Frame codec micro-benchmarks (pytest-benchmark): header encode, frame decode."""

from __future__ import annotations

import random

from pytest_benchmark.fixture import BenchmarkFixture

from protocol.frames import MAX_FRAME_PAYLOAD, FrameReader, FrameType, encode_frame, pack_header

RNG = random.Random(42)


def test_encode_header(benchmark: BenchmarkFixture) -> None:
    benchmark(pack_header, FrameType.DATA, 0, 12345, MAX_FRAME_PAYLOAD)


def _decode_all(data: bytes) -> int:
    reader = FrameReader()
    reader.feed(data)
    n = 0
    while reader.next_frame() is not None:
        n += 1
    return n


def test_decode_64k_frames(benchmark: BenchmarkFixture) -> None:
    payload = RNG.randbytes(MAX_FRAME_PAYLOAD)
    data = b"".join(encode_frame(FrameType.DATA, 0, 2 * i + 1, payload) for i in range(64))
    benchmark.extra_info["bytes"] = len(data)
    assert benchmark(_decode_all, data) == 64


def test_decode_small_frames(benchmark: BenchmarkFixture) -> None:
    data = b"".join(encode_frame(FrameType.WINDOW_UPDATE, 0, i, length=i) for i in range(1, 4097))
    benchmark.extra_info["bytes"] = len(data)
    assert benchmark(_decode_all, data) == 4096
