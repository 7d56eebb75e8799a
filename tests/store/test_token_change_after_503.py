"""A token change answered 503 "may still be applied" that the store saves after all cuts the
old token's live connections too, as one saved at once does
(tests/e2e/test_token_change_cuts_live_connections.py; docs/architecture.md, step 8).

Before, the registry's late-change hook (``Registry.on_late_change``) told the edge only the new
record, so the edge could not see that the token had changed: a keep-alive connection opened with
the old URL kept reaching the service after the change was saved. A real SqliteStore held up by
another connection's write lock (``_Held`` of test_store_hung_writes.py), an in-process edge and
agent, real sockets on 127.0.0.1.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e.conftest import Stack, read_to_end, wait_until

from .test_store_hung_writes import _Held

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("token", ["fresh", "old"])
async def test_a_token_change_saved_after_its_503_cuts_the_old_urls_connections(
    tmp_path, token: str
) -> None:
    held = _Held(tmp_path / "state")
    stack = Stack()
    stack.store = held.store
    try:
        await stack.start()
        assert stack.admin is not None and stack.edge is not None
        origin = await stack.origin()
        await stack.agent("sb1")
        host = stack.host_of((await stack.expose("sb1", origin.port, token="old"))["exposedAt"])
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.edge.public_port)
        try:
            request = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
            writer.write(request)
            await asyncio.wait_for(reader.readuntil(b"hello from origin"), 10)

            held.hold()
            r = await stack.admin.post(
                "/v1/sandboxes/sb1/ports", json={"port": origin.port, "token": token}
            )
            assert r.status_code == 503 and "may still be applied" in r.json()["error"], r.text
            held.release()  # the write commits: the view follows, and what follows the view

            def saved() -> bool:
                state = stack.edge.registry.get("sb1") if stack.edge else None
                return state is not None and state.exposures[origin.port].token == token

            await wait_until(saved, 15, "the change saved after its 503")
            if token == "old":  # the same token again (a retry): the connection is served
                writer.write(request)
                await asyncio.wait_for(reader.readuntil(b"hello from origin"), 10)
                assert origin.requests == 2
            else:
                assert await read_to_end(reader) == b""  # cut (before: kept open, and served)
                assert origin.requests == 1
        finally:
            writer.close()
    finally:
        held.release()
        await stack.close()
