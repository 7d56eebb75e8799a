"""``tunneld port-forward SANDBOX [LOCAL:]PORT``: a local listener whose connections reach
``127.0.0.1:PORT`` inside a sandbox, as ``kubectl port-forward`` does for a pod.

Theory of operation: the command checks the admin API and the sandbox once (a wrong token, an
unreachable tunneld or an unknown sandbox end it with a message and exit status 1), listens on
``127.0.0.1:LOCAL`` (0 or absent: a free port) and prints ``Forwarding from 127.0.0.1:N ->
SANDBOX:PORT``. Each accepted connection opens one admin raw-TCP request
(``Sandbox.open_tcp``, ``GET /v1/sandboxes/{id}/ports/{port}/tcp``), then two pumps copy bytes,
each direction on its own:

- a clean end of one side (EOF) is passed on as a half-close (``shutdown(SHUT_WR)``), and the
  other direction goes on until it ends too; then both connections close normally;
- a reset or error on either side resets both (``SO_LINGER`` 0, so the peer sees RST): an
  abnormal end in the sandbox is never turned into a clean EOF for the local client;
- a connection that cannot be opened (nothing listens on the port: 502) is logged with
  tunneld's reason and the local client is reset;
- over an ``https://`` admin URL there is no half-close (TLS has none here): the local client's
  EOF closes the connection both ways, normally.

Bounds: at most ``connection_limit()`` local connections are carried at once (``MAX_CONNECTIONS``,
fewer when the process's descriptor limit is low: each takes two); one past it is reset at once.
Out of descriptors anyway (EMFILE), the listener stops accepting for ``ACCEPT_RETRY`` and tries
again, instead of ending the command. The warnings a local client can cause once per connection
(refused past the limit, a port tunneld cannot open) are rate-limited: a burst, then one a second.

SIGINT or SIGTERM stops listening, resets the connections still open (they were cut short) and
exits with status 0. Usage errors exit with status 2. The admin token comes from the
environment (TUNNELD_ADMIN_TOKEN, or a file: TUNNELD_ADMIN_TOKEN_FILE or ``--token-file``), never
from the command line, where ``ps`` would show it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
import socket
import ssl
import struct
import sys
from typing import Any, Final

from relay.budget import RateLimitedLog

DEFAULT_ADMIN_URL: Final = "http://127.0.0.1:7070"
# open_tcp's wait for the 101: tunneld itself answers 504 after its own 30 s
# (tunneld.admin.TCP_CONNECT_TIMEOUT), so this only bounds a tunneld that does not answer.
CONNECT_TIMEOUT: Final = 35.0
_CHUNK: Final = 64 * 1024
# Local connections carried at once: tunneld admits at most 256 admin connections (and
# admin_max_connections_per_ip of them from one address), so more would only be refused there.
MAX_CONNECTIONS: Final = 256
# Descriptors kept for everything but the connections (the listener, the client's checks, Python).
_FD_RESERVE: Final = 32
# Out of descriptors (EMFILE, ENFILE) at accept: the listener waits this long, then accepts again.
ACCEPT_RETRY: Final = 1.0
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2

log = logging.getLogger("tunneld.port-forward")

EXAMPLES = """\
examples:
  TUNNELD_ADMIN_TOKEN=... tunneld port-forward abc123 6379          # a free local port
  TUNNELD_ADMIN_TOKEN=... tunneld port-forward abc123 16379:6379    # 127.0.0.1:16379
  redis-cli -p 16379 PING
