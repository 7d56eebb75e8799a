"""Request inspection: what a preview URL served, per sandbox, in a bounded ring (like ngrok's
inspector).

Theory of operation
-------------------
Inspection is opt-in: per sandbox at runtime (``PUT /v1/sandboxes/{id}/inspect``, this node's
state) or per exposure (``inspect: true``, stored with the exposure). The decision is made once
per client connection, when its first request is routed (``Inspector.wants``): a connection that
is not inspected never reaches this module, so a request costs nothing extra when inspection is
off. An inspected connection takes the access log's path (``tunneld/accesslog.py``
``ConnectionLog`` and the sans-IO ``ResponseFramer``), which calls the recorder API:

    record = inspector.begin(sandbox_id, port, client, method, target, version, headers, ...)
    record.request_body(data)          # as the body is relayed (wire bytes, chunk framing too)
    record.response_head(status, headers)
    record.response_body(data)
    inspector.end(record, status, outcome, note)   # complete | aborted | edge | unfollowed

``begin`` returns None when the record cannot be taken (the sandbox is not inspected any more, or
the memory bound is reached with only live records to evict); callers then skip the request.
The API takes parsed pieces, not HTTP/1 bytes, so an HTTP/2 front end can call it as well.

Bounds: each sandbox keeps its last ``max_requests`` completed records (the oldest is evicted),
each body is kept up to ``body_bytes`` (then ``truncated``), heads are at most the parsers'
limits (32 KiB request, 64 KiB response), and all records of all sandboxes, live ones included,
count against one ``max_bytes`` budget: when a new piece does not fit, the oldest completed
records anywhere are evicted first; a live record that still does not fit stops capturing its
body (``truncated``). Headers that carry credentials are replaced by ``[redacted]`` when they are
captured (``redact``), so the secret is never held in memory.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs

if TYPE_CHECKING:
    from relay.httpapi import Response

    from .edge import EdgeServer
    from .httphead import RequestHead
    from .registry import ExposureRecord

log = logging.getLogger("tunneld.inspect")

__all__ = [
    "REDACTED",
    "REDACTED_HEADERS",
    "ConnectionRecorder",
    "Inspector",
    "Record",
    "SandboxRing",
    "handle_admin",
    "parse_response_head",
]

# Header names whose values are replaced when ``redact`` is on (lowercase).
REDACTED_HEADERS: Final = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie"}
)
REDACTED: Final = "[redacted]"
# A connection pipelining requests without reading answers: past this many unanswered inspected
# requests on one connection, further requests on it are not recorded (counted as skipped).
MAX_LIVE_PER_CONNECTION: Final = 16
# Sandboxes with a ring on this node (switched on, holding records, or long-polled). Records are
# bounded by inspect_max_bytes; this bounds the rings themselves, which an admin client could
# otherwise create for any number of sandbox ids with PUT .../inspect (409 past it).
MAX_INSPECTED_SANDBOXES = 10_000
# Fixed bookkeeping per record counted against max_bytes (the objects, not only the bytes).
_RECORD_OVERHEAD: Final = 512

Headers = list[tuple[str, str]]


def _headers(pairs: Iterable[tuple[bytes | str, bytes | str]], redact: bool) -> Headers:
    out: Headers = []
    for name, value in pairs:
        n = name.decode("latin-1") if isinstance(name, bytes) else name
        v = value.decode("latin-1") if isinstance(value, bytes) else value
        if redact and n.lower() in REDACTED_HEADERS:
            v = REDACTED
        out.append((n, v))
    return out


def _headers_size(headers: Headers) -> int:
    return sum(len(n) + len(v) + 4 for n, v in headers)


def parse_response_head(raw: bytes) -> tuple[int, str, list[tuple[bytes, bytes]]]:
    """(status, reason, header pairs) of a response head the ResponseFramer validated."""
    lines = raw.rstrip(b"\r\n").split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    status = int(parts[1])
    reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name, value.strip(b" \t")))
    return status, reason, headers


def _body_json(body: bytearray, size: int, truncated: bool) -> dict[str, Any]:
    data = bytes(body)
    try:
        text, encoding = data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(data).decode("ascii"), "base64"
    return {
        "body": text,
        "bodyEncoding": encoding,
        "bodySize": size,
        "bodyCaptured": len(data),
        "bodyTruncated": truncated,
    }


class Record:
    """One inspected request and its response (see the module docstring for the API)."""

    __slots__ = (
        "_inspector",
        "client",
        "duration",
        "id",
        "live",
        "method",
        "note",
        "outcome",
        "port",
        "req_body",
        "req_headers",
        "req_size",
        "req_truncated",
        "request_id",
        "resp_body",
        "resp_headers",
        "resp_reason",
        "resp_size",
        "resp_truncated",
        "ring",
        "sandbox_id",
        "scheme",
        "started",
        "started_wall",
        "status",
        "target",
        "ttfb",
        "used",
        "version",
    )

    def __init__(self, inspector: Inspector, ring: SandboxRing, record_id: int) -> None:
        self._inspector = inspector
        self.ring = ring
        self.id = record_id
        self.sandbox_id = ring.sandbox_id
        self.port = 0
        self.client = ""
        self.scheme = "http"
        self.method = ""
        self.target = ""
        self.version = "1.1"
        self.request_id = ""
        self.req_headers: Headers = []
        self.req_body = bytearray()
        self.req_size = 0
        self.req_truncated = False
        self.status: int | None = None
        self.resp_reason = ""
        self.resp_headers: Headers | None = None
        self.resp_body = bytearray()
        self.resp_size = 0
        self.resp_truncated = False
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.ttfb: float | None = None
        self.duration: float | None = None
        self.outcome = "live"  # live -> complete | aborted | edge
        self.note: str | None = None
        self.live = True
        self.used = _RECORD_OVERHEAD  # bytes counted against the inspector's max_bytes

    # -- recorder API ----------------------------------------------------------------------------
    def request_body(self, data: bytes | memoryview) -> None:
        n = len(data)
        self.req_size += n
        if self.req_truncated or not self.live:
            return
        self.req_truncated = not self._capture(self.req_body, data)

    def response_head(
        self, status: int, headers: Iterable[tuple[bytes | str, bytes | str]], reason: str = ""
    ) -> None:
        if not self.live:
            return
        if self.ttfb is None:
            self.ttfb = time.monotonic() - self.started
        self.status = status
        self.resp_reason = reason
        captured = _headers(headers, self._inspector.redact)
        self._inspector._charge(self, _headers_size(captured))
        self.resp_headers = captured

    def response_head_raw(self, raw: bytes) -> None:
        """``response_head`` from an HTTP/1 head the ResponseFramer validated."""
        if self.live:
            status, reason, headers = parse_response_head(raw)
            self.response_head(status, headers, reason)

    def response_body(self, data: bytes | memoryview) -> None:
        self.resp_size += len(data)
        if self.resp_truncated or not self.live:
            return
        self.resp_truncated = not self._capture(self.resp_body, data)

    def _capture(self, into: bytearray, data: bytes | memoryview) -> bool:
        """Keep what fits of ``data`` in the body cap and the memory budget; False: truncated."""
        room = self._inspector.body_bytes - len(into)
        take = min(room, len(data))
        if take > 0:
            take = self._inspector._charge(self, take, partial=True)
            into += data[:take]
        return take == len(data)

    # -- views -----------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "sandbox": self.sandbox_id,
            "port": self.port,
            "time": self.started_wall,
            "client": self.client,
            "method": self.method,
            "target": self.target,
            "status": self.status,
            "state": self.outcome,
            "requestBytes": self.req_size,
            "responseBytes": self.resp_size,
            "durationMs": None if self.duration is None else round(self.duration * 1000, 3),
            "ttfbMs": None if self.ttfb is None else round(self.ttfb * 1000, 3),
            "requestId": self.request_id,
            "note": self.note,
        }

    def to_json(self) -> dict[str, Any]:
        out = self.summary()
        out["scheme"] = self.scheme
        out["request"] = {
            "method": self.method,
            "target": self.target,
            "httpVersion": self.version,
            "headers": [list(h) for h in self.req_headers],
            **_body_json(self.req_body, self.req_size, self.req_truncated),
        }
        if self.resp_headers is None:
            out["response"] = None
        else:
            out["response"] = {
                "status": self.status,
                "reason": self.resp_reason,
                "headers": [list(h) for h in self.resp_headers],
                **_body_json(self.resp_body, self.resp_size, self.resp_truncated),
            }
        return out


class SandboxRing:
    """One sandbox's completed records, oldest first, at most ``max_requests`` of them."""

    __slots__ = ("enabled", "records", "sandbox_id", "skipped", "waiters")

    def __init__(self, sandbox_id: str) -> None:
        self.sandbox_id = sandbox_id
        self.enabled = False  # the per-sandbox runtime toggle
        self.records: OrderedDict[int, Record] = OrderedDict()
        self.skipped = 0  # requests not recorded (memory bound, pipelining bound)
        self.waiters: list[asyncio.Future[None]] = []

    def since(self, after: int) -> list[Record]:
        return [r for rid, r in self.records.items() if rid > after]

    def _wake(self) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class Inspector:
    """Every sandbox's ring on this node and the shared memory budget (one per EdgeServer)."""

    __slots__ = (
        "_next_id",
        "_order",
        "body_bytes",
        "max_bytes",
        "max_requests",
        "redact",
        "rings",
        "used",
    )

    def __init__(
        self,
        *,
        max_requests: int = 100,
        body_bytes: int = 16 * 1024,
        max_bytes: int = 64 * 1024 * 1024,
        redact: bool = True,
    ) -> None:
        self.max_requests = max_requests
        self.body_bytes = body_bytes
        self.max_bytes = max_bytes
        self.redact = redact
        self.rings: dict[str, SandboxRing] = {}
        self.used = 0  # bytes of every record held, live or completed
        self._order: OrderedDict[int, Record] = OrderedDict()  # completed records, oldest first
        self._next_id = 1

    # -- toggles ---------------------------------------------------------------------------------
    def enabled(self, sandbox_id: str) -> bool:
        ring = self.rings.get(sandbox_id)
        return ring is not None and ring.enabled

    def set_enabled(self, sandbox_id: str, on: bool) -> None:
        ring = self.rings.get(sandbox_id)
        if on:
            if ring is None:
                ring = self.rings[sandbox_id] = SandboxRing(sandbox_id)
            ring.enabled = True
        elif ring is not None:
            ring.enabled = False
            self._forget_if_empty(ring)

    def wants(self, sandbox_id: str, exposure: ExposureRecord | None = None) -> SandboxRing | None:
        """The ring a new connection to ``sandbox_id`` records into, or None (not inspected).
        Called once per connection; ``exposure`` is the registry's record of the port (its
        ``inspect`` flag turns inspection on for that port only)."""
        ring = self.rings.get(sandbox_id)
        if ring is not None and ring.enabled:
            return ring
        if exposure is not None and exposure.options.inspect:
            if ring is None:
                ring = self.rings[sandbox_id] = SandboxRing(sandbox_id)
            return ring
        return None

    # -- recorder API ----------------------------------------------------------------------------
    def begin(
        self,
        ring: SandboxRing,
        *,
        port: int,
        client: str,
        method: bytes | str,
        target: bytes | str,
        version: bytes | str,
        headers: Sequence[tuple[bytes | str, bytes | str]],
        request_id: bytes | str = "",
        scheme: str = "http",
    ) -> Record | None:
        """A request is forwarded on an inspected connection: its record, or None (skipped)."""
        captured = _headers(headers, self.redact)
        size = _RECORD_OVERHEAD + _headers_size(captured) + len(target) + len(method)
        if not self._make_room(size):
            ring.skipped += 1
            return None
        record = Record(self, ring, self._next_id)
        self._next_id += 1
        record.used = size
        self.used += size
        record.port = port
        record.client = client
        record.scheme = scheme
        record.method = method.decode("latin-1") if isinstance(method, bytes) else method
        record.target = target.decode("latin-1") if isinstance(target, bytes) else target
        record.version = version.decode("latin-1") if isinstance(version, bytes) else version
        record.request_id = (
            request_id.decode("ascii") if isinstance(request_id, bytes) else request_id
        )
        record.req_headers = captured
        return record

    def end(
        self, record: Record, status: int | None, outcome: str, note: str | None = None
    ) -> None:
        """The request is over and goes into its sandbox's ring. ``outcome``: ``complete`` (its
        response ended where its framing says), ``aborted`` (reset, cut short, never answered),
        ``edge`` (the edge answered it with an error page: ``status``), ``unfollowed`` (the
        response could not be framed; its bytes were relayed as they came)."""
        if not record.live:
            return
        record.live = False
        record.duration = time.monotonic() - record.started
        if status is not None:
            record.status = status
        record.outcome = outcome
        record.note = note
        ring = self.rings.setdefault(record.sandbox_id, record.ring)
        record.ring = ring  # its ring was forgotten meanwhile (switched off and emptied)
        ring.records[record.id] = record
        self._order[record.id] = record
        while len(ring.records) > self.max_requests:
            _, old = ring.records.popitem(last=False)
            self._drop(old)
        if self.used > self.max_bytes:
            self._make_room(0)
        ring._wake()

    def skip(self, ring: SandboxRing) -> None:
        ring.skipped += 1

    # -- reading ---------------------------------------------------------------------------------
    def ring(self, sandbox_id: str) -> SandboxRing | None:
        return self.rings.get(sandbox_id)

    def get(self, sandbox_id: str, record_id: int) -> Record | None:
        ring = self.rings.get(sandbox_id)
        return None if ring is None else ring.records.get(record_id)

    async def wait_newer(self, sandbox_id: str, after: int, timeout: float) -> list[Record]:
        """Records newer than ``after``, waiting up to ``timeout`` s for one (long-poll)."""
        ring = self.rings.get(sandbox_id)
        found = ring.since(after) if ring is not None else []
        if found or timeout <= 0:
            return found
        if ring is None:  # nothing inspected yet: wait in a ring that records may come to
            ring = self.rings[sandbox_id] = SandboxRing(sandbox_id)
        waiter = asyncio.get_running_loop().create_future()
        ring.waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            pass
        finally:
            if waiter in ring.waiters:
                ring.waiters.remove(waiter)
            self._forget_if_empty(ring)
        return ring.since(after)

    # -- memory ----------------------------------------------------------------------------------
    def _charge(self, record: Record, n: int, *, partial: bool = False) -> int:
        """Count ``n`` more bytes for ``record``; returns how many fit (all or, for a body piece
        with ``partial``, what is left of the budget after evicting completed records)."""
        if not self._make_room(n):
            n = max(0, self.max_bytes - self.used) if partial else n
        record.used += n
        self.used += n
        return n

    def _make_room(self, n: int) -> bool:
        """Evict the oldest completed records until ``n`` more bytes fit; False if they cannot."""
        order = self._order
        while self.used + n > self.max_bytes and order:
            _, old = order.popitem(last=False)
            old.ring.records.pop(old.id, None)
            self._drop(old)
        return self.used + n <= self.max_bytes

    def _drop(self, record: Record) -> None:
        self._order.pop(record.id, None)
        self.used -= record.used
        record.used = 0
        self._forget_if_empty(record.ring)

    def _forget_if_empty(self, ring: SandboxRing) -> None:
        empty = not ring.enabled and not ring.records and not ring.waiters
        if empty and self.rings.get(ring.sandbox_id) is ring:
            del self.rings[ring.sandbox_id]

    def discard(self, record: Record) -> None:
        """A live record that will never end (its connection object is gone): free its bytes."""
        if record.live:
            record.live = False
            self.used -= record.used
            record.used = 0


