"""Claims of docs/sdk.md checked against a real in-process edge (tests/e2e/conftest.py's Stack):
which exception class each refusal of tunneld becomes, and the class hierarchy of the table."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Stack
from tests.e2e.conftest import no_unhandled_errors as no_unhandled_errors  # autouse there
from tests.e2e.conftest import stack as stack  # a started Stack, closed after
from tunneld.client import (
    AuthenticationError,
    ConflictError,
    ConnectionClosed,
    InvalidPortError,
    InvalidSandboxIdError,
    InvalidTokenError,
    NotFoundError,
    PortNotReadyError,
    SandboxNotConnectedError,
    TunnelClient,
    TunnelConnectionError,
    TunnelError,
    TunnelTimeoutError,
    ValidationError,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the edge under test is asyncio's


def sdk(stack: Stack) -> TunnelClient:
    assert stack.edge is not None
    return TunnelClient(f"http://127.0.0.1:{stack.edge.admin_port}", stack.admin_token)


def test_the_exception_table_s_hierarchy() -> None:
    """docs/sdk.md, Errors: 'ValidationError (also a ValueError) ... (base of the next three)',
    'TunnelTimeoutError (also a TimeoutError)', 'PortNotReadyError (a TunnelTimeoutError)',
    'TunnelConnectionError (also a ConnectionError)', 'ConnectionClosed is not a TunnelError'."""
    assert issubclass(ValidationError, TunnelError) and issubclass(ValidationError, ValueError)
    for cls in (InvalidPortError, InvalidSandboxIdError, InvalidTokenError):
        assert issubclass(cls, ValidationError)
    for cls in (AuthenticationError, NotFoundError, ConflictError, SandboxNotConnectedError):
        assert issubclass(cls, TunnelError) and not issubclass(cls, ValidationError)
    assert issubclass(TunnelTimeoutError, TimeoutError)
    assert issubclass(PortNotReadyError, TunnelTimeoutError)
    assert issubclass(TunnelConnectionError, ConnectionError)
    assert not issubclass(ConnectionClosed, TunnelError)
    assert ConnectionClosed(1000).code == 1000


async def test_every_400_of_tunneld_is_a_validation_error(stack: Stack) -> None:
    """'ValidationError: invalid argument': the refusals the SDK cannot check before the request
    (a name too long, an option the edge has not enabled, a path the edge refuses) come back as
    400s, and were the base TunnelError, not a ValueError."""
    await stack.agent("sb1")
    async with sdk(stack) as client:
        sb = client.sandbox("sb1")
        with pytest.raises(ValidationError) as info:
            await sb.expose_port(8000, name="n" * 257)
        assert (info.value.status, info.value.code) == (400, "INVALID_NAME")
        assert info.value.message == "Port name must be a string of at most 256 characters."
        assert isinstance(info.value, ValueError)
        with pytest.raises(ValidationError) as info:
            await sb.expose_port(8000, protocol="tcp")  # this edge has no public_tcp_ports
        assert (info.value.status, info.value.code) == (400, "TCP_EXPOSURES_DISABLED")
        with pytest.raises(ValidationError) as info:
            await sb.ws_connect(8000, path="/a b")  # starts with '/', but the edge refuses it
        assert (info.value.status, info.value.code) == (400, "INVALID_PATH")
        assert await sb.get_exposed_ports() == []  # nothing was exposed by the refusals


async def test_refusals_of_a_real_edge_get_the_documented_classes(stack: Stack) -> None:
    """The table's other rows, from the real edge rather than the fake admin of test_client.py."""
    await stack.agent("sb1")
    async with sdk(stack) as client:
        sb = client.sandbox("sb1")
        await sb.expose_port(8000, token="shared")
        with pytest.raises(ConflictError) as conflict:
            await sb.expose_port(8001, token="shared")
        assert (conflict.value.status, conflict.value.code) == (409, "TOKEN_IN_USE")
        with pytest.raises(NotFoundError) as missing:
            await sb.request(12345)
        assert (missing.value.status, missing.value.code) == (404, "REQUEST_NOT_FOUND")
        with pytest.raises(SandboxNotConnectedError) as offline:
            await client.sandbox("offline-1").wait_for_port(8000, timeout=1)
        assert offline.value.status == 503
    assert stack.edge is not None
    async with TunnelClient(f"http://127.0.0.1:{stack.edge.admin_port}", "wrong") as anon:
        with pytest.raises(AuthenticationError) as denied:
            await anon.sandbox("sb1").get_exposed_ports()
        assert (denied.value.status, denied.value.code) == (401, "UNAUTHORIZED")