"""


def add_parser(sub: Any) -> None:
    """The ``port-forward`` subcommand (called by tunneld/cli.py)."""
    parser = sub.add_parser(
        "port-forward",
        help="forward a local port to a port inside a sandbox (raw TCP, admin token)",
        description="Listen on 127.0.0.1:LOCAL and carry each connection to 127.0.0.1:PORT "
        "inside SANDBOX through tunneld's admin API, like kubectl port-forward. The port needs "
        "no exposure. The admin token comes from TUNNELD_ADMIN_TOKEN or a file "
        "(TUNNELD_ADMIN_TOKEN_FILE, --token-file). Exit status: 0 after SIGINT/SIGTERM, 1 when "
        "tunneld cannot be used (unreachable, token refused, unknown sandbox, local port taken), "
        "2 on a usage error.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sandbox", metavar="SANDBOX", help="the sandbox id")
    parser.add_argument(
        "ports",
        metavar="[LOCAL:]PORT",
        help="PORT in the sandbox; LOCAL on 127.0.0.1 (default or 0: a free port, printed)",
    )
    parser.add_argument(
        "--admin-url",
        metavar="URL",
        help=f"tunneld's admin API (default $TUNNELD_ADMIN_URL, else {DEFAULT_ADMIN_URL})",
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        help="read the admin token from FILE (first line; default $TUNNELD_ADMIN_TOKEN, else "
        "the file named by $TUNNELD_ADMIN_TOKEN_FILE)",
    )
    parser.add_argument(
        "--cacert",
        metavar="FILE",
        help="CA certificate(s) to verify an https:// admin URL (default: the system's CAs)",
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="log verbosity on stderr (default info: each connection opened and closed)",
    )


def connection_limit() -> int:
    """``MAX_CONNECTIONS``, or fewer when ``RLIMIT_NOFILE`` has no room for that many (each
    connection holds two descriptors: the local socket and its admin connection)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(1, min(MAX_CONNECTIONS, (soft - _FD_RESERVE) // 2))


class UsageError(Exception):
    """A bad argument or missing setting: exit status 2."""


def parse_ports(text: str) -> tuple[int, int]:
    """``"[LOCAL:]PORT"`` -> (local, port); the sandbox port follows tunneld's port rules."""
    from protocol.hostnames import ValidationError, validate_port

    local_text, sep, port_text = text.rpartition(":")
    if not sep:
        local_text = "0"
    if not (local_text.isascii() and local_text.isdigit() and int(local_text) <= 65535):
        raise UsageError(f"LOCAL must be a port number 0-65535, got {local_text!r}")
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) < 7):
        raise UsageError(f"PORT must be a port number, got {port_text!r}")
    try:
        port = validate_port(int(port_text))
    except ValidationError as exc:
        raise UsageError(exc.message) from None
    return int(local_text), port


def read_token(token_file: str | None, environ: dict[str, str]) -> str:
    """--token-file, else TUNNELD_ADMIN_TOKEN, else TUNNELD_ADMIN_TOKEN_FILE (as ``tunneld
    inspect`` reads them)."""
    token = None if token_file else environ.get("TUNNELD_ADMIN_TOKEN", "").strip()
    path = token_file or environ.get("TUNNELD_ADMIN_TOKEN_FILE")
    if not token and path:
        try:
            with open(path, encoding="utf-8") as f:
                token = f.readline().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the admin token from {path}: {exc}") from None
        if not token:
            raise UsageError(f"the admin token file {path} is empty")
    if not token:
        raise UsageError(
            "no admin token: set TUNNELD_ADMIN_TOKEN or TUNNELD_ADMIN_TOKEN_FILE, or pass "
            "--token-file"
        )
    return token


