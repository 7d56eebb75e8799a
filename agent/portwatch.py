"""Port readiness: probe a sandbox port until it is ready, the way Cloudflare's ``port-watch`` does.

Theory of operation
-------------------
A watch (:func:`watch_port`) probes ``127.0.0.1:PORT`` (then ``::1`` when the first refuses)
every ``interval`` until one probe says "ready", or until ``timeout`` has passed since the watch
began. A probe is:

* ``tcp``: a connect succeeds (the socket is closed at once);
* ``http``: ``GET path`` on a fresh connection answers with a status line whose code is in
  ``[status_min, status_max]`` (Cloudflare's defaults 200-399); only the status line is read.

Every probe is bounded by :data:`PROBE_TIMEOUT` (Cloudflare's 5 s) and by what is left of the
watch, so a watch never outlives its ``timeout`` by more than a scheduling delay. The result
carries the last observation (an HTTP status, or why the probe failed) for the caller's error.

:class:`PortWatches` counts live watches per agent (the local API's and the edge's together): at
most :data:`MAX_WATCHES`, so a loop of clients cannot make the agent dial without bound.

The two callers translate their own input into a :class:`WatchSpec`: the local API from
Cloudflare's JSON body (:func:`spec_from_json`), the agent core from a ``watch_port`` control
message. Cancelling the task that runs a watch stops it at once (no thread, no leftover socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from protocol.hostnames import ValidationError, validate_port

__all__ = [
    "DEFAULT_INTERVAL_MS",
    "DEFAULT_STATUS_MAX",
    "DEFAULT_STATUS_MIN",
    "MAX_INTERVAL_MS",
    "MAX_PATH_LENGTH",
    "MAX_WATCHES",
    "MAX_WATCH_SECONDS",
    "MIN_INTERVAL_MS",
    "MODES",
    "PROBE_TIMEOUT",
    "Observation",
    "PortWatches",
    "TooManyWatches",
    "WatchResult",
    "WatchSpec",
    "check_path",
    "probe",
    "spec_from_json",
    "watch_port",
]

MODES: Final = ("http", "tcp")
# Cloudflare's per-check timeout (services/port-service.ts): a service that takes longer to accept
# or to send its status line is not ready.
PROBE_TIMEOUT: Final = 5.0
# Cloudflare's interval default and clamp, in milliseconds (sub-100 ms polling only burns CPU).
DEFAULT_INTERVAL_MS: Final = 500
MIN_INTERVAL_MS: Final = 100
MAX_INTERVAL_MS: Final = 10_000
# Cloudflare's default readiness range: success and redirects.
DEFAULT_STATUS_MIN: Final = 200
DEFAULT_STATUS_MAX: Final = 399
# Cloudflare's container watches until its client goes away; ours also ends by itself, so a
# forgotten client cannot keep a probe loop alive forever. Five minutes covers slow builds.
MAX_WATCH_SECONDS: Final = 300.0
# Live watches per agent: a few per starting service is normal; more is a leak or a loop.
MAX_WATCHES: Final = 64
# A probe path is one request target; the common browser URL limit.
MAX_PATH_LENGTH: Final = 2048
# The status line we read; real ones are ~20 bytes, this leaves room for a long reason phrase.
_MAX_STATUS_LINE: Final = 4096


class TooManyWatches(Exception):
    """The agent already runs :attr:`PortWatches.limit` watches."""


@dataclass(frozen=True, slots=True)
class WatchSpec:
    port: int
    mode: str = "http"
    path: str = "/"
    status_min: int = DEFAULT_STATUS_MIN
    status_max: int = DEFAULT_STATUS_MAX
    interval: float = DEFAULT_INTERVAL_MS / 1000  # seconds between the end of a probe and the next
    timeout: float = MAX_WATCH_SECONDS  # seconds for the whole watch


@dataclass(frozen=True, slots=True)
class Observation:
    """One probe's outcome: ``ready``, and the HTTP ``status`` or the ``error`` it got."""

    ready: bool
    status: int | None = None
    error: str | None = None

    def describe(self) -> str:
        if self.status is not None:
            return f"HTTP {self.status}"
        return self.error or "no answer"


@dataclass(frozen=True, slots=True)
class WatchResult:
    ready: bool
    last: Observation | None  # None: the watch ended before its first probe finished
    elapsed: float

    def message(self, spec: WatchSpec) -> str:
        """The sentence a caller shows when the port was not ready."""
        last = "no probe finished" if self.last is None else f"last check: {self.last.describe()}"
        return f"Port {spec.port} was not ready within {spec.timeout:g} s ({last})."


def check_path(value: object) -> str:
    """A probe path: an absolute request target, no whitespace or control characters."""
    if (
        not isinstance(value, str)
        or not value.startswith("/")
        or len(value) > MAX_PATH_LENGTH
        or any(c <= " " or c == "\x7f" for c in value)
        or not value.isascii()
    ):
        raise ValidationError(
            f"path must be an absolute ASCII path without spaces, e.g. /health (at most "
            f"{MAX_PATH_LENGTH} characters), got {str(value)[:64]!r}.",
            "INVALID_REQUEST",
        )
    return value


def _status(value: object, name: str) -> int:
    if type(value) is not int or not 100 <= value <= 599:
        raise ValidationError(
            f"{name} must be an integer HTTP status (100-599), got {value!r:.64}.",
            "INVALID_REQUEST",
        )
    return value


