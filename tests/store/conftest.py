"""Store tests: one event loop backend (asyncio) is enough, the store uses threads."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
