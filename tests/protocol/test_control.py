"""Control messages: round trips, every ControlError code, and fuzzing of the decoder."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.control import (
    MAX_CONTROL_MESSAGE_SIZE,
    PROTOCOL_VERSION,
    ControlError,
    Error,
    Expose,
    Exposure,
    Hello,
    ListExposures,
    Message,
    Ok,
    Unexpose,
    Welcome,
    decode_message,
    encode_message,
)

EXPOSURE = Exposure(8000, "tok_1", "https://8000-abc-tok_1.example.com/", "api")

EXAMPLES: list[tuple[Message, dict[str, Any]]] = [
    (
        Hello("abc123", "secret"),
        {"type": "hello", "sandbox_id": "abc123", "token": "secret", "version": 1},
    ),
    (
        Welcome("s-1", 10.0, {"max_streams": 256}, (EXPOSURE,)),
        {
            "type": "welcome",
            "session": "s-1",
            "heartbeat_s": 10.0,
            "limits": {"max_streams": 256},
            "exposures": [
                {
                    "port": 8000,
                    "token": "tok_1",
                    "url": "https://8000-abc-tok_1.example.com/",
                    "name": "api",
                }
            ],
        },
    ),
    (Expose(1, 8000), {"type": "expose", "id": 1, "port": 8000}),
    (
        Expose(2, 8000, "api", "tok"),
        {"type": "expose", "id": 2, "port": 8000, "name": "api", "token": "tok"},
    ),
    (Unexpose(3, 8000), {"type": "unexpose", "id": 3, "port": 8000}),
    (ListExposures(4), {"type": "list", "id": 4}),
    (Ok(5), {"type": "ok", "id": 5, "exposures": []}),
    (
        Ok(6, (Exposure(9000, "t", "u"),)),
        {"type": "ok", "id": 6, "exposures": [{"port": 9000, "token": "t", "url": "u"}]},
    ),
    (
        Error("INVALID_PORT", "Invalid port number: 80.", 7),
        {"type": "error", "code": "INVALID_PORT", "message": "Invalid port number: 80.", "id": 7},
    ),
    (
        Error("AUTH_FAILED", "bad token"),
        {"type": "error", "code": "AUTH_FAILED", "message": "bad token"},
    ),
]


@pytest.mark.parametrize(("msg", "wire"), EXAMPLES, ids=lambda v: type(v).__name__)
def test_wire_form(msg: Message, wire: dict[str, Any]) -> None:
    data = encode_message(msg)
    assert isinstance(data, bytes)
    assert orjson.loads(data) == wire
    assert decode_message(data) == msg
    assert decode_message(bytearray(data)) == msg
    assert decode_message(memoryview(data)) == msg
    assert decode_message(memoryview(b"xx" + data + b"yy")[2:-2]) == msg


def test_types_cover_every_message() -> None:
    wire_types = {wire["type"] for _, wire in EXAMPLES}
    assert wire_types == {"hello", "welcome", "expose", "unexpose", "list", "ok", "error"}


def test_optional_fields_accept_absence_and_null() -> None:
    assert decode_message(b'{"type":"hello","sandbox_id":"a","token":"t"}') == Hello("a", "t")
    assert Hello("a", "t").version == PROTOCOL_VERSION
    assert decode_message(b'{"type":"expose","id":0,"port":1,"name":null,"token":null}') == Expose(
        0, 1
    )
    assert decode_message(b'{"type":"ok","id":1}') == Ok(1)
    assert decode_message(b'{"type":"error","code":"X","message":"m","id":null}') == Error("X", "m")
    assert decode_message(
        b'{"type":"ok","id":1,"exposures":[{"port":80,"token":"t","url":"u","name":null}]}'
    ) == Ok(1, (Exposure(80, "t", "u"),))


def test_heartbeat_accepts_an_integer() -> None:
    msg = decode_message(
        b'{"type":"welcome","session":"s","heartbeat_s":10,"limits":{},"exposures":[]}'
    )
    assert isinstance(msg, Welcome)
    assert msg.heartbeat_s == 10.0
    assert type(msg.heartbeat_s) is float


def test_messages_are_frozen_and_slotted() -> None:
    for msg, _ in EXAMPLES:
        assert not hasattr(msg, "__dict__")
        first = dataclasses.fields(msg)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(msg, first, 99)


# --- errors --------------------------------------------------------------------------------------


def _code(data: bytes | bytearray | memoryview) -> ControlError:
    with pytest.raises(ControlError) as info:
        decode_message(data)
    err = info.value
    assert err.code in {
        "MALFORMED",
        "TOO_LARGE",
        "UNKNOWN_TYPE",
        "MISSING_FIELD",
        "UNKNOWN_FIELD",
        "BAD_FIELD",
    }
    assert err.message
    assert str(err) == f"{err.code}: {err.message}"
    return err


def _obj(**fields: Any) -> bytes:
    return orjson.dumps(fields)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b"not json",
        b"\xff\xfe",
        b'"\xff"',
        b'{"type":"list","id":1}{}',
        b"NaN",
        b"1e400",
        b"[" * 2000 + b"]" * 2000,
        b'{"type":"hello","sandbox_id":"\xc3","token":"t"}',
    ],
)
def test_malformed(data: bytes) -> None:
    assert _code(data).code == "MALFORMED"


@pytest.mark.parametrize("data", [b"[]", b"1", b'"hello"', b"null", b"true", b'[{"type":"list"}]'])
def test_not_an_object(data: bytes) -> None:
    err = _code(data)
    assert err.code == "MALFORMED"
    assert "object" in err.message


def test_noncontiguous_memoryview_is_malformed_not_a_crash() -> None:
    data = memoryview(b'{"type":"list","id":1}')[::2]
    assert _code(data).code == "MALFORMED"


def test_too_large() -> None:
    padding = "x" * MAX_CONTROL_MESSAGE_SIZE
    err = _code(_obj(type="error", code="X", message=padding))
    assert err.code == "TOO_LARGE"
    # the size check comes before parsing: garbage of that size is TOO_LARGE too
    assert _code(b"\xff" * (MAX_CONTROL_MESSAGE_SIZE + 1)).code == "TOO_LARGE"
    # exactly at the limit is parsed
    msg = b'{"type":"list","id":1}'
    assert decode_message(msg + b" " * (MAX_CONTROL_MESSAGE_SIZE - len(msg))) == ListExposures(1)


def test_unknown_type() -> None:
    err = _code(_obj(type="explode", id=1))
    assert err.code == "UNKNOWN_TYPE"
    assert "explode" in err.message
    assert _code(_obj(type="Hello", sandbox_id="a", token="t")).code == "UNKNOWN_TYPE"


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"id": 1}, "'type'"),
        ({"type": None, "id": 1}, "'type'"),
        ({"type": "hello", "token": "t"}, "'sandbox_id'"),
        ({"type": "hello", "sandbox_id": "a"}, "'token'"),
        ({"type": "welcome", "session": "s", "heartbeat_s": 1, "limits": {}}, "'exposures'"),
        ({"type": "expose", "id": 1}, "'port'"),
        ({"type": "unexpose", "port": 8000}, "'id'"),
        ({"type": "list"}, "'id'"),
        ({"type": "ok"}, "'id'"),
        ({"type": "error", "code": "X"}, "'message'"),
        ({"type": "ok", "id": 1, "exposures": [{"port": 8000, "token": "t"}]}, "'url'"),
    ],
)
def test_missing_field(fields: dict[str, Any], named: str) -> None:
    err = _code(orjson.dumps(fields))
    assert err.code == "MISSING_FIELD"
    assert named in err.message


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"type": "list", "id": 1, "extra": 1}, "'extra'"),
        ({"type": "hello", "sandbox_id": "a", "token": "t", "sandboxId": "a"}, "'sandboxId'"),
        (
            {
                "type": "ok",
                "id": 1,
                "exposures": [{"port": 8000, "token": "t", "url": "u", "x": 1}],
            },
            "ok.exposures[0]",
        ),
        (
            {
                "type": "ok",
                "id": 1,
                "exposures": [{"type": "e", "port": 8, "token": "t", "url": "u"}],
            },
            "'type'",
        ),
    ],
)
def test_unknown_field(fields: dict[str, Any], named: str) -> None:
    err = _code(orjson.dumps(fields))
    assert err.code == "UNKNOWN_FIELD"
    assert named in err.message


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"type": 1}, "message.type"),
        ({"type": ["list"], "id": 1}, "message.type"),
        ({"type": "list", "id": True}, "list.id"),  # bool is not an int
        ({"type": "list", "id": False}, "list.id"),
        ({"type": "list", "id": 1.0}, "list.id"),
        ({"type": "list", "id": "1"}, "list.id"),
        ({"type": "list", "id": -1}, "list.id"),
        ({"type": "list", "id": 2**31}, "list.id"),
        ({"type": "list", "id": 2**64 - 1}, "list.id"),
        ({"type": "list", "id": None}, "list.id"),
        ({"type": "expose", "id": 1, "port": 0}, "expose.port"),
        ({"type": "expose", "id": 1, "port": 65536}, "expose.port"),
        ({"type": "expose", "id": 1, "port": True}, "expose.port"),
        ({"type": "expose", "id": 1, "port": "8000"}, "expose.port"),
        ({"type": "expose", "id": 1, "port": 8000, "name": 5}, "expose.name"),
        ({"type": "expose", "id": 1, "port": 8000, "name": "n" * 257}, "expose.name"),
        ({"type": "expose", "id": 1, "port": 8000, "token": ""}, "expose.token"),
        ({"type": "expose", "id": 1, "port": 8000, "token": "t" * 64}, "expose.token"),
        ({"type": "unexpose", "id": 1, "port": [8000]}, "unexpose.port"),
        ({"type": "hello", "sandbox_id": "", "token": "t"}, "hello.sandbox_id"),
        ({"type": "hello", "sandbox_id": "a" * 64, "token": "t"}, "hello.sandbox_id"),
        ({"type": "hello", "sandbox_id": "a", "token": "t" * 1025}, "hello.token"),
        ({"type": "hello", "sandbox_id": "a", "token": "t", "version": 0}, "hello.version"),
        ({"type": "hello", "sandbox_id": "a", "token": "t", "version": "1"}, "hello.version"),
        ({"type": "hello", "sandbox_id": "a", "token": "t", "version": None}, "hello.version"),
        ({"type": "hello", "sandbox_id": 5, "token": "t"}, "hello.sandbox_id"),
        (
            {"type": "welcome", "session": "s", "heartbeat_s": 0, "limits": {}, "exposures": []},
            "welcome.heartbeat_s",
        ),
        (
            {"type": "welcome", "session": "s", "heartbeat_s": -1, "limits": {}, "exposures": []},
            "welcome.heartbeat_s",
        ),
        (
            {"type": "welcome", "session": "s", "heartbeat_s": True, "limits": {}, "exposures": []},
            "welcome.heartbeat_s",
        ),
        (
            {"type": "welcome", "session": "s", "heartbeat_s": 1e9, "limits": {}, "exposures": []},
            "welcome.heartbeat_s",
        ),
        (
            {"type": "welcome", "session": "s", "heartbeat_s": 1, "limits": [], "exposures": []},
            "welcome.limits",
        ),
        (
            {
                "type": "welcome",
                "session": "s",
                "heartbeat_s": 1,
                "limits": {"a": -1},
                "exposures": [],
            },
            "welcome.limits.a",
        ),
        (
            {
                "type": "welcome",
                "session": "s",
                "heartbeat_s": 1,
                "limits": {"a": 1.5},
                "exposures": [],
            },
            "welcome.limits.a",
        ),
        (
            {
                "type": "welcome",
                "session": "s",
                "heartbeat_s": 1,
                "limits": {"": 1},
                "exposures": [],
            },
            "welcome.limits key",
        ),
        (
            {
                "type": "welcome",
                "session": "s",
                "heartbeat_s": 1,
                "limits": {str(i): i for i in range(65)},
                "exposures": [],
            },
            "welcome.limits",
        ),
        (
            {"type": "welcome", "session": "s", "heartbeat_s": 1, "limits": {}, "exposures": {}},
            "welcome.exposures",
        ),
        (
            {"type": "welcome", "session": "", "heartbeat_s": 1, "limits": {}, "exposures": []},
            "welcome.session",
        ),
        ({"type": "ok", "id": 1, "exposures": [5]}, "ok.exposures[0]"),
        (
            {
                "type": "ok",
                "id": 1,
                "exposures": [
                    {"port": 8000, "token": "t", "url": "u"},
                    {"port": 0, "token": "t", "url": "u"},
                ],
            },
            "ok.exposures[1].port",
        ),
        ({"type": "ok", "id": 1, "exposures": None}, "ok.exposures"),
        ({"type": "error", "code": "", "message": "m"}, "error.code"),
        ({"type": "error", "code": "X", "message": 1}, "error.message"),
        ({"type": "error", "code": "X", "message": "m", "id": -5}, "error.id"),
    ],
)
def test_bad_field(fields: dict[str, Any], named: str) -> None:
    err = _code(orjson.dumps(fields))
    assert err.code == "BAD_FIELD"
    assert err.message.startswith(named + ":"), err.message


def test_bad_field_message_is_bounded() -> None:
    err = _code(orjson.dumps({"type": "list", "id": "9" * 5000}))
    assert len(err.message) < 200
    err = _code(orjson.dumps({"type": "x" * 5000}))
    assert len(err.message) < 200
    err = _code(orjson.dumps({"type": "list", "id": 1, "y" * 5000: 1}))
    assert len(err.message) < 200


def test_huge_integers_are_rejected_not_crashing() -> None:
    assert _code(b'{"type":"list","id":18446744073709551615}').code == "BAD_FIELD"
    # beyond u64 orjson yields a float, beyond a double's range it refuses to parse
    assert _code(b'{"type":"list","id":' + b"9" * 40 + b"}").code == "BAD_FIELD"
    assert _code(b'{"type":"list","id":' + b"9" * 400 + b"}").code == "MALFORMED"


# --- encode --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        Expose(-1, 8000),
        Expose(1, 0),
        Expose(1, True),
        Unexpose(2**31, 8000),
        Hello("", "t"),
        Hello("a", "t", version=0),
        Welcome("s", float("nan"), {}, ()),
        Welcome("s", 1.0, {"a": -1}, ()),
        Welcome("s", 1.0, {}, (Exposure(0, "t", "u"),)),
        Welcome("s", 1.0, {}, ("not an exposure",)),  # type: ignore[arg-type]
        Welcome("s", 1.0, {}, [EXPOSURE]),  # type: ignore[arg-type]
        Ok(1, (Exposure(8000, "t" * 64, "u"),)),
        Error("", "m"),
        Error("X", None),  # type: ignore[arg-type]
        Error("X", "\ud800"),  # lone surrogate: orjson cannot encode it
    ],
)
def test_encode_refuses_what_the_peer_would_refuse(msg: Message) -> None:
    with pytest.raises(ControlError) as info:
        encode_message(msg)
    assert info.value.code in {"BAD_FIELD", "MISSING_FIELD"}


def test_encode_too_large() -> None:
    many = tuple(Exposure(1024 + i, "t" * 63, "u" * 2048) for i in range(40))
    with pytest.raises(ControlError) as info:
        encode_message(Ok(1, many))
    assert info.value.code == "TOO_LARGE"


def test_encode_unknown_type() -> None:
    with pytest.raises(ControlError) as info:
        encode_message(EXPOSURE)  # type: ignore[arg-type]
    assert info.value.code == "UNKNOWN_TYPE"


# --- properties ----------------------------------------------------------------------------------

_ids = st.integers(0, 2**31 - 1)
_ports = st.integers(1, 65535)
_text = st.text(max_size=40)


def _s(lo: int, hi: int) -> st.SearchStrategy[str]:
    return st.text(min_size=lo, max_size=hi)


exposures = st.builds(
    Exposure,
    port=_ports,
    token=_s(1, 63),
    url=_s(1, 80),
    name=st.none() | _s(0, 30),
)
exposure_tuples = st.lists(exposures, max_size=5).map(tuple)

messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Hello, sandbox_id=_s(1, 63), token=_s(1, 100), version=st.integers(1, 2**31 - 1)),
    st.builds(
        Welcome,
        session=_s(1, 128),
        heartbeat_s=st.floats(min_value=0.001, max_value=86400.0) | st.integers(1, 86400),
        limits=st.dictionaries(_s(1, 64), st.integers(0, 2**63 - 1), max_size=5),
        exposures=exposure_tuples,
    ),
    st.builds(
        Expose, id=_ids, port=_ports, name=st.none() | _s(0, 256), token=st.none() | _s(1, 63)
    ),
    st.builds(Unexpose, id=_ids, port=_ports),
    st.builds(ListExposures, id=_ids),
    st.builds(Ok, id=_ids, exposures=exposure_tuples),
    st.builds(Error, code=_s(1, 64), message=_s(0, 200), id=st.none() | _ids),
)


@given(messages)
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_round_trip(msg: Message) -> None:
    data = encode_message(msg)
    assert len(data) <= MAX_CONTROL_MESSAGE_SIZE
    assert decode_message(data) == msg


@given(st.binary(max_size=300))
@settings(max_examples=200)
def test_fuzz_random_bytes(data: bytes) -> None:
    try:
        msg = decode_message(data)
    except ControlError:
        return
    assert decode_message(encode_message(msg)) == msg


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=20,
)
_field_names = st.sampled_from(
    [
        "type",
        "id",
        "port",
        "name",
        "token",
        "url",
        "sandbox_id",
        "version",
        "session",
        "heartbeat_s",
        "limits",
        "exposures",
        "code",
        "message",
        "other",
    ]
)
_type_names = st.sampled_from(["hello", "welcome", "expose", "unexpose", "list", "ok", "error"])
near_messages = st.builds(
    lambda t, fields: {"type": t, **fields},
    _type_names,
    st.dictionaries(_field_names, json_values, max_size=6),
)


@given(json_values | near_messages)
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_random_json(value: Any) -> None:
    data = orjson.dumps(value)
    try:
        msg = decode_message(data)
    except ControlError as err:
        assert err.code in {
            "MALFORMED",
            "UNKNOWN_TYPE",
            "MISSING_FIELD",
            "UNKNOWN_FIELD",
            "BAD_FIELD",
        }
        return
    assert decode_message(encode_message(msg)) == msg


@given(messages, st.data())
@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_mutated_messages(msg: Message, data: st.DataObject) -> None:
    wire = orjson.loads(encode_message(msg))
    key = data.draw(st.sampled_from(sorted(wire)))
    wire[key] = data.draw(json_values)
    try:
        decoded = decode_message(orjson.dumps(wire))
    except ControlError:
        return
    assert decode_message(encode_message(decoded)) == decoded


@given(messages, st.integers(0, 2**16))
@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_truncated_messages(msg: Message, cut: int) -> None:
    data = encode_message(msg)
    cut %= len(data)
    with pytest.raises(ControlError):
        decode_message(data[:cut])
