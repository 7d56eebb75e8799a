"""Event-loop choice, made at the entry points (never on import)."""

from __future__ import annotations

import asyncio
import os


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop unless ``TUNNEL_LOOP=asyncio`` (the tests run both loops against real processes)."""
    if os.environ.get("TUNNEL_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()