class ConnectionRecorder:
    """What an inspected connection records into (``ConnectionLog.recorder``). An HTTP/2 stream
    (tunneld/h2public.py) is relayed as an HTTP/1.1 request built from its pseudo-headers:
    ``version`` ("2") then says what the client spoke, not the parsed head's "1.1"."""

    __slots__ = ("client", "inspector", "live", "port", "ring", "scheme", "version")

    def __init__(
        self,
        inspector: Inspector,
        ring: SandboxRing,
        port: int,
        client: str,
        scheme: str,
        version: str | None = None,
    ) -> None:
        self.inspector = inspector
        self.ring = ring
        self.port = port
        self.client = client
        self.scheme = scheme
        self.version = version  # None: the request head's own
        self.live = 0  # records begun and not ended on this connection

    def begin(self, head: RequestHead, request_id: bytes) -> Record | None:
        if self.live >= MAX_LIVE_PER_CONNECTION:
            self.inspector.skip(self.ring)
            return None
        record = self.inspector.begin(
            self.ring,
            port=self.port,
            client=self.client,
            method=head.method,
            target=head.target,
            version=self.version or head.version,
            headers=head.headers,
            request_id=request_id,
            scheme=self.scheme,
        )
        if record is not None:
            self.live += 1
        return record

    def end(self, record: Record, status: int | None, note: str | None) -> None:
        """From ConnectionLog's notes: none = complete, ``edge: CODE`` = the edge's error page,
        ``responses not followed: ...`` = unfollowed, anything else (no response, cut short) =
        aborted."""
        self.live -= 1
        if note is None:
            outcome = "complete"
        elif note.startswith("edge: "):
            outcome = "edge"
        elif note.startswith("responses not followed"):
            outcome = "unfollowed"
        else:
            outcome = "aborted"
        self.inspector.end(record, status, outcome, note)


