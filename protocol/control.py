"""Control-channel messages (CONTROL frames on stream 0) and their orjson codec.

Theory of operation: a control message is one JSON object, ``{"type": <name>, ...fields}``, with
the fields of the dataclass below in snake_case. The handshake is ``hello`` (agent -> edge, first
frame) answered by ``welcome`` or ``error`` (then close). After that, requests carry an ``id``
chosen by the sender and are answered by ``ok`` or ``error`` with the same ``id``: ``expose`` /
``unexpose`` go both ways (the edge pushes changes made through the admin API; the agent forwards
its local CLI's), and ``list`` asks the edge for the current set. ``watch_port`` (edge -> agent,
only to an agent whose hello says version >= 2) asks the agent to probe a port until it is ready:
``ok`` when it is, ``error`` ``PORT_NOT_READY`` (with the last HTTP ``status_code`` seen, if any)
when ``timeout_s`` passed first. ``unwatch_port {id}`` (edge -> agent, only to an agent whose
hello says version >= 3) stops the watch of that request at once (its client left); it has no
reply. On a node link (two edges of a cluster) the same two messages carry a forwarded wait: the
landing node sends ``watch_port`` with ``sandbox`` set to the owner node, which answers it as the
admin API would and stops it on ``unwatch_port``. Likewise an admin ``expose`` with ``sandbox``
set (node -> owner node): the owner runs it as its own admin API would and answers ``ok`` (the
exposure) or ``error`` (with the HTTP status in ``status_code``).

Every message type is described by one row of ``_SCHEMAS``: wire name, dataclass, and per field a
checker (type + bounds) and whether the field may be absent. :func:`decode_message` checks the
peer's bytes against that table and raises only :class:`ControlError`; :func:`encode_message` runs
the same checks on the outgoing message, so whatever we send, the peer's decoder accepts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

from protocol.hostnames import MAX_PORT_NAME_LENGTH

__all__ = [
    "MAX_CONTROL_MESSAGE_SIZE",
    "MAX_WATCH_TIMEOUT_S",
    "PROTOCOL_VERSION",
    "UNWATCH_PORT_VERSION",
    "WATCH_PORT_VERSION",
    "ControlError",
    "Error",
    "Expose",
    "Exposure",
    "Hello",
    "ListExposures",
    "Message",
    "Ok",
    "Unexpose",
    "UnwatchPort",
    "WatchPort",
    "Welcome",
    "decode_message",
    "encode_message",
]

# A control message is a handful of short fields; the largest is a welcome/ok listing every exposure
# of a sandbox (~150 bytes each, so 64 KiB holds ~400). The cap bounds what a peer can make us
# buffer and parse per frame, and matches h11's and nginx's order of magnitude for a request head.
MAX_CONTROL_MESSAGE_SIZE: Final = 64 * 1024
# The base protocol, a Hello's default version. An agent that serves ``watch_port`` says
# WATCH_PORT_VERSION in its hello: an older agent would take the unknown message for a protocol
# error and drop its session, so the edge sends ``watch_port`` only to an agent that says so.
# UNWATCH_PORT_VERSION likewise for ``unwatch_port``. A hello's version is the highest feature
# level the agent serves; each level includes the ones below it.
PROTOCOL_VERSION: Final = 1
WATCH_PORT_VERSION: Final = 2
UNWATCH_PORT_VERSION: Final = 3

# Request ids are non-negative int32: fit every language's int, never wrap silently.
_MAX_ID: Final = 2**31 - 1
# String bounds, in characters. Generous for what is legitimate, small enough to keep logs sane.
_MAX_SANDBOX_ID: Final = 63  # one DNS label
_MAX_SECRET: Final = 1024  # the agent's auth token (opaque to us: JWT-sized)
_MAX_TOKEN: Final = 63  # a preview token fits one DNS label
_MAX_NAME: Final = MAX_PORT_NAME_LENGTH
_MAX_URL: Final = 2048  # common browser/CDN URL limit
_MAX_SESSION: Final = 128
_MAX_CODE: Final = 64
_MAX_TEXT: Final = 4096  # human error messages
_MAX_LIMITS: Final = 64  # entries in welcome.limits
_MAX_LIMIT_VALUE: Final = 2**63 - 1  # orjson ints are 64-bit
_MAX_EXPOSURES: Final = 1024  # the size cap binds first; this bounds encoding too
_MAX_HEARTBEAT_S: Final = 86400.0
# watch_port bounds: Cloudflare's interval clamp (ms), and the longest wait an agent runs (s).
_MIN_WATCH_INTERVAL_MS: Final = 100
_MAX_WATCH_INTERVAL_MS: Final = 10_000
MAX_WATCH_TIMEOUT_S: Final = 300.0
_MAX_PATH: Final = 2048  # a probe path is one request target: the URL limit


class ControlError(Exception):
    """A control message is invalid. ``code``: MALFORMED, TOO_LARGE, UNKNOWN_TYPE, MISSING_FIELD,
    UNKNOWN_FIELD, BAD_FIELD; ``message`` names the field (``welcome.exposures[2].port``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Exposure:
    port: int
    token: str
    url: str
    name: str | None = None
    # Node links only: in the owner's answer to a forwarded expose, the exposure's public TCP
    # port (a "tcp" exposure's), to a dialer whose hello says the link version that reads it
    # (tunneld.nodelink.PUBLIC_PORT_LINK_VERSION). Never sent to an agent: one from before it
    # would refuse the unknown field.
    public_port: int | None = None


@dataclass(frozen=True, slots=True)
class Hello:
    """agent -> edge, the first frame."""

    sandbox_id: str
    token: str
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Welcome:
    """edge -> agent, handshake accepted; ``exposures`` is the edge's authoritative set."""

    session: str
    heartbeat_s: float
    limits: dict[str, int]
    exposures: tuple[Exposure, ...]


@dataclass(frozen=True, slots=True)
class Expose:
    """Both directions. ``token`` None: keep the existing token or let the edge generate one.

    The options (``protocol`` "http" | "tcp" | "tls", ``proxy_protocol``, ``inspect``) travel
    agent -> edge only, and only when not the default, so an edge or agent that predates them
    reads every plain expose as before; the edge tells an agent about an exposure by its ``url``.
    """

    id: int
    port: int
    name: str | None = None
    token: str | None = None
    protocol: str = "http"
    proxy_protocol: bool = False
    inspect: bool = False
    # Node links only (an admin expose forwarded to the owner node): the sandbox to expose for.
    sandbox: str | None = None


@dataclass(frozen=True, slots=True)
class Unexpose:
    """Both directions."""

    id: int
    port: int


@dataclass(frozen=True, slots=True)
class ListExposures:
    """agent -> edge; answered by ``Ok(id, exposures)``."""

    id: int


@dataclass(frozen=True, slots=True)
class WatchPort:
    """edge -> agent: probe ``port`` until ready (``mode`` "http": ``GET path`` answers with a
    status in ``[status_min, status_max]``; "tcp": a connect succeeds), every ``interval_ms``,
    for at most ``timeout_s``. Answered by ``Ok`` (ready) or ``Error`` (PORT_NOT_READY...)."""

    id: int
    port: int
    mode: str = "http"
    path: str = "/"
    status_min: int = 200
    status_max: int = 399
    interval_ms: int = 500
    timeout_s: float = 30.0
    # Node links only (a wait forwarded to the owner node): the sandbox whose agent to ask.
    sandbox: str | None = None


@dataclass(frozen=True, slots=True)
class UnwatchPort:
    """edge -> agent (and node -> owner node): stop the ``watch_port`` request ``id`` now; no
    reply (an unknown id is ignored: the watch may have just ended)."""

    id: int


@dataclass(frozen=True, slots=True)
class Ok:
    """Reply to the request with the same ``id``."""

    id: int
    exposures: tuple[Exposure, ...] = ()


@dataclass(frozen=True, slots=True)
class Error:
    """Reply to request ``id``, or (``id`` None) a refused handshake / a fatal condition."""

    code: str
    message: str
    id: int | None = None
    # PORT_NOT_READY: the last HTTP status the probe saw (absent: it saw none). On a node link,
    # the reply to a forwarded expose: the HTTP status the owner's admin API answers with.
    status_code: int | None = None


Message = Hello | Welcome | Expose | Unexpose | ListExposures | WatchPort | UnwatchPort | Ok | Error

# --- field checkers ------------------------------------------------------------------------------
# A checker takes (value, path) and returns the value to store, or raises ControlError(BAD_FIELD).

_Checker = Callable[[object, str], Any]


def _bad(path: str, expected: str, value: object) -> ControlError:
    shown = type(value).__name__ if isinstance(value, (dict, list, tuple)) else repr(value)
    if len(shown) > 64:
        shown = shown[:64] + "..."
    return ControlError("BAD_FIELD", f"{path}: expected {expected}, got {shown}")


def _int(lo: int, hi: int) -> _Checker:
    expected = f"an integer in {lo}..{hi}"

    def check(value: object, path: str) -> int:
        # type() is not isinstance(): bool is an int subclass, and true is not a port.
        if type(value) is int and lo <= value <= hi:
            return value
        raise _bad(path, expected, value)

    return check


def _str(lo: int, hi: int) -> _Checker:
    expected = f"a string of {lo}..{hi} characters"

    def check(value: object, path: str) -> str:
        if type(value) is str and lo <= len(value) <= hi:
            return value
        raise _bad(path, expected, value)

    return check


def _optional(inner: _Checker) -> _Checker:
    def check(value: object, path: str) -> Any:
        return None if value is None else inner(value, path)

    return check


def _heartbeat(value: object, path: str) -> float:
    if (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 < value <= _MAX_HEARTBEAT_S
    ):
        return float(value)
    raise _bad(path, f"a number in (0, {_MAX_HEARTBEAT_S:g}]", value)


_limit_key = _str(1, 64)
_limit_value = _int(0, _MAX_LIMIT_VALUE)


def _limits(value: object, path: str) -> dict[str, int]:
    if type(value) is not dict or len(value) > _MAX_LIMITS:
        raise _bad(path, f"an object of at most {_MAX_LIMITS} integer entries", value)
    out: dict[str, int] = {}
    for key, item in value.items():
        _limit_key(key, f"{path} key")
        out[key] = _limit_value(item, f"{path}.{key}")
    return out


def _exposures(value: object, path: str) -> tuple[Exposure, ...]:
    if type(value) is list and len(value) <= _MAX_EXPOSURES:
        return tuple(
            _build(Exposure, _EXPOSURE_FIELDS, item, f"{path}[{i}]") for i, item in enumerate(value)
        )
    if type(value) is tuple and len(value) <= _MAX_EXPOSURES:
        # encode side: the dataclass holds a tuple of Exposure objects
        return tuple(
            _build(Exposure, _EXPOSURE_FIELDS, _exposure_dict(item, f"{path}[{i}]"), f"{path}[{i}]")
            for i, item in enumerate(value)
        )
    raise _bad(path, f"a list of at most {_MAX_EXPOSURES} exposures", value)


_ID = _int(0, _MAX_ID)
_PORT = _int(1, 65535)
_HTTP_STATUS = _int(100, 599)


def _mode(value: object, path: str) -> str:
    if value in ("http", "tcp") and type(value) is str:
        return value
    raise _bad(path, "'http' or 'tcp'", value)


def _protocol(value: object, path: str) -> str:
    if value in ("http", "tcp", "tls") and type(value) is str:
        return value
    raise _bad(path, "'http', 'tcp' or 'tls'", value)


def _bool(value: object, path: str) -> bool:
    if type(value) is bool:
        return value
    raise _bad(path, "true or false", value)


# Fields left off the wire when they hold their default (see Expose).
_WIRE_DEFAULTS: Final[Mapping[str, object]] = {
    "protocol": "http",
    "proxy_protocol": False,
    "inspect": False,
}


def _probe_path(value: object, path: str) -> str:
    # An absolute request target with no whitespace or control characters: it goes into a
    # request line as is.
    if (
        type(value) is str
        and 1 <= len(value) <= _MAX_PATH
        and value.startswith("/")
        and value.isascii()
        and all(" " < c < "\x7f" for c in value)
    ):
        return value
    raise _bad(path, f"an absolute ASCII path of at most {_MAX_PATH} characters", value)


def _watch_timeout(value: object, path: str) -> float:
    if (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 < value <= MAX_WATCH_TIMEOUT_S
    ):
        return float(value)
    raise _bad(path, f"a number in (0, {MAX_WATCH_TIMEOUT_S:g}]", value)


# field name -> (checker, required on the wire). A field with a dataclass default may be absent.
_Fields = Mapping[str, tuple[_Checker, bool]]

_EXPOSURE_FIELDS: Final[_Fields] = {
    "port": (_PORT, True),
    "token": (_str(1, _MAX_TOKEN), True),
    "url": (_str(1, _MAX_URL), True),
    "name": (_optional(_str(0, _MAX_NAME)), False),
    "public_port": (_optional(_PORT), False),
}

_SCHEMAS: Final[Mapping[str, tuple[type[Any], _Fields]]] = {
    "hello": (
        Hello,
        {
            "sandbox_id": (_str(1, _MAX_SANDBOX_ID), True),
            "token": (_str(1, _MAX_SECRET), True),
            "version": (_int(1, _MAX_ID), False),
        },
    ),
    "welcome": (
        Welcome,
        {
            "session": (_str(1, _MAX_SESSION), True),
            "heartbeat_s": (_heartbeat, True),
            "limits": (_limits, True),
            "exposures": (_exposures, True),
        },
    ),
    "expose": (
        Expose,
        {
            "id": (_ID, True),
            "port": (_PORT, True),
            "name": (_optional(_str(0, _MAX_NAME)), False),
            "token": (_optional(_str(1, _MAX_TOKEN)), False),
            "protocol": (_protocol, False),
            "proxy_protocol": (_bool, False),
            "inspect": (_bool, False),
            "sandbox": (_optional(_str(1, _MAX_SANDBOX_ID)), False),
        },
    ),
    "unexpose": (Unexpose, {"id": (_ID, True), "port": (_PORT, True)}),
    "list": (ListExposures, {"id": (_ID, True)}),
    "watch_port": (
        WatchPort,
        {
            "id": (_ID, True),
            "port": (_PORT, True),
            "mode": (_mode, False),
            "path": (_probe_path, False),
            "status_min": (_HTTP_STATUS, False),
            "status_max": (_HTTP_STATUS, False),
            "interval_ms": (_int(_MIN_WATCH_INTERVAL_MS, _MAX_WATCH_INTERVAL_MS), False),
            "timeout_s": (_watch_timeout, False),
            "sandbox": (_optional(_str(1, _MAX_SANDBOX_ID)), False),
        },
    ),
    "unwatch_port": (UnwatchPort, {"id": (_ID, True)}),
    "ok": (Ok, {"id": (_ID, True), "exposures": (_exposures, False)}),
    "error": (
        Error,
        {
            "code": (_str(1, _MAX_CODE), True),
            "message": (_str(0, _MAX_TEXT), True),
            "id": (_optional(_ID), False),
            "status_code": (_optional(_HTTP_STATUS), False),
        },
    ),
}

_TYPE_NAMES: Final[Mapping[type[Any], str]] = {cls: name for name, (cls, _) in _SCHEMAS.items()}


def _build(cls: type[Any], fields: _Fields, obj: object, path: str) -> Any:
    if type(obj) is not dict:
        raise _bad(path, "an object", obj)
    kwargs: dict[str, Any] = {}
    for key, value in obj.items():
        if key == "type" and cls is not Exposure:
            continue
        spec = fields.get(key)
        if spec is None:
            raise ControlError("UNKNOWN_FIELD", f"{path}: unknown field {key[:64]!r}")
        kwargs[key] = spec[0](value, f"{path}.{key}")
    for key, (_, required) in fields.items():
        if required and key not in kwargs:
            raise ControlError("MISSING_FIELD", f"{path}: missing field {key!r}")
    # Absent optional fields and explicit nulls both take the dataclass default.
    return cls(**{k: v for k, v in kwargs.items() if v is not None})


def _exposure_dict(item: object, path: str) -> dict[str, Any]:
    if type(item) is not Exposure:
        raise _bad(path, "an Exposure", item)
    return {
        "port": item.port,
        "token": item.token,
        "url": item.url,
        "name": item.name,
        "public_port": item.public_port,
    }


def _to_dict(name: str, msg: object) -> dict[str, Any]:
    out: dict[str, Any] = {"type": name}
    for key in _SCHEMAS[name][1]:
        value = getattr(msg, key)
        if value is None:
            continue  # optional and unset: leave it off the wire
        if (
            key in _WIRE_DEFAULTS
            and value == _WIRE_DEFAULTS[key]
            and type(value) is type(_WIRE_DEFAULTS[key])
        ):
            continue
        if key == "exposures":
            value = [
                {k: v for k, v in _exposure_dict(e, f"{name}.{key}[{i}]").items() if v is not None}
                for i, e in enumerate(value)
            ]
        out[key] = value
    return out


def decode_message(data: bytes | bytearray | memoryview) -> Message:
    """Parse one control message; raises :class:`ControlError` (nothing else) on any bad input."""
    if len(data) > MAX_CONTROL_MESSAGE_SIZE:
        raise ControlError(
            "TOO_LARGE", f"control message of {len(data)} bytes > {MAX_CONTROL_MESSAGE_SIZE}"
        )
    try:
        obj = orjson.loads(data)
    except (orjson.JSONDecodeError, TypeError) as exc:  # bad JSON, bad UTF-8, odd memoryview
        raise ControlError("MALFORMED", f"not valid JSON: {exc}") from None
    if type(obj) is not dict:
        raise ControlError("MALFORMED", f"expected a JSON object, got {type(obj).__name__}")
    type_name = obj.get("type")
    if type_name is None:
        raise ControlError("MISSING_FIELD", "message: missing field 'type'")
    if type(type_name) is not str:
        raise _bad("message.type", "a string", type_name)
    schema = _SCHEMAS.get(type_name)
    if schema is None:
        raise ControlError("UNKNOWN_TYPE", f"unknown message type {type_name[:64]!r}")
    cls, fields = schema
    message: Message = _build(cls, fields, obj, type_name)
    return message


def encode_message(msg: Message) -> bytes:
    """Serialize ``msg``. Raises :class:`ControlError` if the peer would refuse it (a field out of
    range, an unencodable string, over :data:`MAX_CONTROL_MESSAGE_SIZE`): a local bug, caught here
    rather than as the peer's protocol error."""
    name = _TYPE_NAMES.get(type(msg))
    if name is None:
        raise ControlError("UNKNOWN_TYPE", f"cannot encode {type(msg).__name__}")
    fields = _SCHEMAS[name][1]
    for key, (check, required) in fields.items():
        value = getattr(msg, key)
        if value is None and required:
            raise ControlError("MISSING_FIELD", f"{name}: missing field {key!r}")
        check(value, f"{name}.{key}")
    try:
        data = orjson.dumps(_to_dict(name, msg))
    except orjson.JSONEncodeError as exc:  # e.g. a lone surrogate in a str
        raise ControlError("BAD_FIELD", f"{name}: cannot encode: {exc}") from None
    if len(data) > MAX_CONTROL_MESSAGE_SIZE:
        raise ControlError(
            "TOO_LARGE", f"{name} message of {len(data)} bytes > {MAX_CONTROL_MESSAGE_SIZE}"
        )
    return data
