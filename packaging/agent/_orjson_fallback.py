"""The part of orjson the agent uses, on the standard library's ``json``: for ``tunnel-agent.pyz``.

orjson is compiled, so it cannot travel inside a zipapp that must run on any python3 >= 3.11. The
zipapp's ``__main__`` registers this module as ``orjson`` only when no real orjson is importable;
the agent's code (``protocol/``, ``relay/``, ``agent/``) is unchanged and cannot tell the two apart
for what it does with them:

- ``loads(data)`` takes ``bytes``, ``bytearray``, ``memoryview`` or ``str`` and refuses what orjson
  refuses, always with :class:`JSONDecodeError` (a ``json.JSONDecodeError``): input that is not
  UTF-8 or holds a lone surrogate (raw or escaped), ``NaN``/``Infinity``, numbers beyond a double,
  a byte order mark, an empty document, nesting deeper than the interpreter's recursion allows.
  Integers beyond 64 bits become floats, as orjson makes them.
- ``dumps(obj)`` writes the same bytes as ``orjson.dumps(obj)`` for dicts with ``str`` keys, lists,
  tuples, ``str``, ``int`` (64-bit), ``float``, ``bool`` and ``None`` (compact, UTF-8, not ASCII
  escaped) and raises :class:`JSONEncodeError` (a ``TypeError``) for everything orjson refuses
  among those: a lone surrogate, an integer beyond 64 bits, a non-``str`` key, nesting deeper than
  254. Differences, none of which the agent's messages contain: ``NaN``/``inf`` raise here (orjson
  writes ``null``), and the types orjson serializes natively beyond JSON's (dataclasses,
  datetimes, enums other than ``int``/``str`` ones, UUIDs) are refused here.
- No ``option=`` or ``default=`` arguments: the agent passes none.

Cost: a few microseconds more per small message than orjson (docs/agent.md); the agent parses one
small JSON object per preview request (the stream's open metadata), so it is invisible next to the
request itself.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

__all__ = ["JSONDecodeError", "JSONEncodeError", "dumps", "loads"]


class JSONDecodeError(json.JSONDecodeError):
    """As ``orjson.JSONDecodeError``: a ``json.JSONDecodeError``, so a ``ValueError``."""


class JSONEncodeError(TypeError):
    """As ``orjson.JSONEncodeError``: a ``TypeError``."""


_INT64_MIN: Final = -(1 << 63)
_UINT64_MAX: Final = (1 << 64) - 1  # orjson writes and reads unsigned 64-bit integers too
_MAX_DUMPS_DEPTH: Final = 254  # orjson's recursion limit when serializing
_ESCAPED_SURROGATE: Final = re.compile(r"\\u[dD][89a-fA-F]")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"unexpected character, expected a JSON value: {name}")


def _parse_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number is infinity when parsed as double")
    return value


def _parse_int(text: str) -> int | float:
    value = int(text)
    if _INT64_MIN <= value <= _UINT64_MAX:
        return value
    return _parse_float(text)


_DECODER: Final = json.JSONDecoder(
    parse_constant=_refuse_constant, parse_float=_parse_float, parse_int=_parse_int
)
_ENCODER: Final = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False, check_circular=False
)


def _has_surrogate(obj: Any) -> bool:
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(obj, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in obj.items())
    if isinstance(obj, list):
        return any(_has_surrogate(v) for v in obj)
    return False


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Parse one JSON document, as ``orjson.loads``."""
    if isinstance(data, str):
        text = data
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise JSONDecodeError("str is not valid UTF-8: surrogates not allowed", "", 0) from None
    elif isinstance(data, (bytes, bytearray, memoryview)):
        try:
            text = str(data, "utf-8")
        except UnicodeDecodeError as exc:
            raise JSONDecodeError(f"str is not valid UTF-8: {exc.reason}", "", 0) from None
    else:
        raise JSONDecodeError("Input must be bytes, bytearray, memoryview, or str", "", 0)
    if not text.strip(" \t\n\r"):
        raise JSONDecodeError("Input is a zero-length, empty document", text, 0)
    try:
        obj = _DECODER.decode(text)
    except JSONDecodeError:
        raise
    except json.JSONDecodeError as exc:
        raise JSONDecodeError(exc.msg, exc.doc, exc.pos) from None
    except (ValueError, RecursionError) as exc:  # a hook's refusal, too many digits, too deep
        raise JSONDecodeError(str(exc) or type(exc).__name__, text, 0) from None
    if _ESCAPED_SURROGATE.search(text) and _has_surrogate(obj):  # "\ud800" without its pair
        raise JSONDecodeError("no low surrogate in string", text, 0)
    return obj


def _check(obj: Any, depth: int) -> None:
    """Refuse what orjson refuses among JSON's own types, and every other type."""
    if obj is None or isinstance(obj, (str, bool, float)):
        return
    if isinstance(obj, int):
        if not _INT64_MIN <= obj <= _UINT64_MAX:
            raise JSONEncodeError("Integer exceeds 64-bit range")
        return
    if depth >= _MAX_DUMPS_DEPTH:
        raise JSONEncodeError("Recursion limit reached")
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str):
                raise JSONEncodeError("Dict key must be str")
            _check(value, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _check(value, depth + 1)
    else:
        raise JSONEncodeError(f"Type is not JSON serializable: {type(obj).__name__}")


def dumps(obj: Any, /) -> bytes:
    """Serialize ``obj`` to compact UTF-8 JSON, as ``orjson.dumps(obj)``."""
    _check(obj, 0)
    try:
        return _ENCODER.encode(obj).encode("utf-8")
    except UnicodeEncodeError:
        raise JSONEncodeError("str is not valid UTF-8: surrogates not allowed") from None
    except ValueError as exc:  # NaN or infinity
        raise JSONEncodeError(str(exc)) from None