def _number(value: object, name: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValidationError(
            f"{name} must be a positive number, got {value!r:.64}.", "INVALID_REQUEST"
        )
    return float(value)


def spec_from_json(obj: Mapping[str, Any]) -> WatchSpec:
    """Cloudflare's ``port-watch`` body: ``{port, mode, path?, statusMin?, statusMax?,
    interval? (ms, clamped 100-10000), processId?}``, plus ``timeout`` (ms, at most 300000) of
    ours. ``processId`` is accepted and ignored: the agent does not start processes. Raises
    :class:`ValidationError` (``INVALID_PORT`` / ``INVALID_REQUEST``)."""
    known = {"port", "mode", "path", "statusMin", "statusMax", "interval", "timeout", "processId"}
    unknown = sorted(set(obj) - known)
    if unknown:
        raise ValidationError(
            f"Unknown field(s): {', '.join(u[:64] for u in unknown[:5])}.", "INVALID_REQUEST"
        )
    if "port" not in obj:
        raise ValidationError("Missing required field: port.", "INVALID_PORT")
    port = validate_port(obj["port"])
    mode = obj.get("mode", "http")
    if mode not in MODES:
        raise ValidationError(f"mode must be 'http' or 'tcp', got {mode!r:.64}.", "INVALID_REQUEST")
    path = check_path(obj.get("path", "/"))
    status_min = _status(obj.get("statusMin", DEFAULT_STATUS_MIN), "statusMin")
    status_max = _status(obj.get("statusMax", DEFAULT_STATUS_MAX), "statusMax")
    if status_min > status_max:
        raise ValidationError(
            f"statusMin ({status_min}) is greater than statusMax ({status_max}).", "INVALID_REQUEST"
        )
    interval_ms = _number(obj.get("interval", DEFAULT_INTERVAL_MS), "interval")
    interval_ms = min(max(interval_ms, MIN_INTERVAL_MS), MAX_INTERVAL_MS)  # Cloudflare clamps
    timeout_ms = _number(obj.get("timeout", MAX_WATCH_SECONDS * 1000), "timeout")
    if timeout_ms > MAX_WATCH_SECONDS * 1000:
        raise ValidationError(
            f"timeout must be at most {MAX_WATCH_SECONDS * 1000:.0f} ms, got {timeout_ms:g}.",
            "INVALID_REQUEST",
        )
    return WatchSpec(
        port, mode, path, status_min, status_max, interval_ms / 1000, timeout_ms / 1000
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    text = getattr(exc, "strerror", None) or str(exc)
    return text.lower() if text else type(exc).__name__


async def _connect(
    hosts: Sequence[str], port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    first: OSError | None = None
    for host in hosts:
        try:
            return await asyncio.open_connection(host, port, limit=_MAX_STATUS_LINE)
        except OSError as exc:  # ::1 absent is common: report the first host's reason
            first = first or exc
    assert first is not None
    raise first


def _parse_status(line: bytes) -> int | None:
    parts = line.split(None, 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/1.") and len(parts[1]) == 3:
        return int(parts[1]) if parts[1].isdigit() else None
    return None


async def probe(spec: WatchSpec, hosts: Sequence[str], timeout: float) -> Observation:
    """One check of ``spec.port`` within ``timeout`` seconds. Never raises (but is cancellable)."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await _connect(hosts, spec.port)
            if spec.mode == "tcp":
                return Observation(True)
            writer.write(
                b"GET %s HTTP/1.1\r\nHost: localhost:%d\r\nUser-Agent: tunnel-agent-portwatch"
                b"\r\nAccept: */*\r\nConnection: close\r\n\r\n" % (spec.path.encode(), spec.port)
            )
            line = await reader.readuntil(b"\n")
    except (OSError, TimeoutError) as exc:
        return Observation(False, error=_reason(exc))
    except asyncio.IncompleteReadError:
        return Observation(False, error="connection closed before a status line")
    except asyncio.LimitOverrunError:
        return Observation(False, error="not an HTTP response (status line too long)")
    finally:
        if writer is not None:
            writer.transport.abort()  # no lingering close: nothing more to say to the service
    status = _parse_status(line)
    if status is None:
        return Observation(False, error="not an HTTP response")
    return Observation(spec.status_min <= status <= spec.status_max, status=status)


async def watch_port(
    spec: WatchSpec,
    hosts: Sequence[str] = ("127.0.0.1", "::1"),
    on_probe: Callable[[Observation], Awaitable[None] | None] | None = None,
) -> WatchResult:
    """Probe until ready or until ``spec.timeout`` seconds have passed; see the module docstring.

    ``on_probe(observation)`` is called after every probe (for logs and tests)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + spec.timeout
    last: Observation | None = None
    while True:
        left = deadline - loop.time()
        if left <= 0:
            return WatchResult(False, last, loop.time() - start)
        budget = min(PROBE_TIMEOUT, left)
        observation = await probe(spec, hosts, budget)
        # A probe cut short by the watch's own deadline says nothing about the service: keep
        # the last real observation for the error (the "last observed status").
        if not (last is not None and budget < PROBE_TIMEOUT and observation.error == "timed out"):
            last = observation
        if on_probe is not None:
            maybe = on_probe(observation)
            if maybe is not None:
                await maybe
        if observation.ready:
            return WatchResult(True, observation, loop.time() - start)
        left = deadline - loop.time()
        if left <= 0:
            return WatchResult(False, last, loop.time() - start)
        await asyncio.sleep(min(spec.interval, left))


class PortWatches:
    """The agent's live watches: ``with watches.slot(): ...`` or :class:`TooManyWatches`."""

    __slots__ = ("active", "hosts", "limit")

    def __init__(
        self, limit: int = MAX_WATCHES, hosts: Sequence[str] = ("127.0.0.1", "::1")
    ) -> None:
        self.limit = limit
        self.hosts = tuple(hosts)
        self.active = 0

    def acquire(self) -> None:
        if self.active >= self.limit:
            raise TooManyWatches(f"Too many port watches: the limit is {self.limit}.")
        self.active += 1

    def release(self) -> None:
        self.active -= 1

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()
