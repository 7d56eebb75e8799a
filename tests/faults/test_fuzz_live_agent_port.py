"""Fuzzing the live agent port before the hello: random bytes and mutated frames.

Each case connects to the agent port of an in-process edge (whose real agent serves a real
origin) and sends bytes from a seeded ``random.Random``: pure noise, or valid frames built with
``protocol`` (the preface, a ``hello`` with a real agent token, PINGs, WINDOW_UPDATEs, a DATA|SYN)
with bytes flipped, inserted, deleted or cut, a wrong version, unknown types, huge lengths,
hellos with wrong field types, missing or extra fields, long strings, deep JSON, a token of
another sandbox. For every case:

* unless the edge accepted a hello (its ``welcome``), the connection is closed within
  ``handshake_timeout`` (short here) plus slack, never left open;
* what the edge sent parses as frames of the protocol (an agent-side ``Session``);
* no traceback is logged (the autouse ``no_unhandled_errors``);
* afterwards the real agent is still connected and its preview URL answers 200.
"""

from __future__ import annotations

import asyncio
import random

import orjson
import pytest

from protocol import control
from protocol.errors import RemoteProtocolError
from protocol.frames import PREFACE, Flag, FrameType, encode_frame
from protocol.session import ControlReceived, Role, Session
from tests.faults.conftest import Stack
from tunneld.auth import agent_token

from .fuzz_live import converse

pytestmark = pytest.mark.anyio

SEED = 20261206
CASES = 300
PARALLEL = 32
HANDSHAKE = 1.0
DEADLINE = 10.0  # handshake_timeout is 1 s here


def hello_frames(sandbox_id: str, token: str) -> bytes:
    session = Session(Role.AGENT)
    session.send_control(control.Hello(sandbox_id, token))
    return b"".join(bytes(b) for b in session.data_to_send())


def control_frame(payload: bytes) -> bytes:
    return encode_frame(FrameType.CONTROL, 0, 0, payload)


JSON_VALUES: list[object] = [None, True, 0, -1, 2**63, 1.5, "", "x" * 5000, [], {}, "\u0000"]


def bad_hello(rng: random.Random, sandbox_id: str, token: str) -> bytes:
    message = {"type": "hello", "sandbox_id": sandbox_id, "token": token, "version": 3}
    choice = rng.randrange(7)
    if choice == 0:
        message[rng.choice(sorted(message))] = rng.choice(JSON_VALUES)
    elif choice == 1:
        message.pop(rng.choice(sorted(message)))
    elif choice == 2:
        message[rng.choice(["extra", "id", "exposures"])] = rng.choice(JSON_VALUES)
    elif choice == 3:
        message["type"] = rng.choice(["welcome", "expose", "ping", "HELLO", "", "x" * 300])
    elif choice == 4:
        return PREFACE + control_frame(b"[" * 5000 + b"]" * 5000)
    elif choice == 5:
        return PREFACE + control_frame(rng.choice([b"", b"{", b"\xff\xfe", b"null", b"[]", b"1"]))
    else:
        message["token"] = agent_token("not-the-secret", sandbox_id)
    return PREFACE + control_frame(orjson.dumps(message))


def seeds(rng: random.Random, secret: str) -> bytes:
    """A valid or near-valid start of an agent connection."""
    sandbox = rng.choice(["fuzz-a", "fuzz-b"])
    token = agent_token(secret, "fuzz-a" if rng.random() < 0.5 else "sb1")
    choice = rng.randrange(6)
    if choice == 0:
        return hello_frames(sandbox, token)
    if choice == 1:
        return bad_hello(rng, sandbox, token)
    if choice == 2:  # frames other than a hello first
        frames = [
            encode_frame(FrameType.PING, 0, 0, length=7),
            encode_frame(FrameType.WINDOW_UPDATE, 0, 0, length=65536),
            encode_frame(FrameType.DATA, Flag.SYN, 1, orjson.dumps({"port": 8000})),
            encode_frame(FrameType.DATA, 0, 3, b"x" * 100),
            encode_frame(FrameType.GO_AWAY, 0, 0, length=0),
        ]
        return PREFACE + b"".join(rng.sample(frames, rng.randint(1, 3)))
    if choice == 3:
        return rng.randbytes(rng.randint(1, 300))
    if choice == 4:  # a hello, then more hellos or frames right behind it
        return hello_frames(sandbox, token) + control_frame(
            orjson.dumps({"type": "hello", "sandbox_id": sandbox, "token": token})
        )
    return rng.choice(
        [
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + rng.randbytes(40),  # a ClientHello
            PREFACE[:6] + b"\x02\n",  # another version
            PREFACE + encode_frame(rng.randrange(5, 256), 0, 0, b"?"),  # an unknown type
            PREFACE + encode_frame(FrameType.CONTROL, 0, 0, length=2**32 - 1),
            PREFACE + encode_frame(FrameType.DATA, 0, 0, length=70000) + b"d" * 1000,
            PREFACE * 3,
        ]
    )


