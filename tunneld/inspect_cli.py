"""``tunneld inspect SANDBOX [--follow] [--json]`` and ``tunneld replay SANDBOX REQUEST_ID``:
request inspection (tunneld/inspect.py) from a shell, through the admin API (the SDK).

The admin API is ``--admin-url`` (else ``TUNNELD_ADMIN_URL``, else http://127.0.0.1:7070); its
token comes from ``TUNNELD_ADMIN_TOKEN`` or the file named by ``TUNNELD_ADMIN_TOKEN_FILE``, never
from argv (it would show in ps).

``inspect`` prints one line per completed request, oldest first; ``--follow`` keeps printing new
ones as they complete (a long-poll of ``GET .../requests?since=ID&wait=25``), ``--json`` prints
each summary as one JSON object per line. When nothing is being recorded (the sandbox's switch
off and no exposure with ``inspect``) and there is nothing to show, or ``--follow`` would wait
for nothing, it says so, naming the ports and how to turn inspection on, and exits 1.
``replay`` fetches the record and sends the request again through the preview URL (the recorded
``Host``, or ``--connect HOST:PORT`` to reach the public listener at another address), so it
takes the same path as the original, then prints the new status. It refuses a request whose
body was truncated by ``inspect_body_bytes`` (the replay would send another body) unless
``--force``, and a protocol upgrade (WebSocket) always.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import ssl
import sys
import time
from typing import Any, Final

import h11
import orjson

__all__ = ["add_parsers", "run_inspect", "run_replay"]

DEFAULT_ADMIN_URL: Final = "http://127.0.0.1:7070"
FOLLOW_WAIT: Final = 25  # seconds per long-poll (the server's limit is 30)
REPLAY_TIMEOUT: Final = 30.0  # connect + send + the whole response, seconds
MAX_REPLAY_RESPONSE: Final = 64 * 1024 * 1024  # read and counted, never kept
# Not replayed as recorded: connection-level headers (the replay is one request, then close)
# and the body framing (the body is sent with its decoded length).
_HOP_HEADERS: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "content-length",
        "upgrade",
        "trailer",
    }
)


class CliError(Exception):
    """A message for stderr and the exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def add_parsers(sub: Any) -> None:
    """The ``inspect`` and ``replay`` subcommands of ``tunneld``."""
    inspect = sub.add_parser(
        "inspect",
        help="print the requests a sandbox's preview URLs served (request inspection)",
        description="Print the recorded requests of SANDBOX, one line each (time, method, path, "
        "status, request and response body sizes, duration, id), oldest first. Inspection must "
        "be on (PUT /v1/sandboxes/{id}/inspect, --enable, or an exposure with inspect: true); "
        "when it is off and there is nothing to show (or to follow), a message says so and the "
        "exit status is 1.",
    )
    inspect.add_argument("sandbox", metavar="SANDBOX")
    inspect.add_argument(
        "--follow", "-f", action="store_true", help="keep printing requests as they complete"
    )
    inspect.add_argument("--json", action="store_true", help="one JSON object per line")
    inspect.add_argument(
        "--since",
        type=int,
        default=0,
        metavar="ID",
        help="only requests after this id (default 0: every request kept)",
    )
    inspect.add_argument(
        "--enable", action="store_true", help="turn inspection on for the sandbox first"
    )
    _admin_arguments(inspect)
    replay = sub.add_parser(
        "replay",
        help="send a recorded request again through its preview URL and print the new status",
        description="Fetch request REQUEST_ID of SANDBOX and send it again through the preview "
        "URL it came in on (headers redacted at recording are left out). Refused when its body "
        "was truncated (inspect_body_bytes) unless --force, which sends the recorded part.",
    )
    replay.add_argument("sandbox", metavar="SANDBOX")
    replay.add_argument("request_id", metavar="REQUEST_ID")
    replay.add_argument(
        "--force", action="store_true", help="replay even a truncated body (its recorded part)"
    )
    replay.add_argument(
        "--connect",
        metavar="HOST:PORT",
        help="connect here instead of the preview host's address (the Host header is kept; "
        "default: the recorded Host)",
    )
    _admin_arguments(replay)


def _admin_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin-url",
        metavar="URL",
        help=f"tunneld's admin API (default $TUNNELD_ADMIN_URL or {DEFAULT_ADMIN_URL}); the "
        "token comes from $TUNNELD_ADMIN_TOKEN or $TUNNELD_ADMIN_TOKEN_FILE",
    )


