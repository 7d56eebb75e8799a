"""Request/reply matching on the control channel (``Expose``, ``Unexpose``, ``ListExposures``
are answered by ``Ok`` or ``Error`` carrying the same id)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

from protocol.control import Error, Ok

from .httpapi import ApiError

# Ids wrap below 2**31 (the control codec's bound) and skip 0.
_MAX_ID: Final = 2**31 - 1


class ControlRequestError(ApiError):
    """The peer answered a request with ``Error``, or the session went away first.

    An :class:`relay.httpapi.ApiError`: ``code`` and ``message`` are the peer's; the status is 502
    (an upstream refused, as any proxy relays it) unless the caller maps the code itself."""

    def __init__(self, code: str, message: str, status: int = 502) -> None:
        super().__init__(status, code, message)


OnOk = Callable[[Ok], None]


class PendingRequests:
    """Requests waiting for their reply, by id. ``on_ok`` callbacks run synchronously when the
    reply is read, before the waiting coroutine resumes: state that later frames of the same
    read depend on (the agent's exposure set) is applied in order."""

    __slots__ = ("_loop", "_next", "_waiting")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._next = 0
        self._waiting: dict[int, tuple[asyncio.Future[Ok], OnOk | None]] = {}

    def new(self, on_ok: OnOk | None = None) -> tuple[int, asyncio.Future[Ok]]:
        self._next = self._next % _MAX_ID + 1
        future: asyncio.Future[Ok] = self._loop.create_future()
        self._waiting[self._next] = (future, on_ok)
        return self._next, future

    def forget(self, request_id: int) -> None:
        self._waiting.pop(request_id, None)

    def resolve(self, reply: Ok | Error) -> bool:
        """Complete the matching request; False when nobody waits for this id."""
        if reply.id is None:
            return False
        waiting = self._waiting.pop(reply.id, None)
        if waiting is None or waiting[0].done():
            return False
        future, on_ok = waiting
        if isinstance(reply, Ok):
            if on_ok is not None:
                on_ok(reply)
            future.set_result(reply)
        else:
            future.set_exception(ControlRequestError(reply.code, reply.message))
        return True

    def fail_all(self, code: str, message: str) -> None:
        waiting, self._waiting = self._waiting, {}
        for future, _ in waiting.values():
            if not future.done():
                future.set_exception(ControlRequestError(code, message))

    def __len__(self) -> int:
        return len(self._waiting)
