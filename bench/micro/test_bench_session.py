"""Session throughput back to back (edge -> agent, acknowledging everything), against a baseline
of copying the same bytes once (``bytes(view)``): the floor of any relay that copies per chunk.

Each round sends ``TOTAL`` bytes in ``chunk``-sized ``send_data`` calls, drains ``data_to_send``
into the peer's ``receive_data``, acknowledges, and returns the credit.
"""

from __future__ import annotations

import random

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from protocol import control
from protocol.events import DataReceived
from protocol.session import Role, Session

TOTAL = 8 * 1024 * 1024
DATA = random.Random(7).randbytes(TOTAL)


def _pair() -> tuple[Session, Session, int]:
    edge, agent = Session(Role.EDGE), Session(Role.AGENT)
    agent.send_control(control.Hello(sandbox_id="bench", token="t"))
    edge.receive_data(b"".join(agent.data_to_send()))
    edge.send_control(control.Welcome(session="s", heartbeat_s=10.0, limits={}, exposures=()))
    agent.receive_data(b"".join(edge.data_to_send()))
    sid = edge.open_stream(8000)
    agent.receive_data(b"".join(edge.data_to_send()))
    agent.accept_stream(sid)
    edge.receive_data(b"".join(agent.data_to_send()))
    edge.events_received()
    agent.events_received()
    return edge, agent, sid


def _transfer(edge: Session, agent: Session, sid: int, chunk: int) -> int:
    view = memoryview(DATA)
    received = 0
    offset = 0
    while received < TOTAL:
        while offset < TOTAL and edge.stream_send_buffered(sid) < 1024 * 1024:
            edge.send_data(sid, view[offset : offset + chunk])
            offset += chunk
        out = edge.data_to_send()
        agent.receive_data(b"".join(out))  # the transport's job: one write of the whole batch
        for ev in agent.events_received():
            if isinstance(ev, DataReceived):
                received += len(ev.data)
                agent.acknowledge(sid, len(ev.data))
        back = agent.data_to_send()
        if back:
            edge.receive_data(b"".join(back))
        edge.events_received()
    return received


@pytest.mark.parametrize("chunk", [64 * 1024, 1024], ids=["64KiB", "1KiB"])
def test_session_throughput(benchmark: BenchmarkFixture, chunk: int) -> None:
    edge, agent, sid = _pair()
    benchmark.extra_info["bytes"] = TOTAL
    benchmark.extra_info["chunk"] = chunk
    result = benchmark.pedantic(_transfer, args=(edge, agent, sid, chunk), rounds=5, iterations=1)
    assert result == TOTAL


def _copy(chunk: int) -> int:
    view = memoryview(DATA)
    n = 0
    for offset in range(0, TOTAL, chunk):
        n += len(bytes(view[offset : offset + chunk]))
    return n


@pytest.mark.parametrize("chunk", [64 * 1024, 1024], ids=["64KiB", "1KiB"])
def test_baseline_bytes_copy(benchmark: BenchmarkFixture, chunk: int) -> None:
    benchmark.extra_info["bytes"] = TOTAL
    benchmark.extra_info["chunk"] = chunk
    assert benchmark.pedantic(_copy, args=(chunk,), rounds=5, iterations=1) == TOTAL