def _client(args: argparse.Namespace) -> Any:
    from protocol.hostnames import ValidationError, validate_sandbox_id

    from .client import TunnelClient
    from .portforward import UsageError, read_token

    try:  # a malformed id is a usage error, before any request
        validate_sandbox_id(args.sandbox)
    except ValidationError as exc:
        raise CliError(exc.message, 2) from None
    try:  # the same rules as `tunneld port-forward` (without its --token-file)
        token = read_token(None, dict(os.environ))
    except UsageError as exc:
        # port-forward's message offers its --token-file, an option these commands lack
        raise CliError(str(exc).removesuffix(", or pass --token-file"), 2) from None
    url = args.admin_url or os.environ.get("TUNNELD_ADMIN_URL") or DEFAULT_ADMIN_URL
    try:
        return TunnelClient(url, token=token)
    except ValueError as exc:
        raise CliError(f"invalid admin URL {url!r}: {exc}", 2) from None


def _run(command: str, coro: Any) -> int:
    from .client import TunnelError

    try:
        return int(asyncio.run(coro))
    except CliError as exc:
        print(f"tunneld {command}: {exc}", file=sys.stderr)
        return exc.status
    except TunnelError as exc:
        print(f"tunneld {command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# -- inspect -----------------------------------------------------------------------------------


def format_line(r: dict[str, Any]) -> str:
    """One request as a line: time, method, path, status, sizes, duration, id (and state)."""
    stamp = time.strftime("%H:%M:%S", time.localtime(r.get("time") or 0))
    millis = int(((r.get("time") or 0) % 1) * 1000)
    status = r.get("status")
    duration = r.get("durationMs")
    line = (
        f"{stamp}.{millis:03d} {r.get('method', '?')} {r.get('target', '?')} "
        f"{status if status is not None else '-'} "
        f"in={r.get('requestBytes', 0)}B out={r.get('responseBytes', 0)}B "
        f"{'-' if duration is None else f'{duration:.1f}ms'} id={r.get('id')}"
    )
    if r.get("state") not in (None, "complete"):
        line += f" [{r.get('state')}{': ' + r['note'] if r.get('note') else ''}]"
    return line


def run_inspect(args: argparse.Namespace) -> int:
    return _run("inspect", _inspect(args))


async def _inspect(args: argparse.Namespace) -> int:
    client = _client(args)
    async with client:
        sb = client.sandbox(args.sandbox)
        if args.enable:
            await sb.set_inspection(True)
        since = max(args.since, 0)
        first = True
        while True:
            # The first read never waits: it also says whether anything is being recorded.
            wait = FOLLOW_WAIT if args.follow and not first else 0
            records = await sb.requests(since=since, wait=wait)
            for r in records:
                print(orjson.dumps(r).decode() if args.json else format_line(r), flush=True)
                since = max(since, int(r.get("id", 0)))
            if first and not records.inspect and (args.follow or not records):
                # Nothing shown, or nothing more to follow, unless an exposure records its port.
                off = await _uninspected_ports(sb)
                if off is not None:
                    raise CliError(inspection_off_message(args.sandbox, off))
            first = False
            if not args.follow:
                return 0


async def _uninspected_ports(sb: Any) -> list[int] | None:
    """The sandbox's HTTP ports, when none of its exposures records requests (``inspect``);
    None when one does (its requests are recorded whatever the sandbox switch says)."""
    ports = await sb.get_exposed_ports()
    if any(p.inspect for p in ports):
        return None
    return [p.port for p in ports if p.protocol == "http"]


def inspection_off_message(sandbox: str, ports: list[int]) -> str:
    """Why ``inspect`` has nothing to show, and the two ways to turn inspection on."""
    if not ports:
        where = f"sandbox {sandbox} (it has no exposed HTTP port)"
        example = "PORT"
    else:
        named = ", ".join(str(p) for p in ports)
        where = f"sandbox {sandbox}'s port{'s' if len(ports) > 1 else ''} {named}"
        example = str(ports[0])
    return (
        f"request inspection is off for {where}: no request is recorded. Turn it on with "
        f"`tunneld inspect {sandbox} --enable` (every port, until tunneld restarts) or expose "
        f"the port with inspection (`tunnel-agent expose {example} --inspect`, or the SDK's "
        f"expose_port({example}, inspect=True))"
    )


# -- replay ------------------------------------------------------------------------------------


def run_replay(args: argparse.Namespace) -> int:
    return _run("replay", _replay(args))


def _body_of(part: dict[str, Any]) -> bytes:
    text = part.get("body") or ""
    if part.get("bodyEncoding") == "base64":
        return base64.b64decode(text)
    return str(text).encode("utf-8")


def dechunk(data: bytes) -> bytes:
    """The payload of a chunked body (wire bytes, as recorded); a cut-short one as far as it
    goes (its last whole or partial chunk)."""
    out = bytearray()
    pos = 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            break
        size_text = data[pos:end].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            break
        if size == 0:
            break
        start = end + 2
        out += data[start : start + size]
        pos = start + size + 2
        if pos > len(data):
            break
    return bytes(out)


def replay_request(record: dict[str, Any], force: bool) -> tuple[bytes, list[str]]:
    """The bytes to send for ``record`` and notes for the user; CliError when refused."""
    request = record.get("request")
    if not isinstance(request, dict):
        raise CliError("malformed record: no request")
    rid = record.get("id")
    headers = [(str(n), str(v)) for n, v in request.get("headers", [])]
    names = {n.lower() for n, _ in headers}
    if "upgrade" in names:
        raise CliError(
            f"request {rid} was a protocol upgrade (WebSocket?): replay sends plain HTTP only", 2
        )
    notes: list[str] = []
    captured = int(request.get("bodyCaptured", 0))
    if request.get("bodyTruncated"):
        if not force:
            raise CliError(
                f"request {rid} was not replayed: its body was truncated when it was recorded "
                f"({captured} of {request.get('bodySize')} bytes kept, inspect_body_bytes), so a "
                "replay would send a different body; --force sends the recorded part",
                2,
            )
        notes.append(f"body truncated: sending the {captured} recorded bytes only (--force)")
    body = _body_of(request)
    chunked = any(n.lower() == "transfer-encoding" and "chunked" in v.lower() for n, v in headers)
    if chunked:
        body = dechunk(body)
    lines = [f"{request.get('method', 'GET')} {request.get('target', '/')} HTTP/1.1"]
    for name, value in headers:
        lower = name.lower()
        if lower in _HOP_HEADERS:
            continue
        if value == "[redacted]":
            notes.append(f"header {name} was redacted when recorded: left out")
            continue
        lines.append(f"{name}: {value}")
    if body or chunked or "content-length" in names:
        lines.append(f"content-length: {len(body)}")
    lines.append("connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + body, notes


def _target_address(record: dict[str, Any], connect: str | None) -> tuple[str, int, str]:
    """(host to connect to, port, TLS server name) for the replay."""
    headers = record["request"].get("headers", [])
    host_header = next((str(v) for n, v in headers if str(n).lower() == "host"), "")
    scheme = record.get("scheme", "http")
    name, _, port_text = host_header.rpartition(":")
    if not name or not port_text.isdigit():
        name, port_text = host_header, "443" if scheme == "https" else "80"
    if connect:
        host, _, cport = connect.rpartition(":")
        if not host or not cport.isdigit():
            raise CliError(f"--connect must be HOST:PORT, not {connect!r}", 2)
        return host.strip("[]"), int(cport), name
    if not name:
        raise CliError("the record has no Host header: use --connect HOST:PORT")
    return name, int(port_text), name


async def _replay(args: argparse.Namespace) -> int:
    text = args.request_id
    if not (text.isascii() and text.isdigit()):
        raise CliError(f"REQUEST_ID must be a number (the id column of inspect), not {text!r}", 2)
    if args.connect:
        _target_address({"request": {}}, args.connect)  # a malformed --connect: usage, first
    client = _client(args)
    async with client:
        record = await client.sandbox(args.sandbox).request(int(text))
    data, notes = replay_request(record, args.force)
    for note in notes:
        print(f"tunneld replay: note: {note}", file=sys.stderr)
    host, port, server_name = _target_address(record, args.connect)
    context = ssl.create_default_context() if record.get("scheme") == "https" else None
    try:
        async with asyncio.timeout(REPLAY_TIMEOUT):
            method = str(record["request"].get("method", "GET"))
            status, reason, size = await _exchange(host, port, context, server_name, data, method)
    except TimeoutError:
        raise CliError(
            f"no complete response from {host}:{port} within {REPLAY_TIMEOUT:g} s"
        ) from None
    except (OSError, h11.ProtocolError) as exc:
        raise CliError(f"replay of request {text} to {host}:{port} failed: {exc}") from None
    request = record["request"]
    print(
        f"replayed {text}: {request.get('method')} {request.get('target')} -> {status}"
        f"{' ' + reason if reason else ''} ({size} B; was {record.get('status')})",
        flush=True,
    )
    return 0


async def _exchange(
    host: str,
    port: int,
    context: ssl.SSLContext | None,
    server_name: str,
    data: bytes,
    method: str,
) -> tuple[int, str, int]:
    """Send ``data`` (a whole request), read the response: (status, reason, body bytes)."""
    reader, writer = await asyncio.open_connection(
        host, port, ssl=context, server_hostname=server_name if context else None
    )
    try:
        writer.write(data)
        await writer.drain()
        # h11 reads the response; it is told the request's method (a HEAD answer has no body)
        # but not its bytes, which went out as recorded.
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method=method, target="/", headers=[("host", "replay")]))
        conn.send(h11.EndOfMessage())
        status, reason, size = 0, "", 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
                continue
            if isinstance(event, h11.Response):
                status, reason = event.status_code, event.reason.decode("latin-1")
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_REPLAY_RESPONSE:
                    break
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        return status, reason, size
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
