"""The shared read buffer of the relay.

Theory of operation
-------------------
Every socket of the relay is an ``asyncio.BufferedProtocol``: the loop reads straight into the
buffer that ``get_buffer()`` returns, then calls ``buffer_updated(n)``. Between those two calls no
other callback runs, so one buffer can serve every socket of one event loop: an idle connection
then costs no read buffer at all (10,000 idle WebSockets would otherwise pin 2.5 GB of 256 KiB
buffers).

The catch is ownership. ``buffer_updated`` hands a slice of the buffer to the session and then to
``transport.writelines``. uvloop keeps a *reference* to whatever it could not write at once (it does
not copy; checked here: mutating a queued bytearray changes what the peer receives), and the session
keeps a reference to data still waiting for flow-control credit. So after each read the reader asks
``retained`` holders, and if anyone still points into the buffer it is retired with ``swap()`` and
a fresh one takes its place. The retired buffer lives on exactly as long as those references.
"""

from __future__ import annotations

from typing import Final

# 256 KiB per recv(): large enough that a bulk transfer costs few syscalls and few frames per byte
# (snitun's 4 KiB client reads are a known ceiling), small enough to stay in L2 cache.
READ_SIZE: Final = 256 * 1024


class ReadBuffer:
    """One reusable receive buffer, retired and replaced when a reader leaves references into it."""

    __slots__ = ("_buf", "view")

    def __init__(self, size: int = READ_SIZE) -> None:
        self._buf = bytearray(size)
        self.view = memoryview(self._buf)

    def swap(self) -> None:
        """Retire the current buffer (someone still references it) and start a fresh one."""
        self._buf = bytearray(len(self._buf))
        self.view = memoryview(self._buf)


# One per process is enough: each event loop runs its callbacks one at a time, and the relay runs
# one loop per process.
SHARED: Final = ReadBuffer()
