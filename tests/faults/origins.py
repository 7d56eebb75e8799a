"""Scripted services for the fault tests: each answers the way one test needs (misbehaving on
purpose), on 127.0.0.1 port 0, and is used as ``async with Origin(...) as origin``."""

from __future__ import annotations

import asyncio
from typing import Self


class ScriptedOrigin:
    """Base: a server whose ``serve(reader, writer)`` a subclass writes. Every connection is
    tracked and aborted when the block ends; network errors of a connection end it quietly."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.closing()
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        await self.server.wait_closed()

    def closing(self) -> None:
        """Called first when the block ends (release what connections wait for)."""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            await self.serve(reader, writer)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            if not writer.is_closing():
                writer.close()
