"""``Sandbox.requests()`` keeps the inspection state tunneld answers with the records
(``inspect``, ``last``, ``skipped``: a :class:`RequestList`), which ``tunneld inspect`` needs to say
that nothing is being recorded; checked against a real in-process edge, and a malformed answer
against the fake admin of tests/sdk/conftest.py."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Stack, wait_until
from tests.e2e.conftest import no_unhandled_errors as no_unhandled_errors  # autouse there
from tests.e2e.conftest import stack as stack  # a started Stack, closed after
from tunneld.client import RequestList, TunnelClient, TunnelError

from .conftest import ADMIN_TOKEN, FakeAdmin

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the edge under test is asyncio's


async def test_requests_carry_the_inspection_state_of_the_answer(stack: Stack) -> None:
    assert stack.edge is not None
    origin = await stack.origin()
    await stack.agent("sb1")
    async with TunnelClient(f"http://127.0.0.1:{stack.edge.admin_port}", stack.admin_token) as c:
        sb = c.sandbox("sb1")
        plain = await sb.expose_port(origin.port)
        rows = await sb.requests()
        assert isinstance(rows, RequestList) and isinstance(rows, list)
        assert rows == [] and (rows.inspect, rows.last, rows.skipped) == (False, 0, 0)
        # an exposure's inspect records its port; the sandbox switch stays off, as the edge says
        other = await stack.origin()
        await sb.expose_port(other.port, inspect=True)
        assert (await sb.requests()).inspect is False
        assert await sb.set_inspection(True) is True
        async with stack.client(plain.url) as preview:
            assert (await preview.get("/?recorded")).status_code == 200
        ring = stack.edge.inspector.ring("sb1")
        await wait_until(lambda: ring is not None and ring.records, 5, "a record")
        rows = await sb.requests()
        assert [r["target"] for r in rows] == ["/?recorded"]
        assert (rows.inspect, rows.last, rows.skipped) == (True, rows[0]["id"], 0)
        newer = await sb.requests(since=rows.last)
        assert newer == [] and (newer.inspect, newer.last) == (True, rows.last)
        await sb.set_inspection(False)
        rows = await sb.requests()  # the records stay readable, the switch says off
        assert len(rows) == 1 and rows.inspect is False


@pytest.mark.parametrize(
    "body",
    [
        b'{"sandbox":"abc123","requests":[]}',
        b'{"sandbox":"abc123","inspect":"no","last":0,"skipped":0,"requests":[]}',
        b'{"sandbox":"abc123","inspect":false,"last":null,"skipped":0,"requests":[]}',
    ],
    ids=["no-inspect", "inspect-not-bool", "last-not-int"],
)
async def test_an_answer_without_the_inspection_state_is_a_bad_response(
    fake_admin: FakeAdmin, body: bytes
) -> None:
    fake_admin.next_error = (200, body, "application/json")
    async with TunnelClient(fake_admin.url, token=ADMIN_TOKEN, timeout=5.0) as client:
        with pytest.raises(TunnelError) as info:
            await client.sandbox("abc123").requests()
    assert info.value.code == "BAD_RESPONSE"
    assert "malformed inspection state" in info.value.message