def mutate(rng: random.Random, data: bytes) -> bytes:
    n = len(data)
    kind = rng.randrange(5)
    if kind == 0:
        i = rng.randrange(n)
        return data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1 :]
    if kind == 1:
        i = rng.randrange(n + 1)
        return data[:i] + rng.randbytes(rng.randint(1, 8)) + data[i:]
    if kind == 2:
        i = rng.randrange(n)
        return data[:i] + data[i + rng.randint(1, 8) :]
    if kind == 3:
        return data[: rng.randrange(n)]
    i = rng.randrange(n)  # a length field or an id: set to an extreme
    return (
        data[:i] + rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f"]) + data[i + 4 :]
    )


class Outcome:
    def __init__(self) -> None:
        self.closed = False
        self.welcomed = False
        self.problem: str | None = None


async def run_case(port: int, data: bytes, half_close: bool, pace: float) -> Outcome:
    out = Outcome()
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    received = bytearray()

    async def send() -> None:
        if pace:
            for i in range(0, len(data), 16):
                writer.write(data[i : i + 16])
                await writer.drain()
                await asyncio.sleep(pace)
        else:
            writer.write(data)
            await writer.drain()
        if half_close and writer.can_write_eof():
            writer.write_eof()

    edge = Session(Role.AGENT)

    def welcomed(chunk: bytes) -> bool:
        edge.receive_data(chunk)
        for event in edge.events_received():
            if isinstance(event, ControlReceived) and isinstance(event.message, control.Welcome):
                out.welcomed = True
        return out.welcomed

    try:
        out.closed = await converse(reader, writer, send, DEADLINE, received, welcomed)
    except RemoteProtocolError as exc:
        out.problem = f"the edge sent what is not the protocol ({exc}): {bytes(received[:200])!r}"
    return out


async def test_hostile_bytes_before_hello_are_closed_at_the_handshake_timeout() -> None:
    stack = await Stack(handshake_timeout=HANDSHAKE).start()
    try:
        assert stack.edge is not None
        origin = await stack.origin()
        await stack.agent("sb1")
        url = (await stack.expose("sb1", origin.port))["exposedAt"]
        rng = random.Random(SEED)
        cases = []
        for i in range(CASES):
            data = seeds(rng, stack.secret)
            for _ in range(rng.choice([0, 1, 1, 2])):
                if data:
                    data = mutate(rng, data)
            pace = 0.05 if rng.random() < 0.1 else 0.0
            cases.append((f"case{i}", data, rng.random() < 0.5, pace))
        limit = asyncio.Semaphore(PARALLEL)

        async def one(name: str, data: bytes, half: bool, pace: float) -> tuple[str, Outcome]:
            async with limit:
                return name, await run_case(stack.edge.agent_port, data, half, pace)  # type: ignore[union-attr]

        results = await asyncio.gather(*(one(*c) for c in cases))
        problems = []
        for (name, outcome), (_, data, _, _) in zip(results, cases, strict=True):
            if not outcome.closed:
                problems.append(f"{name}: open past {DEADLINE} s: {data[:200]!r}")
            if outcome.problem:
                problems.append(f"{name}: {outcome.problem}")
        assert not problems, "\n".join(problems[:30])
        assert any(o.welcomed for _, o in results)  # valid hellos were among them
        assert sum(not o.welcomed for _, o in results) > CASES // 2
        # the real agent kept its session, and its URL works
        async with stack.client(url) as client:
            response = await client.get("/")
        assert response.status_code == 200 and response.content == b"hello from origin"
    finally:
        await stack.close()


@pytest.mark.parametrize("valid_token", [True, False], ids=["valid-token", "wrong-token"])
async def test_a_hello_followed_by_a_bad_frame_in_the_same_read_is_no_traceback(
    valid_token: bool,
) -> None:
    """Found by the fuzzer above: a hello and a malformed frame in one read. The session saw the
    hello, then the bad frame closed it (GO_AWAY) before its events were dispatched; answering
    the hello then raised ``LocalProtocolError("session is closed")`` out of ``buffer_updated``
    (``_refuse`` for a wrong token, ``_send_welcome`` for a valid one): a traceback per
    connection. Now a hello on a closed session is not answered and the connection just ends."""
    stack = await Stack(handshake_timeout=HANDSHAKE).start()
    try:
        assert stack.edge is not None
        token = agent_token(stack.secret if valid_token else "not-the-secret", "fuzz-a")
        data = hello_frames("fuzz-a", token) + encode_frame(FrameType.DATA, 0, 0, length=70000)
        for _ in range(5):
            outcome = await run_case(stack.edge.agent_port, data, half_close=False, pace=0.0)
            assert outcome.closed and not outcome.welcomed and outcome.problem is None
        assert stack.edge.registry.get("fuzz-a") is None  # the sandbox never attached
    finally:
        await stack.close()