# -- admin API: GET .../requests[/{rid}], PUT/DELETE .../inspect ---------------------------------

# Longest long-poll of GET .../requests?follow=1 (the SDK and CLI poll again after it).
MAX_FOLLOW_WAIT: Final = 30.0
DEFAULT_FOLLOW_WAIT: Final = 25.0


async def handle_admin(
    edge: EdgeServer, method: str, sandbox_id: str, rest: list[str], query: str
) -> Response:
    """The inspection routes of the admin API (tunneld/admin.py dispatches ``rest``: the path
    after ``/v1/sandboxes/{id}/``). In a cluster the records live on the node that holds the
    sandbox's agent session; asked on another node, the answer is 409 ``WRONG_NODE`` naming it."""
    from relay.httpapi import ApiError, json_response

    _check_node(edge, sandbox_id)
    inspector = edge.inspector
    kind = rest[0]
    if kind == "inspect" and len(rest) == 1:
        if method in ("PUT", "DELETE"):
            if (
                method == "PUT"
                and inspector.ring(sandbox_id) is None
                and len(inspector.rings) >= MAX_INSPECTED_SANDBOXES
            ):
                raise ApiError(
                    409,
                    "TOO_MANY_INSPECTED",
                    f"Request inspection is on (or has records) for {len(inspector.rings)} "
                    f"sandboxes on this node, the most it keeps ({MAX_INSPECTED_SANDBOXES}); "
                    "switch it off for some (DELETE .../inspect) first.",
                )
            inspector.set_enabled(sandbox_id, method == "PUT")
            if method == "PUT":
                log.info("sandbox %s: request inspection on", sandbox_id)
            else:
                log.info("sandbox %s: request inspection off", sandbox_id)
        elif method != "GET":
            raise _not_allowed(method, "GET", "PUT", "DELETE")
        return json_response(200, _state(inspector, sandbox_id))
    if kind == "requests" and len(rest) == 1:
        if method != "GET":
            raise _not_allowed(method, "GET")
        params = parse_qs(query)
        since = _int_param(params, "since", 0)
        wait = 0.0
        if params.get("follow", ["0"])[0] not in ("0", "", "false"):
            wait = DEFAULT_FOLLOW_WAIT
        if "wait" in params:
            wait = float(_int_param(params, "wait", 0))
        wait = min(max(wait, 0.0), MAX_FOLLOW_WAIT)
        records = await inspector.wait_newer(sandbox_id, since, wait)
        body = _state(inspector, sandbox_id)
        body["requests"] = [r.summary() for r in records]
        return json_response(200, body)
    if kind == "requests" and len(rest) == 2:
        if method != "GET":
            raise _not_allowed(method, "GET")
        text = rest[1]
        record_id = int(text) if text.isascii() and text.isdigit() and len(text) < 19 else -1
        record = inspector.get(sandbox_id, record_id)
        if record is None:
            raise ApiError(
                404,
                "REQUEST_NOT_FOUND",
                f"No recorded request {text[:32]!r} for sandbox {sandbox_id} on this node (never "
                "recorded, or evicted: the ring keeps the last inspect_max_requests).",
            )
        return json_response(200, record.to_json())
    raise ApiError(404, "NOT_FOUND", f"No such endpoint: {method} .../{'/'.join(rest)[:64]}")


