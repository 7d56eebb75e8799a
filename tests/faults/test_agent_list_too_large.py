"""A sandbox's largest exposure set: the agent learns all of it, and a ``list`` is ``TOO_LARGE``.

docs/protocol.md, Limits and strictness: a sandbox may hold 128 exposures with names of 256
characters, more than one 64 KiB control message; "the edge puts in the ``welcome`` as many
exposures as fit and sends each of the others right after it as an ``expose`` request ... The
agent's set is complete once those have arrived. A ``list`` reply that does not fit is an
``error`` ``TOO_LARGE``." tests/faults/test_durable_welcome_worst_case.py checks the welcome
with processes; here, in one process, the agent's own set and the ``list`` answer, as a process
in the sandbox sees it through the local API (502, the edge's code relayed as is, no hang and
no lost session).

Real sockets on 127.0.0.1: a real edge (``EdgeServer``), a real agent and its local API.
"""

from __future__ import annotations

import orjson
import pytest

from tests.e2e.conftest import Stack, raw_request, wait_until
from tunneld.config import Config

pytestmark = pytest.mark.anyio

CAP = Config().max_exposures_per_sandbox
NAME = "\u0001" * 256  # 6 bytes each in JSON: 1.5 KiB per exposure


async def test_the_largest_set_reaches_the_agent_and_its_list_is_too_large() -> None:
    stack = await Stack().start()
    try:
        ports = list(range(2000, 2000 + CAP))
        for port in ports:  # made while the agent is offline: they come with its welcome
            await stack.expose("sb1", port, name=NAME)
        agent = await stack.agent("sb1")
        await wait_until(lambda: agent.exposures == set(ports), 10, "every exposure")
        api = await agent.serve_local_api("127.0.0.1", 0)
        try:
            answer = await raw_request(
                api.port, b"GET /v1/ports HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            )
        finally:
            await api.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 502 "), answer[:300]
        assert orjson.loads(body)["code"] == "TOO_LARGE", body
        assert agent.connected  # the refusal ended nothing
        assert agent.exposures == set(ports)  # and took nothing from the agent's set
    finally:
        await stack.close()
