"""FrameReader: parse frames in place from the fed bytes instead of appending them first?

Question: ``FrameReader.feed()`` appends every read to its ``bytearray`` (copy 1) and each DATA
payload is then sliced out as ``bytes`` (copy 2). When nothing is buffered, frames could be parsed
straight out of the fed memoryview and only an incomplete tail copied into the buffer, saving
copy 1 for bulk transfers. ``InPlaceReader`` below is that variant (briefly the production code);
``FrameReader`` is what protocol/frames.py ships.

Measured with this file (64 MiB through one reader, best of 5, two runs on a quiet machine):

    python -m bench.experiments.inplace_frame_parse    # [MIB], 64 by default
    64 KiB frames in 256 KiB reads:  FrameReader 6.8 / 7.0 ms   InPlaceReader 6.9 / 7.3 ms
    100 B frames in 64 KiB reads:    FrameReader 511 / 506 ms   InPlaceReader 562 / 550 ms

The saved memcpy does not show (bytearray += of 256 KiB costs next to nothing here); the extra
call and tuple per frame cost 8-10 % for small frames. (One quick end-to-end run with
this variant and the coalesced flush together gave 1 MiB GETs 0.25 -> 0.28 x direct; the
micro-benchmark puts none of that on this change.)

Verdict: rejected; the simpler append-then-parse reader stays.
"""

from __future__ import annotations

import sys
import time

from protocol.errors import GoAwayCode, RemoteProtocolError
from protocol.frames import (
    _ALLOWED_FLAGS,
    _CONTROL,
    _DATA,
    _MAX_TYPE,
    _PREFACE_VERSION_INDEX,
    HEADER,
    HEADER_SIZE,
    MAX_CONTROL_PAYLOAD,
    MAX_FRAME_PAYLOAD,
    PREFACE,
    VERSION,
    Frame,
    FrameReader,
    FrameType,
    encode_frame,
)


class InPlaceReader:
    """The rejected variant, verbatim from the commit that tried it."""

    __slots__ = ("_buf", "_ext", "_ext_pos", "_need_preface", "_pos", "_view")

    def __init__(self, *, expect_preface: bool = False) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._view: memoryview | None = None
        self._ext: memoryview | None = None  # fed bytes parsed in place (buffer was empty)
        self._ext_pos = 0
        self._need_preface = expect_preface

    @property
    def buffered(self) -> int:
        """Bytes received but not yet parsed into a frame."""
        ext = self._ext
        return len(self._buf) - self._pos + (len(ext) - self._ext_pos if ext is not None else 0)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._view is not None:
            # a live export would forbid resizing the bytearray
            self._view.release()
            self._view = None
        if self._ext is not None:  # the previous feed was not parsed to the end: keep its rest
            self._buf += self._ext[self._ext_pos :]
            self._ext = None
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        if not self._buf and not self._need_preface:
            self._ext = data if isinstance(data, memoryview) else memoryview(data)
            self._ext_pos = 0
            return
        self._buf += data
        if self._need_preface:
            self._check_preface()

    def _check_preface(self) -> None:
        got = bytes(self._buf[: len(PREFACE)])
        if PREFACE.startswith(got):
            if len(got) == len(PREFACE):
                self._pos = len(PREFACE)
                self._need_preface = False
            return
        n = len(got)
        if (
            n > _PREFACE_VERSION_INDEX
            and got[:_PREFACE_VERSION_INDEX] == PREFACE[:_PREFACE_VERSION_INDEX]
            and got[_PREFACE_VERSION_INDEX] != VERSION
        ):
            raise RemoteProtocolError(
                f"unsupported protocol version {got[_PREFACE_VERSION_INDEX]}",
                GoAwayCode.UNSUPPORTED_VERSION,
            )
        raise RemoteProtocolError("bad preface", GoAwayCode.PROTOCOL_ERROR)

    def next_frame(self) -> Frame | None:
        if self._need_preface:
            return None
        ext = self._ext
        if ext is not None:
            pos = self._ext_pos
            parsed = _parse(ext, pos, len(ext) - pos)
            if parsed is not None:
                self._ext_pos = parsed[1]
                return parsed[0]
            # an incomplete frame (or nothing) is left: it waits in our own buffer
            if pos < len(ext):
                self._buf += ext[pos:]
            self._ext = None
            return None
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < HEADER_SIZE:
            return None
        view = self._view
        if view is None:
            view = self._view = memoryview(buf)
        parsed = _parse(view, pos, avail)
        if parsed is None:
            return None
        self._pos = parsed[1]
        return parsed[0]


def _parse(view: memoryview, pos: int, avail: int) -> tuple[Frame, int] | None:
    """The frame at ``pos`` and where it ends, or None if it is not complete yet."""
    if avail < HEADER_SIZE:
        return None
    version, ftype, flags, stream_id, length = HEADER.unpack_from(view, pos)
    if version != VERSION:
        raise RemoteProtocolError("bad frame version", GoAwayCode.PROTOCOL_ERROR)
    if ftype > _MAX_TYPE:
        raise RemoteProtocolError("unknown frame type", GoAwayCode.PROTOCOL_ERROR)
    if flags & ~_ALLOWED_FLAGS[ftype]:
        raise RemoteProtocolError("flags not allowed on this frame type")
    if ftype in (_DATA, _CONTROL):
        if length > (MAX_FRAME_PAYLOAD if ftype == _DATA else MAX_CONTROL_PAYLOAD):
            raise RemoteProtocolError("frame too large", GoAwayCode.FRAME_TOO_LARGE)
        end = pos + HEADER_SIZE + length
        if avail < HEADER_SIZE + length:
            return None
        payload = view[pos + HEADER_SIZE : end].tobytes() if length else b""
    else:
        end = pos + HEADER_SIZE
        payload = b""
    return Frame(ftype, flags, stream_id, length, payload), end


def run(reader_class: type, reads: list[memoryview]) -> tuple[float, int]:
    reader = reader_class()
    frames = 0
    start = time.perf_counter()
    for chunk in reads:
        reader.feed(chunk)
        while reader.next_frame() is not None:
            frames += 1
    return time.perf_counter() - start, frames


def main(argv: list[str]) -> None:
    """``[MIB]``: bytes through each reader (64 MiB, as measured; a few for a smoke run)."""
    size = int(argv[0]) << 20 if argv else 64 << 20
    for frame_size, read_size in ((64 * 1024, 256 * 1024), (100, 64 * 1024)):
        frame = encode_frame(FrameType.DATA, 0, 2, b"x" * frame_size)
        data = memoryview(frame * (size // len(frame)))
        reads = [data[i : i + read_size] for i in range(0, len(data), read_size)]
        best = {}
        for cls in (FrameReader, InPlaceReader):
            times = []
            for _ in range(5):
                elapsed, frames = run(cls, reads)
                assert frames == size // len(frame)
                times.append(elapsed)
            best[cls.__name__] = min(times)
        print(
            f"{frame_size} B frames in {read_size} B reads: "
            f"FrameReader {best['FrameReader'] * 1000:.1f} ms, "
            f"InPlaceReader {best['InPlaceReader'] * 1000:.1f} ms"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