def run_port_forward(args: argparse.Namespace) -> int:
    from protocol.hostnames import ValidationError, validate_sandbox_id
    from relay.loop import new_event_loop

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        sandbox_id = validate_sandbox_id(args.sandbox)
        local, port = parse_ports(args.ports)
        token = read_token(args.token_file, dict(os.environ))
        url = args.admin_url or os.environ.get("TUNNELD_ADMIN_URL") or DEFAULT_ADMIN_URL
        context = None
        if args.cacert:
            try:
                context = ssl.create_default_context(cafile=args.cacert)
            except (OSError, ssl.SSLError) as exc:
                raise UsageError(f"--cacert {args.cacert}: {exc}") from None
        try:
            forwarder = PortForward(url, token, sandbox_id, port, local, context)
        except ValueError as exc:
            raise UsageError(f"invalid admin URL {url!r}: {exc}") from None
    except ValidationError as exc:
        print(f"tunneld port-forward: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"tunneld port-forward: {exc}", file=sys.stderr)
        return EXIT_USAGE
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(forwarder.run())


class PortForward:
    def __init__(
        self,
        admin_url: str,
        token: str,
        sandbox_id: str,
        port: int,
        local_port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        from .client import TunnelClient

        self.client = TunnelClient(
            admin_url, token, timeout=CONNECT_TIMEOUT, ssl_context=ssl_context
        )
        self.sandbox = self.client.sandbox(sandbox_id)
        self.port = port
        self.local_port = local_port
        self.count = 0
        self.open: set[Any] = set()  # connections in flight (their pumps' cancel scopes)
        self.limit = connection_limit()
        self.carried = 0  # local connections being served (opening or open)
        self.refused = 0
        self._refusals = RateLimitedLog(log, "warnings about refused local connections")
        self._failures = RateLimitedLog(log, "warnings about ports tunneld could not open")

    def _fail(self, message: str) -> int:
        print(f"tunneld port-forward: {message}", file=sys.stderr)
        return EXIT_FAILURE

    async def run(self) -> int:
        import anyio

        from .client import AuthenticationError, NotFoundError, TunnelError

        target = f"sandbox {self.sandbox.id} port {self.port}"
        try:
            info = await self.client._request_json("GET", f"/v1/sandboxes/{self.sandbox.id}")
        except AuthenticationError:
            return self._fail(f"tunneld at {self.client.base_url} refused the admin token (401)")
        except NotFoundError as exc:
            return self._fail(f"{exc.message} ({exc.code})")
        except TunnelError as exc:
            return self._fail(f"{exc.message} ({exc.code})")
        if isinstance(info, dict) and info.get("connected") is False:
            log.warning(
                "sandbox %s is not connected now; connections fail until its agent is back",
                self.sandbox.id,
            )
        try:
            listener = await anyio.create_tcp_listener(
                local_host="127.0.0.1", local_port=self.local_port
            )
        except OSError as exc:
            return self._fail(f"cannot listen on 127.0.0.1:{self.local_port}: {exc}")
        # The signals are ours before the port is announced: a SIGTERM right after the
        # "Forwarding from" line must stop cleanly, not kill the process by default.
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with listener:
                bound = listener.extra(anyio.abc.SocketAttribute.local_port)
                print(f"Forwarding from 127.0.0.1:{bound} -> {target}", flush=True)
                log.info(
                    "listening on 127.0.0.1:%d for %s via %s (at most %d connections at once)",
                    bound,
                    target,
                    self.client.base_url,
                    self.limit,
                )
                async with anyio.create_task_group() as tg:
                    for one in listener.listeners:
                        tg.start_soon(self._accept, one, tg)
                    async for signum in signals:
                        log.info(
                            "%s: stopping; resetting %d open connection(s)",
                            signal.Signals(signum).name,
                            len(self.open),
                        )
                        tg.cancel_scope.cancel()
                        break
        log.info("stopped after %d connection(s)", self.count)
        return 0

    async def _accept(self, listener: Any, tg: Any) -> None:
        """Accept local connections for as long as the command runs: past ``limit`` carried at
        once a connection is reset at once; out of descriptors, accepting pauses, not ends."""
        import anyio

        while True:
            try:
                local = await listener.accept()
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: the connection waits in the backlog
                self._refusals.log(
                    anyio.current_time(),
                    "cannot accept a local connection (%s); accepting again in %gs",
                    exc.strerror or exc,
                    ACCEPT_RETRY,
                )
                await anyio.sleep(ACCEPT_RETRY)
                continue
            if self.carried >= self.limit:
                self.refused += 1
                peer = local.extra(anyio.abc.SocketAttribute.remote_address, ("?", 0))
                self._refusals.log(
                    anyio.current_time(),
                    "connection from %s:%s reset: %d connections are carried already, the limit",
                    peer[0],
                    peer[1],
                    self.limit,
                )
                await _abort(local)
                continue
            self.carried += 1
            tg.start_soon(self._carry, local)

    async def _carry(self, local: Any) -> None:
        try:
            await self._serve(local)
        finally:
            self.carried -= 1

    async def _serve(self, local: Any) -> None:
        import anyio

        from .client import TunnelError

        self.count += 1
        n = self.count
        peer = local.extra(anyio.abc.SocketAttribute.remote_address, ("?", 0))
        who = f"connection {n} from {peer[0]}:{peer[1]}"
        try:
            remote = await self.sandbox.open_tcp(self.port)
        except TunnelError as exc:
            self._failures.log(
                anyio.current_time(),
                "%s: cannot open port %d: %s (%s)",
                who,
                self.port,
                exc.message,
                exc.code,
            )
            await _abort(local)
            return
        except BaseException:
            await _abort(local)
            raise
        log.info("%s: open to sandbox %s port %d", who, self.sandbox.id, self.port)
        pair = _Pair(local, remote)
        try:
            async with anyio.create_task_group() as tg:
                self.open.add(tg)
                tg.start_soon(pair.pump, local, remote, tg.cancel_scope)
                tg.start_soon(pair.pump, remote, local, tg.cancel_scope)
        finally:
            self.open.discard(tg)
            with anyio.CancelScope(shield=True):
                counts = f"{pair.sent[0]} bytes out, {pair.sent[1]} in"
                if pair.reset is None and pair.ended == 2:
                    await local.aclose()
                    await remote.aclose()
                    note = (
                        ", on its EOF: TLS to tunneld has no half-close" if pair.tls_close else ""
                    )
                    log.info("%s: closed (%s%s)", who, counts, note)
                else:
                    await _abort(local)
                    await remote.abort()
                    why = pair.reset or "cut short by the stop"
                    log.info("%s: reset both ways: %s (%s)", who, why, counts)


class _Pair:
    """The two pumps of one forwarded connection: ``local`` (the client of the listener) and
    ``remote`` (the admin raw-TCP stream to the sandbox port)."""

    def __init__(self, local: Any, remote: Any) -> None:
        self.local = local
        self.remote = remote
        self.reset: str | None = None
        self.tls_close = False
        self.ended = 0
        self.sent = [0, 0]  # to the sandbox, from the sandbox

    def _name(self, stream: Any) -> str:
        return "the local client" if stream is self.local else "the sandbox"

    async def pump(self, src: Any, dst: Any, scope: Any) -> None:
        import anyio

        index = 0 if src is self.local else 1
        failed = src
        try:
            while True:
                failed = src
                try:
                    data = await src.receive(_CHUNK)
                except anyio.EndOfStream:
                    break
                failed = dst
                await dst.send(data)
                self.sent[index] += len(data)
            failed = dst
            try:
                await dst.send_eof()  # a half-close is passed on as one
            except NotImplementedError:
                # TLS to tunneld (an https:// admin URL) has no half-close: the end of the
                # client's output closes the connection both ways, normally.
                self.ended = 2
                self.tls_close = True
                scope.cancel()
                return
            self.ended += 1
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            cause = exc.__cause__ or exc
            self.reset = f"{self._name(failed)} ended abnormally ({cause or type(cause).__name__})"
            scope.cancel()


async def _abort(stream: Any) -> None:
    """Close ``stream`` with RST (SO_LINGER 0), never a clean FIN."""
    import anyio

    try:
        sock = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except (OSError, AttributeError, anyio.TypedAttributeLookupError):  # closed: nothing to reset
        pass
    await anyio.aclose_forcefully(stream)
