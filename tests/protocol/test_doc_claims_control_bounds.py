"""Every length and range bound of docs/protocol.md's Messages table, at both of its ends.

The table is what a peer in another language is written from, so each bound it states is read
from the doc itself (the row's text must say it) and then held against the codec: the values at
the bound decode and encode back to the same bytes' message, one step past it is ``BAD_FIELD``
naming the field. tests/protocol/test_control.py checks some of these (a port of 0, an id of
2**31) among its examples; this walks every bound the table states, so a change on either side
(a limit in protocol/control.py, a number in the doc) fails here.

Sans-IO: the codec alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from protocol.control import ControlError, decode_message, encode_message

# Read with ASCII dashes and powers (the doc writes 1\u201363 and 2\u00b3\u00b9\u22121).
DOC = (
    (Path(__file__).parents[2] / "docs" / "protocol.md")
    .read_text()
    .replace("\u2013", "-")
    .replace("\u2212", "-")
    .replace("2\u00b3\u00b9", "2**31")
    .replace("2\u2076\u00b3", "2**63")
)

Fields = dict[str, Any]


def _hello(**kw: Any) -> Fields:
    return {"type": "hello", "sandbox_id": "sb1", "token": "t", **kw}


def _welcome(**kw: Any) -> Fields:
    return {
        "type": "welcome",
        "session": "s",
        "heartbeat_s": 10.0,
        "limits": {},
        "exposures": [],
        **kw,
    }


def _exposure(**kw: Any) -> Fields:
    exposure = {"port": 8000, "token": "t", "url": "u", **kw}
    return {"type": "ok", "id": 1, "exposures": [exposure]}


def _expose(**kw: Any) -> Fields:
    return {"type": "expose", "id": 1, "port": 8000, **kw}


def _error(**kw: Any) -> Fields:
    return {"type": "error", "code": "X", "message": "m", **kw}


# (the table's text for the bound, message builder, field, path named in errors, low, high,
#  kind); "str" bounds count characters, "int" bounds values.
BOUNDS: list[tuple[str, Callable[..., Fields], str, str, int, int, str]] = [
    ("`sandbox_id`: string 1-63", _hello, "sandbox_id", "hello.sandbox_id", 1, 63, "str"),
    ("`token`: string 1-1024", _hello, "token", "hello.token", 1, 1024, "str"),
    ("`version?`: int 1..2**31-1", _hello, "version", "hello.version", 1, 2**31 - 1, "int"),
    ("`session`: string 1-128", _welcome, "session", "welcome.session", 1, 128, "str"),
    ("`port`: int 1..65535", _expose, "port", "expose.port", 1, 65535, "int"),
    ("`name?`: string 0-256", _expose, "name", "expose.name", 0, 256, "str"),
    ("`token?`: string 1-63", _expose, "token", "expose.token", 1, 63, "str"),
    ("`code`: string 1-64", _error, "code", "error.code", 1, 64, "str"),
    ("`message`: string 0-4096", _error, "message", "error.message", 0, 4096, "str"),
    ("`status_code?`: int 100..599", _error, "status_code", "error.status_code", 100, 599, "int"),
    ("{port: int 1..65535", _exposure, "port", "ok.exposures[0].port", 1, 65535, "int"),
    ("token: string 1-63", _exposure, "token", "ok.exposures[0].token", 1, 63, "str"),
    ("url: string 1-2048", _exposure, "url", "ok.exposures[0].url", 1, 2048, "str"),
    ("name?: string 0-256}", _exposure, "name", "ok.exposures[0].name", 0, 256, "str"),
    (
        "Request ids (`id`) are ints from 0 to 2**31-1",
        _expose,
        "id",
        "expose.id",
        0,
        2**31 - 1,
        "int",
    ),
]


def _value(kind: str, n: int) -> object:
    return "é" * n if kind == "str" else n  # a 2-byte character: lengths are in characters


def _refused(fields: Fields) -> ControlError:
    with pytest.raises(ControlError) as info:
        decode_message(orjson.dumps(fields))
    return info.value


@pytest.mark.parametrize(
    ("text", "build", "field", "path", "low", "high", "kind"),
    BOUNDS,
    ids=[f"{b[3]}" for b in BOUNDS],
)
def test_each_documented_bound_is_the_codecs_at_both_ends(
    text: str,
    build: Callable[..., Fields],
    field: str,
    path: str,
    low: int,
    high: int,
    kind: str,
) -> None:
    assert text in DOC, f"docs/protocol.md no longer says {text!r}"
    for n in (low, high):
        message = decode_message(orjson.dumps(build(**{field: _value(kind, n)})))
        assert decode_message(encode_message(message)) == message
    for n in (low - 1, high + 1):
        if kind == "str" and n < 0:
            continue
        err = _refused(build(**{field: _value(kind, n)}))
        assert err.code == "BAD_FIELD", err
        assert err.message.startswith(path), err.message


def test_welcome_limits_bounds() -> None:
    """`limits`: object of at most 64 entries, key string 1-64 → int 0..2**63-1."""
    assert "`limits`: object of at most 64 entries, key string 1-64 → int 0..2**63-1" in DOC
    top = 2**63 - 1
    ok = {f"{'k' * 63}{i:x}"[-64:]: top for i in range(64)}
    assert all(len(k) == 64 for k in ok) and len(ok) == 64
    decoded = decode_message(orjson.dumps(_welcome(limits=ok | {})))
    assert decode_message(encode_message(decoded)) == decoded
    assert decode_message(orjson.dumps(_welcome(limits={"k": 0})))
    refused = [
        {**ok, "one more": 1},  # 65 entries
        {"": 1},  # empty key
        {"k" * 65: 1},  # key too long
        {"k": -1},
        {"k": 1.0},
        {"k": True},
    ]
    for limits in refused:
        err = _refused(_welcome(limits=limits))
        assert err.code == "BAD_FIELD" and err.message.startswith("welcome.limits"), (limits, err)
    # 2**63 is beyond what the codec (and orjson) reads as an int: refused as well, never a crash
    with pytest.raises(ControlError):
        decode_message(orjson.dumps(_welcome(limits={"k": 0})).replace(b"0}", b"%d}" % 2**63))


def test_welcome_heartbeat_bounds() -> None:
    """`heartbeat_s`: number, finite, 0 < h ≤ 86400 (an int is accepted, decoded as a float)."""
    assert "`heartbeat_s`: number, finite, 0 < h ≤ 86400" in DOC
    for h in (86400, 86400.0, 1e-9, 1):
        message = decode_message(orjson.dumps(_welcome(heartbeat_s=h)))
        assert type(message.heartbeat_s) is float and message.heartbeat_s == h  # type: ignore[union-attr]
    for h in (0, 0.0, -1e-9, 86400.000001, 86401):
        err = _refused(_welcome(heartbeat_s=h))
        assert err.code == "BAD_FIELD" and err.message.startswith("welcome.heartbeat_s"), err


def test_the_table_states_no_bound_this_file_does_not_check() -> None:
    """A bound added to the Messages table must be added here: every 'string a-b' and
    'int a..b' of the rows this file covers appears in BOUNDS (or the two tests above)."""
    rows = re.findall(r"^\| `(hello|welcome|expose|error)` \|.*$", DOC, flags=re.MULTILINE)
    assert len(rows) == 4, rows
    table = "\n".join(
        line
        for line in DOC.splitlines()
        if re.match(r"^\| `(hello|welcome|expose|error)` \|", line)
        or line.startswith("An **Exposure** is an object")
    )
    stated = re.findall(r"(?:string \d+-\d+|int \d+\.\.[\d*-]+)", table)
    covered = " ".join(b[0] for b in BOUNDS) + " key string 1-64 → int 0..2**63-1"
    assert len(stated) >= 14, stated
    missing = [s for s in stated if s not in covered]
    assert not missing, missing
