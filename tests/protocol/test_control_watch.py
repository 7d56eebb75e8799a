"""The ``watch_port`` control message and ``error.status_code``: wire form, bounds, round trips."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.control import (
    MAX_WATCH_TIMEOUT_S,
    PROTOCOL_VERSION,
    WATCH_PORT_VERSION,
    ControlError,
    Error,
    Hello,
    WatchPort,
    decode_message,
    encode_message,
)


def wire(obj: dict[str, Any]) -> bytes:
    return orjson.dumps(obj)


def test_wire_form_with_every_field() -> None:
    msg = WatchPort(7, 8000, "http", "/health", 200, 299, 250, 30.0)
    assert orjson.loads(encode_message(msg)) == {
        "type": "watch_port",
        "id": 7,
        "port": 8000,
        "mode": "http",
        "path": "/health",
        "status_min": 200,
        "status_max": 299,
        "interval_ms": 250,
        "timeout_s": 30.0,
    }
    assert decode_message(encode_message(msg)) == msg


def test_absent_fields_take_cloudflares_defaults() -> None:
    msg = decode_message(wire({"type": "watch_port", "id": 1, "port": 8000}))
    assert msg == WatchPort(1, 8000, "http", "/", 200, 399, 500, 30.0)


def test_watch_port_needs_a_hello_version_above_the_base_protocol() -> None:
    assert WATCH_PORT_VERSION > PROTOCOL_VERSION == Hello("sb", "t").version
    hello = Hello("sb", "t", version=WATCH_PORT_VERSION)
    assert decode_message(encode_message(hello)) == hello


def test_error_carries_the_last_status() -> None:
    msg = Error("PORT_NOT_READY", "Port 8000 was not ready", 3, 503)
    assert orjson.loads(encode_message(msg))["status_code"] == 503
    assert decode_message(encode_message(msg)) == msg
    # Absent when unknown: an older peer's decoder never sees the field on other errors.
    assert "status_code" not in orjson.loads(encode_message(Error("X", "y", 1)))


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"port": 0}, "watch_port.port"),
        ({"port": 70000}, "watch_port.port"),
        ({"mode": "udp"}, "watch_port.mode"),
        ({"mode": 1}, "watch_port.mode"),
        ({"path": "health"}, "watch_port.path"),
        ({"path": ""}, "watch_port.path"),
        ({"path": "/a b"}, "watch_port.path"),
        ({"path": "/a\r\nX: y"}, "watch_port.path"),
        ({"path": "/é"}, "watch_port.path"),
        ({"path": "/" + "a" * 2048}, "watch_port.path"),
        ({"status_min": 99}, "watch_port.status_min"),
        ({"status_max": 600}, "watch_port.status_max"),
        ({"status_max": True}, "watch_port.status_max"),
        ({"interval_ms": 99}, "watch_port.interval_ms"),
        ({"interval_ms": 10_001}, "watch_port.interval_ms"),
        ({"interval_ms": 500.0}, "watch_port.interval_ms"),
        ({"timeout_s": 0}, "watch_port.timeout_s"),
        ({"timeout_s": MAX_WATCH_TIMEOUT_S + 1}, "watch_port.timeout_s"),
        ({"timeout_s": "30"}, "watch_port.timeout_s"),
        ({"timeout_s": True}, "watch_port.timeout_s"),
    ],
)
def test_out_of_bounds_fields_are_refused_both_ways(fields: dict[str, Any], where: str) -> None:
    obj = {"type": "watch_port", "id": 1, "port": 8000, **fields}
    with pytest.raises(ControlError) as exc:
        decode_message(wire(obj))
    assert exc.value.code == "BAD_FIELD" and where in exc.value.message
    values = {k: v for k, v in obj.items() if k != "type"}
    with pytest.raises(ControlError):
        encode_message(WatchPort(**values))


def test_nan_and_infinite_timeouts_are_refused() -> None:
    for value in (float("nan"), float("inf")):
        with pytest.raises(ControlError):
            encode_message(WatchPort(1, 8000, timeout_s=value))
    with pytest.raises(ControlError) as exc:
        decode_message(b'{"type":"watch_port","id":1,"port":8000,"timeout_s":1e999}')
    assert exc.value.code in ("BAD_FIELD", "MALFORMED")


def test_missing_and_unknown_fields() -> None:
    with pytest.raises(ControlError) as exc:
        decode_message(wire({"type": "watch_port", "id": 1}))
    assert exc.value.code == "MISSING_FIELD"
    with pytest.raises(ControlError) as exc:
        decode_message(wire({"type": "watch_port", "id": 1, "port": 8000, "processId": "x"}))
    assert exc.value.code == "UNKNOWN_FIELD"
    with pytest.raises(ControlError) as exc:
        decode_message(wire({"type": "error", "code": "X", "message": "", "status_code": 42}))
    assert exc.value.code == "BAD_FIELD"


_paths = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=0, max_size=100
).map(lambda s: "/" + s)

watch_ports = st.builds(
    WatchPort,
    id=st.integers(0, 2**31 - 1),
    port=st.integers(1, 65535),
    mode=st.sampled_from(["http", "tcp"]),
    path=_paths,
    status_min=st.integers(100, 599),
    status_max=st.integers(100, 599),
    interval_ms=st.integers(100, 10_000),
    timeout_s=st.floats(min_value=0.001, max_value=MAX_WATCH_TIMEOUT_S),
)


@given(watch_ports)
def test_round_trip(msg: WatchPort) -> None:
    data = encode_message(msg)
    assert decode_message(data) == msg
    assert decode_message(bytearray(data)) == msg


@given(watch_ports, st.integers(0, 200))
def test_truncated_is_malformed_never_another_exception(msg: WatchPort, cut: int) -> None:
    data = encode_message(msg)
    cut = min(cut, len(data) - 1)
    with pytest.raises(ControlError):
        decode_message(data[:cut])