def _state(inspector: Inspector, sandbox_id: str) -> dict[str, Any]:
    ring = inspector.ring(sandbox_id)
    last = next(reversed(ring.records), 0) if ring is not None and ring.records else 0
    return {
        "sandbox": sandbox_id,
        "inspect": ring is not None and ring.enabled,
        "last": last,
        "skipped": ring.skipped if ring is not None else 0,
    }


def _check_node(edge: EdgeServer, sandbox_id: str) -> None:
    from relay.httpapi import ApiError

    cluster = edge.cluster
    if cluster is None:
        return
    state = edge.registry.get(sandbox_id)
    if state is not None and state.session is not None:
        return
    owner = cluster.owners.get(sandbox_id)
    if owner is not None and owner[0] != cluster.node_id:
        raise ApiError(
            409,
            "WRONG_NODE",
            f"Sandbox {sandbox_id}'s agent is connected to node {owner[0]}: its request "
            "records and inspection switch live there; ask that node's admin API.",
        )


def _int_param(params: dict[str, list[str]], name: str, default: int) -> int:
    from relay.httpapi import ApiError

    values = params.get(name)
    if not values:
        return default
    text = values[0]
    if not (text.isascii() and text.isdigit() and len(text) < 19):
        raise ApiError(400, "INVALID_REQUEST", f"{name} must be a non-negative integer.")
    return int(text)


def _not_allowed(method: str, *allowed: str) -> Exception:
    from relay.httpapi import ApiError

    return ApiError(
        405,
        "METHOD_NOT_ALLOWED",
        f"Method {method[:16]} not allowed here.",
        [("allow", ", ".join(allowed))],
    )
