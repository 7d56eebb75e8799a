"""``tunnel-agent``: run the in-sandbox agent, or talk to a running one.

``run`` starts the agent process (:func:`run_from_args`: logging, the event loop, signals, the
local API and :class:`agent.core.Agent`, all imported only by ``run``). The other subcommands are
thin clients of the local control API (:mod:`agent.local_api`) and use only the
standard library, so they start fast and work in a minimal sandbox image.

Exit codes: 0 ok, 1 the agent refused or failed the request, 2 usage error, 3 the agent cannot be
reached, 130 interrupted (SIGINT).
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, NamedTuple, NoReturn
from urllib.parse import urlsplit

from protocol.hostnames import CONTROL_PLANE_PORT, MIN_PORT, validate_sandbox_id

from .entry import EXIT_INTERRUPTED, exit_on_sigint

if TYPE_CHECKING:
    import logging
    import ssl

    from .core import Agent, AgentConfig
    from .proxy import ProxyChoice

__all__ = [
    "CLIENT_TIMEOUT",
    "DEFAULT_API",
    "EXIT_API_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "AgentClient",
    "ServerEntry",
    "agent_config",
    "build_parser",
    "main",
    "parse_servers",
    "plaintext_refusal",
    "proxy_choices",
    "run_from_args",
]

EXIT_OK: Final = 0
EXIT_API_ERROR: Final = 1
EXIT_USAGE: Final = 2  # argparse's own code
EXIT_UNREACHABLE: Final = 3
# EXIT_INTERRUPTED (130, from agent.entry): SIGINT (Ctrl-C), as shells report it; no traceback

DEFAULT_API: Final = "http://127.0.0.1:3000"
# The local API answers in milliseconds unless it waits on the edge, which has its own timeout.
# Also the bound on connecting to the API, for every command.
CLIENT_TIMEOUT: Final = 10.0
# expose, unexpose and ports wait on the edge: the agent's timeout for that (agent.core's
# REQUEST_TIMEOUT, 35 s; not imported, as above) plus CLIENT_TIMEOUT, so that the agent's own
# answer (the edge's STORE_UNAVAILABLE, or 504 EDGE_TIMEOUT) arrives before this client gives up
# and blames a stuck agent (AGENT_TIMEOUT).
EDGE_CLIENT_TIMEOUT: Final = 45.0
# The longest `wait` the agent runs (agent.portwatch.MAX_WATCH_SECONDS; not imported: the client
# commands stay standard-library only).
WAIT_MAX_SECONDS: Final = 300.0
# The longest `wait --http PATH` the agent probes (agent.portwatch.MAX_PATH_LENGTH, as above).
WAIT_MAX_PATH: Final = 2048

ENV_API: Final = "TUNNEL_AGENT_API"
ENV_SERVER: Final = "TUNNEL_AGENT_SERVER"
ENV_SANDBOX_ID: Final = "TUNNEL_AGENT_SANDBOX_ID"
ENV_TOKEN: Final = "TUNNEL_AGENT_TOKEN"
ENV_LOG_LEVEL: Final = "TUNNEL_AGENT_LOG_LEVEL"
ENV_PROXY: Final = "TUNNEL_AGENT_PROXY"
LOG_LEVELS: Final = ("debug", "info", "warning", "error")

_DESCRIPTION = """\
tunnel-agent gives ports inside this sandbox public preview URLs.

`tunnel-agent run` keeps one connection to the tunneld edge and serves a local control API on
127.0.0.1:3000; the other commands talk to that API.
"""

_EPILOG = """\
examples:
  TUNNEL_AGENT_TOKEN=... tunnel-agent run --server edge.example.com:7000 --sandbox-id abc123
  tunnel-agent expose 8000 --name api      # prints the preview URL
  tunnel-agent ports                       # PORT NAME URL table
  tunnel-agent unexpose 8000
  tunnel-agent status
  tunnel-agent wait 8000 --http /health && tunnel-agent expose 8000

exit codes: 0 ok, 1 the agent refused the request, 2 usage error, 3 agent not reachable,
130 interrupted (Ctrl-C)
"""

_RUN_EPILOG = f"""\
The agent token is read from the environment variable {ENV_TOKEN} or from --token-file,
never from the command line: arguments are visible to every process on the machine (ps,
/proc/PID/cmdline), which is how tokens passed as `cloudflared tunnel run --token ...` leaked.

several edges (failover):
  --server takes a comma-separated list, e.g. --server a.example.com:7000,b.example.com:7000
  (each entry HOST:PORT, [IPv6]:PORT, ws://HOST:PORT or wss://HOST:PORT). A host name may also
  resolve to several addresses; it is looked up again at every connect round, and all of its
  addresses are tried in the order DNS returns them. The agent starts with the address that
  last worked (the first at start); when a connect or handshake fails (each bounded by a 10 s
  timeout) it tries the next address at once, and it backs off (~0.1 s doubling to 20 s, with
  jitter) only after every address failed in a row. After a lost session it tries the same
  edge first; after an edge's GO_AWAY SHUTTING_DOWN (it is draining) the next one first.
  With TLS each edge's certificate must name that entry's host, unless --tls-server-name is
  given.

behind an HTTP proxy:
  Each edge is reached through an HTTP proxy's CONNECT when one applies, as curl chooses:
  --proxy URL (or env TUNNEL_AGENT_PROXY) wins; else https_proxy / HTTPS_PROXY for a TLS or
  wss:// edge, http_proxy / HTTP_PROXY for a plain one, then all_proxy / ALL_PROXY. An edge
  whose host matches no_proxy / NO_PROXY (comma-separated: *, example.com or .example.com for
  the domain and its subdomains, IP addresses, CIDR blocks, optionally :PORT) is dialled
  directly; loopback is not excluded unless listed. The URL is http://[USER:PASSWORD@]HOST:PORT
  (Basic authentication; https:// and socks proxies are not supported). TLS and the WebSocket
  handshake go end to end to the edge inside the tunnel (the certificate must name the edge, not
  the proxy); the proxy resolves the edge's name. --no-proxy or --proxy "" turns proxies off.
  The log names the proxy used for each edge; credentials are never logged.

examples:
  export {ENV_TOKEN}=...    # or: --token-file /run/secrets/tunnel-agent-token
  tunnel-agent run --server edge.example.com:7000 --sandbox-id abc123
  tunnel-agent run --tls --server edge-a.example.com:7000,edge-b.example.com:7000 \\
      --sandbox-id abc123
  HTTPS_PROXY=http://proxy.internal:3128 tunnel-agent run --tls \\
      --server edge.example.com:7000 --sandbox-id abc123
"""

_EXPOSE_EPILOG = """\
example:
  $ tunnel-agent expose 8000 --name api
  http://8000-abc123-k3x9q2m7p4w8z1c5.localhost:8080/

Exposing a port again is harmless and keeps its URL (unless --token changes it).
"""

_UNEXPOSE_EPILOG = """\
example:
  tunnel-agent unexpose 8000    # the URL stops working at once; unknown ports are not an error
"""

_PORTS_EPILOG = """\
example:
  $ tunnel-agent ports
  PORT  NAME  URL
  8000  api   http://8000-abc123-k3x9q2m7p4w8z1c5.localhost:8080/
"""

_WAIT_EPILOG = """\
The agent probes 127.0.0.1:PORT (then ::1) until it is ready: with --http PATH, until
GET PATH answers with a status in the --status range (default 200-399); without, until a TCP
connect succeeds. The port need not be exposed.

exit codes: 0 ready, 1 not ready within --timeout (the last status or error is printed) or
the agent refused the request, 2 usage error, 3 agent not reachable

example:
  $ tunnel-agent wait 8000 --http /health --timeout 60 && tunnel-agent expose 8000
  port 8000 is ready
  http://8000-abc123-k3x9q2m7p4w8z1c5.localhost:8080/
"""

_STATUS_EPILOG = """\
example:
  $ tunnel-agent status
  sandbox  abc123
  edge     connected
"""


class _ApiError(Exception):
    def __init__(self, message: str, code: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


class _Unreachable(Exception):
    pass


class AgentClient:
    """A minimal blocking client of the local control API (stdlib ``http.client`` only)."""

    def __init__(self, base_url: str = DEFAULT_API, timeout: float = CLIENT_TIMEOUT) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"expected an http://HOST:PORT URL, got {base_url!r}")
        self.base_url = base_url
        self._host = parts.hostname
        if parts.port == 0:  # (.port raises ValueError on a malformed or out-of-range port)
            raise ValueError(f"expected an http://HOST:PORT URL, port 1-65535, got {base_url!r}")
        self._port = parts.port or 80
        self._prefix = parts.path.rstrip("/")
        self._timeout = timeout

    def _connect(self) -> http.client.HTTPConnection:
        """A connection to the agent's API; ``_Unreachable`` if nothing answers the connect
        (refused, or no answer within the timeout: a black-holed address is unreachable, not
        an agent that is running but stuck)."""
        connect_timeout = min(self._timeout, CLIENT_TIMEOUT)  # a long answer, not a long connect
        conn = http.client.HTTPConnection(self._host, self._port, timeout=connect_timeout)
        try:
            conn.connect()
        except OSError as exc:  # TimeoutError included
            conn.close()
            raise _Unreachable(str(exc) or type(exc).__name__) from exc
        assert conn.sock is not None
        conn.sock.settimeout(self._timeout)
        return conn

    def request(self, method: str, path: str, body: object = None) -> Any:
        """Send one request; return the decoded JSON (``None`` for an empty body).

        Raises ``_Unreachable`` if the agent does not answer, ``_ApiError`` on a non-2xx answer.
        """
        payload = None if body is None else json.dumps(body).encode()
        headers = {"accept": "application/json"}
        if payload is not None:
            headers["content-type"] = "application/json"
        conn = self._connect()
        try:
            conn.request(method, self._prefix + path, body=payload, headers=headers)
            response = conn.getresponse()
            status, reason, raw = response.status, response.reason, response.read()
        except TimeoutError:
            # It answered the connect but not the request: running, but stuck.
            raise _ApiError(
                f"the tunnel agent at {self.base_url} did not answer within {self._timeout:g} s",
                "AGENT_TIMEOUT",
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise _Unreachable(str(exc)) from exc
        finally:
            conn.close()
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
        if 200 <= status < 300:
            if raw and data is None:
                raise _ApiError("the agent sent a response that is not JSON", "BAD_RESPONSE")
            return data
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            raise _ApiError(data["error"], str(data.get("code", "UNKNOWN_ERROR")))
        raise _ApiError(f"the agent answered HTTP {status} {reason}", f"HTTP_{status}")

    def watch(self, body: dict[str, object]) -> dict[str, Any]:
        """``POST /api/port-watch``: read the event stream to its last event (``ready`` or
        ``error``) and return it. Raises like :meth:`request`."""
        conn = self._connect()
        try:
            conn.request(
                "POST",
                self._prefix + "/api/port-watch",
                body=json.dumps(body).encode(),
                headers={"content-type": "application/json", "accept": "text/event-stream"},
            )
            response = conn.getresponse()
            if response.status != 200:
                raw = response.read()
                try:
                    data = json.loads(raw)
                except ValueError:
                    data = None
                if isinstance(data, dict) and isinstance(data.get("message"), str):
                    code = str(data.get("code", "UNKNOWN_ERROR"))
                    raise _ApiError(data["message"], code, response.status)
                raise _ApiError(
                    f"the agent answered HTTP {response.status} {response.reason}",
                    f"HTTP_{response.status}",
                    response.status,
                )
            last: dict[str, Any] = {}
            while True:
                line = response.readline(65536)
                if not line:
                    break
                if line.startswith(b"data: "):
                    try:
                        last = json.loads(line[6:])
                    except ValueError:
                        raise _ApiError(
                            "the agent sent an event that is not JSON", "BAD_RESPONSE"
                        ) from None
                    if last.get("type") in ("ready", "error"):
                        return last
        except TimeoutError:
            raise _ApiError(
                f"the tunnel agent at {self.base_url} did not answer within {self._timeout:g} s",
                "AGENT_TIMEOUT",
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise _Unreachable(str(exc)) from exc
        finally:
            conn.close()
        raise _ApiError("the agent ended the watch without a result", "BAD_RESPONSE")


# -- argument types --------------------------------------------------------------------------


class ServerEntry(NamedTuple):
    """One entry of ``--server``: ``[ws://|wss://]HOST:PORT`` (``[v6]:PORT`` for IPv6)."""

    text: str  # as written, for messages
    scheme: str  # "", "ws" or "wss"
    host: str  # without brackets
    port: int


_SERVER_SYNTAX: Final = "expected HOST:PORT or ws(s)://HOST:PORT"
# A host name as resolvers take it (letters, digits, '-', '_', '.'); IP literals are checked apart.
_HOST_NAME: Final = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})")


def _server_entry(text: str) -> ServerEntry:
    """Parse one ``[ws://|wss://]HOST:PORT``; ValueError saying what is wrong with it."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    elif scheme not in ("ws", "wss"):
        raise ValueError(f"{_SERVER_SYNTAX}, got {text!r} (unknown scheme {scheme}://)")
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{_SERVER_SYNTAX}, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{_SERVER_SYNTAX}, got {text!r} (not an IPv6 address)") from None
    elif ":" in host:
        try:  # unbracketed IPv6, accepted as before lists: the port follows the last ':'
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{_SERVER_SYNTAX}, got {text!r}") from None
    elif not _HOST_NAME.fullmatch(host):
        raise ValueError(f"{_SERVER_SYNTAX}, got {text!r} (not a host name)")
    return ServerEntry(text, scheme, host, int(port))


def parse_servers(text: str) -> list[ServerEntry]:
    """``--server``: a comma-separated list of edges; every entry checked, the bad one named."""
    parts = [part.strip() for part in text.split(",")]
    entries: list[ServerEntry] = []
    seen: set[tuple[str, int]] = set()
    for number, part in enumerate(parts, 1):
        where = f" (entry {number} of {len(parts)})" if len(parts) > 1 else ""
        if not part:
            raise ValueError(f"{_SERVER_SYNTAX}, got an empty entry{where} in {text!r}")
        try:
            entry = _server_entry(part)
        except ValueError as exc:
            raise ValueError(f"{exc}{where}") from None
        if (entry.host.lower(), entry.port) in seen:
            raise ValueError(f"{part!r} is listed twice in --server {text!r}")
        seen.add((entry.host.lower(), entry.port))
        entries.append(entry)
    return entries


def _server_list(text: str) -> str:
    """argparse type of ``--server``: validated up front, kept as written."""
    try:
        parse_servers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def plaintext_refusal(server: str, *, tls: bool, insecure: bool) -> str | None:
    """Why ``--server`` must not be used without TLS, or None (issue 7 row 3).

    Only TLS detects a corrupted byte on the link, so plain TCP and ws:// go to loopback only
    (``localhost`` or a loopback address) unless ``--insecure-plaintext`` says the network is
    trusted; the edge applies the same rule to its peers. With a list, every entry must pass:
    the first one that does not is named.
    """
    if tls or insecure:
        return None
    for entry in parse_servers(server):
        if entry.scheme == "wss":
            continue
        try:
            loopback = (
                entry.host.lower() == "localhost" or ipaddress.ip_address(entry.host).is_loopback
            )
        except ValueError:
            loopback = False
        if not loopback:
            return (
                f"--server {entry.text} is not a loopback address: the link to the edge must "
                "use TLS (--tls or wss://), or pass --insecure-plaintext on a trusted network"
            )
    return None


def _tcp_port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port 0-65535, got {text!r}")
    return int(text)


def _connection_count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1_000_000:
        raise argparse.ArgumentTypeError(f"expected a count 1-1000000, got {text!r}")
    return int(text)


_PORT_RULE: Final = (
    f"the agent exposes and watches ports {MIN_PORT}-65535 only, except {CONTROL_PLANE_PORT} "
    "and its own API port"
)


def _sandbox_port(text: str) -> int:
    """argparse type of the PORT of ``expose``, ``unexpose`` and ``wait``: a port the agent serves,
    checked here so that bad input is a usage error (exit 2) before any connection: a TCP port
    number, 1024-65535 and not 3000 (``protocol.hostnames.validate_port``, the agent's and the
    edge's rule). The agent's own API port is not known here (the ``--api`` URL may reach it
    through another port): the agent refuses it, and that refusal exits 1 like any other."""
    if not (text.isascii() and text.isdigit() and len(text) <= 5) or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"expected a TCP port number 1-65535, got {text!r}")
    port = int(text)
    if port < MIN_PORT:
        raise argparse.ArgumentTypeError(
            f"{port} is below {MIN_PORT} (privileged ports, for system services): {_PORT_RULE}"
        )
    if port == CONTROL_PLANE_PORT:
        raise argparse.ArgumentTypeError(
            f"{port} is the sandbox control plane's port (the agent's local API by default): "
            f"{_PORT_RULE}"
        )
    return port


def _probe_path(text: str) -> str:
    """argparse type of ``wait --http PATH``: the agent's rule (``agent.portwatch.check_path``),
    checked here so that a bad path is a usage error before any connection."""
    if (
        not text.startswith("/")
        or len(text) > WAIT_MAX_PATH
        or not text.isascii()
        or any(c <= " " or c == "\x7f" for c in text)
    ):
        raise argparse.ArgumentTypeError(
            f"expected an absolute ASCII path without spaces, e.g. /health (at most "
            f"{WAIT_MAX_PATH} characters), got {text[:64]!r}"
        )
    return text


def _status_range(text: str) -> tuple[int, int]:
    low, dash, high = text.partition("-")
    try:
        lo, hi = int(low), int(high if dash else low)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected CODE or MIN-MAX, e.g. 200-399, got {text!r}"
        ) from None
    if not 100 <= lo <= hi <= 599:
        raise argparse.ArgumentTypeError(
            f"expected HTTP statuses 100-599, MIN <= MAX, got {text!r}"
        )
    return lo, hi


def _wait_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= WAIT_MAX_SECONDS:  # nan fails too
        raise argparse.ArgumentTypeError(
            f"expected seconds in (0, {WAIT_MAX_SECONDS:g}], got {text!r}"
        )
    return value


def _allowed_host(text: str) -> str:
    name = text.strip().lower().rstrip(".")
    if not _HOST_NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(
            f"expected a host name such as 'agent' or 'sandbox.internal' (no port, no "
            f"wildcard), got {text!r}"
        )
    return name


def _sandbox_id(text: str) -> str:
    try:
        return validate_sandbox_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _RefuseToken(argparse.Action):
    """``run --token`` exists only to explain why it does not."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> NoReturn:
        parser.error(
            f"--token is not accepted: command lines are visible to every process (ps); "
            f"set {ENV_TOKEN} or use --token-file PATH"
        )


# -- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="tunnel-agent",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=fmt,
        allow_abbrev=False,  # so `--token` can never silently mean `--token-file`
    )
    api_help = f"local control API of the agent (env {ENV_API}, default {DEFAULT_API})"
    parser.add_argument("--api", metavar="URL", default=None, help=api_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # A client subcommand also takes --api after its name; SUPPRESS keeps the top-level value.
    client = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    client.add_argument("--api", metavar="URL", default=argparse.SUPPRESS, help=api_help)

    run = sub.add_parser(
        "run",
        help="run the agent: connect to the edge and serve the local control API",
        description="Run the agent: connect to the tunneld edge, keep the connection alive "
        "(reconnecting after any loss) and serve the local control API.",
        epilog=_RUN_EPILOG,
        formatter_class=fmt,
        allow_abbrev=False,
    )
    run.add_argument(
        "--server",
        metavar="HOST:PORT[,HOST:PORT...]",
        type=_server_list,
        default=os.environ.get(ENV_SERVER),
        help=f"edge agent listener (required; env {ENV_SERVER}), or a comma-separated list of "
        "edges to fail over between, in order (see below); ws://HOST:PORT or wss://HOST:PORT "
        "carries the link in WebSocket messages (egress that allows only HTTP)",
    )
    run.add_argument(
        "--sandbox-id",
        metavar="ID",
        type=_sandbox_id,
        default=os.environ.get(ENV_SANDBOX_ID),
        help=f"this sandbox's id, 1-63 of [a-z0-9-] (required; env {ENV_SANDBOX_ID})",
    )
    run.add_argument(
        "--token-file",
        metavar="PATH",
        help=f"read the agent token from PATH (default: env {ENV_TOKEN}); "
        "never pass a token as an argument",
    )
    run.add_argument("--token", nargs="?", action=_RefuseToken, help=argparse.SUPPRESS)
    run.add_argument(
        "--api-host",
        metavar="HOST",
        default="127.0.0.1",
        help="address of the local control API (default 127.0.0.1: anything that can reach it "
        "can publish ports)",
    )
    run.add_argument(
        "--api-port",
        metavar="PORT",
        type=_tcp_port,
        default=3000,
        help="port of the local control API (default 3000; 0 picks a free one, written to "
        "$TUNNEL_AGENT_PORTS_FILE if set); the agent never exposes nor dials this port",
    )
    run.add_argument(
        "--api-allow-host",
        metavar="NAME",
        action="append",
        type=_allowed_host,
        default=[],
        help="also answer the local API under the Host name NAME (repeatable): a container "
        "or service name clients use with --api-host 0.0.0.0. By default the API answers "
        "localhost, *.localhost, loopback and its bind address, and any IP address on a "
        "wildcard bind; other names get 403 (a DNS-rebinding page sends its own name)",
    )
    run.add_argument("--tls", action="store_true", help="connect to the edge over TLS")
    run.add_argument(
        "--insecure-plaintext",
        action="store_true",
        help="allow plain TCP / ws:// to a non-loopback --server (trusted networks only: "
        "without TLS a corrupted byte on the link goes undetected)",
    )
    run.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="CA bundle to verify the edge with (implies --tls; default: the system's CAs)",
    )
    run.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="name expected in every edge's certificate (implies --tls; default: each --server "
        "entry's host)",
    )
    egress = run.add_mutually_exclusive_group()
    egress.add_argument(
        "--proxy",
        metavar="URL",
        default=None,
        help=f"reach every edge through this HTTP proxy, http://[USER:PASSWORD@]HOST:PORT (env "
        f"{ENV_PROXY}; default: https_proxy/http_proxy/all_proxy, minus no_proxy; see below); "
        '--proxy "" connects directly',
    )
    egress.add_argument(
        "--no-proxy",
        action="store_true",
        help="connect to the edges directly, whatever the proxy environment variables say",
    )
    run.add_argument(
        "--max-connections",
        metavar="N",
        type=_connection_count,
        default=None,
        help="at most N connections to local services at a time, across all tunnel streams; "
        "a stream past it is refused (the edge answers 503 SANDBOX_BUSY) so the agent keeps "
        "file descriptors for its link and its local API (default: the soft RLIMIT_NOFILE "
        "minus 160, at least a quarter of it, at most 4096; at start the agent raises the soft "
        "limit to the hard one, at most 65536 or what N needs)",
    )
    run.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=os.environ.get(ENV_LOG_LEVEL, "info").lower(),
        help=f"log verbosity (env {ENV_LOG_LEVEL}, default info)",
    )
    run.set_defaults(handler=_cmd_run)

    expose = sub.add_parser(
        "expose",
        parents=[client],
        help="expose a port and print its preview URL",
        description="Expose PORT (1024-65535, not 3000 nor the agent's own API port) and print "
        "its public preview URL.",
        epilog=_EXPOSE_EPILOG,
        formatter_class=fmt,
        allow_abbrev=False,
    )
    expose.add_argument("port", metavar="PORT", type=_sandbox_port, help="local port to expose")
    expose.add_argument("--name", help="a label for the port, shown in `ports` (default: none)")
    expose.add_argument(
        "--token",
        help="custom URL token, 1-16 of [a-z0-9_] (default: keep the current one or generate one)",
    )
    expose.add_argument(
        "--protocol",
        choices=("http", "tcp", "tls"),
        default="http",
        help="http: a preview URL (default); tcp: a public TCP port; tls: TLS routed by SNI and "
        "ended in the sandbox (tcp and tls only where the edge enables them)",
    )
    expose.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="send the service a PROXY protocol v2 header with the client's address first",
    )
    expose.add_argument(
        "--inspect",
        action="store_true",
        help="record requests to this port for inspection (`tunneld inspect`; http only)",
    )
    expose.add_argument("--json", action="store_true", help="print the JSON answer instead")
    expose.set_defaults(handler=_cmd_expose)

    unexpose = sub.add_parser(
        "unexpose",
        parents=[client],
        help="stop exposing a port",
        description="Stop exposing PORT: its preview URL stops working at once.",
        epilog=_UNEXPOSE_EPILOG,
        formatter_class=fmt,
        allow_abbrev=False,
    )
    unexpose.add_argument("port", metavar="PORT", type=_sandbox_port, help="exposed port")
    unexpose.set_defaults(handler=_cmd_unexpose)

    ports = sub.add_parser(
        "ports",
        parents=[client],
        help="list exposed ports",
        description="List the exposed ports with their names and preview URLs, sorted by port.",
        epilog=_PORTS_EPILOG,
        formatter_class=fmt,
        allow_abbrev=False,
    )
    ports.add_argument("--json", action="store_true", help="print a JSON list instead")
    ports.set_defaults(handler=_cmd_ports)

    status = sub.add_parser(
        "status",
        parents=[client],
        help="show the sandbox id and whether the agent is connected to the edge",
        description="Show the sandbox id and whether the agent is connected to the edge.",
        epilog=_STATUS_EPILOG,
        formatter_class=fmt,
        allow_abbrev=False,
    )
    status.add_argument("--json", action="store_true", help="print the JSON answer instead")
    status.set_defaults(handler=_cmd_status)

    wait = sub.add_parser(
        "wait",
        parents=[client],
        help="wait until a port is ready (a TCP listener, or an HTTP status)",
        description="Wait until PORT inside the sandbox is ready, then exit 0.",
        epilog=_WAIT_EPILOG,
        formatter_class=fmt,
        allow_abbrev=False,
    )
    wait.add_argument("port", metavar="PORT", type=_sandbox_port, help="local port to watch")
    wait.add_argument(
        "--http",
        metavar="PATH",
        dest="http_path",
        type=_probe_path,
        help="ready when GET PATH answers with a --status code (default: a TCP connect)",
    )
    wait.add_argument(
        "--status",
        metavar="MIN-MAX",
        type=_status_range,
        help="with --http: the ready status codes, e.g. 200 or 200-399 (default 200-399)",
    )
    wait.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_wait_seconds,
        default=30.0,
        help=f"give up after this long (default 30, at most {WAIT_MAX_SECONDS:g})",
    )
    wait.add_argument(
        "--interval",
        metavar="SECONDS",
        type=_wait_seconds,
        default=0.5,
        help="between probes (default 0.5; the agent clamps it to 0.1-10)",
    )
    wait.set_defaults(handler=_cmd_wait)
    return parser


# -- commands --------------------------------------------------------------------------------


def _read_token(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            parser.error(f"cannot read --token-file: {exc.strerror or exc}")
        except UnicodeDecodeError:
            parser.error(f"--token-file {args.token_file} is not UTF-8 text")
        if not token:
            parser.error(f"--token-file {args.token_file} is empty")
        return token
    token = os.environ.get(ENV_TOKEN, "").strip()
    if not token:
        parser.error(f"no agent token: set {ENV_TOKEN} or pass --token-file PATH")
    return token


def _cmd_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not args.server:
        parser.error(f"--server HOST:PORT is required (or set {ENV_SERVER})")
    args.token = _read_token(args, parser)
    if not args.sandbox_id:
        parser.error(f"--sandbox-id ID is required (or set {ENV_SANDBOX_ID})")
    if args.log_level not in LOG_LEVELS:  # argparse checks choices on the command line only
        parser.error(
            f"{ENV_LOG_LEVEL}: expected one of {', '.join(LOG_LEVELS)}, got {args.log_level!r}"
        )
    if args.tls_ca or args.tls_server_name:
        args.tls = True
    refusal = plaintext_refusal(args.server, tls=args.tls, insecure=args.insecure_plaintext)
    if refusal is not None:
        parser.error(refusal)
    from .proxy import ProxyConfigError

    try:
        proxy_choices(args)
    except ProxyConfigError as exc:  # the message is redacted: no credentials in it
        parser.error(str(exc))
    return run_from_args(args)


# -- the agent process -----------------------------------------------------------------------
# asyncio, ssl, the core and the event loop are imported here only: the client commands must not
# need (or pay for) them.


def run_from_args(args: argparse.Namespace) -> int:
    """Run the agent until SIGTERM/SIGINT; the exit code of ``tunnel-agent run``."""
    import asyncio
    import logging
    import ssl

    if getattr(args, "tls_ca", None):
        try:  # built again for each connection; first here, so a bad file stops the start
            _tls_context(args)
        except (OSError, ssl.SSLError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            print(
                f"tunnel-agent: error: --tls-ca {args.tls_ca}: cannot load a CA bundle from it "
                f"({detail})",
                file=sys.stderr,
            )
            return EXIT_USAGE
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from relay.loop import new_event_loop

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return int(runner.run(_run(args)) or 0)


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext:
    import ssl

    return ssl.create_default_context(cafile=getattr(args, "tls_ca", None) or None)


def proxy_choices(
    args: argparse.Namespace, environ: dict[str, str] | None = None
) -> list[ProxyChoice]:
    """The proxy (or none) for each ``--server`` entry, in order, and why (agent/proxy.py).

    Raises ``ProxyConfigError`` (redacted) when the chosen proxy URL cannot be used.
    """
    from .proxy import select_proxy

    env = dict(os.environ) if environ is None else environ
    explicit = getattr(args, "proxy", None)
    source = "--proxy"
    if explicit is None:
        explicit = env.get(ENV_PROXY, "").strip() or None
        source = ENV_PROXY  # the log and errors name what the operator set
    tls = bool(getattr(args, "tls", False))
    return [
        select_proxy(
            entry.host,
            entry.port,
            tls or entry.scheme == "wss",
            explicit=explicit,
            explicit_source=source,
            disabled=bool(getattr(args, "no_proxy", False)),
            environ=env,
        )
        for entry in parse_servers(args.server)
    ]


def agent_config(args: argparse.Namespace, environ: dict[str, str] | None = None) -> AgentConfig:
    """The ``AgentConfig`` that ``run`` builds from its parsed arguments (``args.token`` set)
    and the proxy environment (``environ``, default ``os.environ``)."""
    from .core import AgentConfig, EdgeAddress

    tls = bool(getattr(args, "tls", False))
    servers = tuple(
        EdgeAddress(
            entry.host,
            entry.port,
            tls=tls or entry.scheme == "wss",
            websocket=entry.scheme in ("ws", "wss"),
            proxy=choice.proxy,
        )
        for entry, choice in zip(
            parse_servers(args.server), proxy_choices(args, environ), strict=True
        )
    )
    first = servers[0]
    return AgentConfig(
        server_host=first.host,
        server_port=first.port,
        sandbox_id=args.sandbox_id,
        token=args.token,
        tls=_tls_context(args) if any(edge.tls for edge in servers) else None,
        server_hostname=getattr(args, "tls_server_name", None),
        websocket=first.websocket,
        servers=servers,
        max_connections=getattr(args, "max_connections", None),
    )


async def _run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    from .core import Agent

    log = logging.getLogger("tunnel.agent")
    choices = proxy_choices(args)
    config = agent_config(args)
    if args.proxy and "@" in args.proxy:
        log.warning(
            "--proxy carries credentials on the command line, where every process can read "
            "them (ps); set %s or HTTPS_PROXY instead",
            ENV_PROXY,
        )
    for edge, choice in zip(config.servers, choices, strict=True):
        if choice.proxy is not None:
            log.info("edge %s: via proxy %s (%s)", edge, choice.proxy, choice.reason)
        elif choice.reason != "no proxy configured":
            log.info("edge %s: direct (%s)", edge, choice.reason)
    _raise_fd_limit(config.max_connections, log)
    agent = Agent(config)  # its default cap follows the raised limit
    _log_connection_limit(agent, log)
    loop = asyncio.get_running_loop()
    from relay.accept import guard_accept

    guard_accept(loop)  # the local API out of descriptors (asyncio): no traceback storm
    try:
        from .local_api import HostCheck

        host_check = HostCheck(args.api_host, args.api_allow_host)
        api = await agent.serve_local_api(args.api_host, args.api_port, host_check=host_check)
    except OSError as exc:
        log.error(
            "cannot serve the local API on %s:%s: %s",
            args.api_host,
            args.api_port,
            exc.strerror or exc,
        )
        return 1
    ports_file = os.environ.get("TUNNEL_AGENT_PORTS_FILE")
    if ports_file:
        with open(ports_file + ".tmp", "w") as f:
            json.dump({"api": api.port}, f)
        os.replace(ports_file + ".tmp", ports_file)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = loop.create_task(agent.run())
    await stop.wait()
    log.info("stopping")
    await agent.stop()
    runner.cancel()
    try:
        await runner
    except asyncio.CancelledError:
        pass
    await api.close()
    return 0


def _raise_fd_limit(max_connections: int | None, log: logging.Logger) -> None:
    """Raise the soft RLIMIT_NOFILE towards the hard one (agent.core.raise_fd_limit) and say so
    in one line; a limit that cannot be raised is logged, never fatal."""
    from .core import raise_fd_limit

    before, after, error = raise_fd_limit(max_connections)
    if error is not None:
        log.info("file descriptor limit %d kept: cannot raise it (%s)", before, error)
    elif after != before:
        log.info("file descriptor limit raised from %d to %d", before, after)


def _log_connection_limit(agent: Agent, log: logging.Logger) -> None:
    """Say how many local connections the agent holds at most, and warn when ``--max-connections``
    leaves fewer than ``FD_RESERVE`` descriptors for the link and the local API."""
    import resource

    from .core import FD_RESERVE

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    limit = "unlimited" if soft == resource.RLIM_INFINITY else str(soft)
    log.info(
        "at most %d local connections at a time (file descriptor limit %s)",
        agent.max_connections,
        limit,
    )
    explicit = agent.config.max_connections is not None
    if explicit and soft != resource.RLIM_INFINITY and agent.max_connections > soft - FD_RESERVE:
        log.warning(
            "--max-connections %d leaves fewer than %d of the %d file descriptors for the link "
            "and the local API: past about %d local connections, dials, reconnects and local API "
            "requests may fail (raise the limit: ulimit -n)",
            agent.max_connections,
            FD_RESERVE,
            soft,
            max(soft - FD_RESERVE, 0),
        )


def _client(
    args: argparse.Namespace, parser: argparse.ArgumentParser, timeout: float = CLIENT_TIMEOUT
) -> AgentClient:
    url = args.api or os.environ.get(ENV_API) or DEFAULT_API
    try:
        return AgentClient(url, timeout)
    except ValueError as exc:
        parser.error(f"--api: {exc}")


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2))


def _cmd_expose(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    body: dict[str, object] = {"port": args.port}
    if args.name is not None:
        body["name"] = args.name
    if args.token is not None:
        body["token"] = args.token
    if args.protocol != "http":
        body["protocol"] = args.protocol
    if args.proxy_protocol:
        body["proxyProtocol"] = True
    if args.inspect:
        body["inspect"] = True
    data = _client(args, parser, EDGE_CLIENT_TIMEOUT).request("POST", "/v1/ports", body)
    if args.json:
        _print_json(data)
    else:
        print(data["exposedAt"])
    return EXIT_OK


def _cmd_unexpose(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _client(args, parser, EDGE_CLIENT_TIMEOUT).request("DELETE", f"/v1/ports/{args.port}")
    print(f"port {args.port} is no longer exposed")
    return EXIT_OK


def _cmd_ports(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    ports = _client(args, parser, EDGE_CLIENT_TIMEOUT).request("GET", "/v1/ports")["ports"]
    if args.json:
        _print_json(ports)
        return EXIT_OK
    rows = [("PORT", "NAME", "URL")]
    rows += [(str(p["port"]), p.get("name") or "-", p["exposedAt"]) for p in ports]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    for port, name, url in rows:
        print(f"{port:<{widths[0]}}  {name:<{widths[1]}}  {url}")
    return EXIT_OK


def _cmd_status(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    data = _client(args, parser).request("GET", "/v1/status")
    if args.json:
        _print_json(data)
    else:
        print(f"sandbox  {data['sandboxId']}")
        print(f"edge     {'connected' if data['connected'] else 'not connected'}")
    return EXIT_OK


def _cmd_wait(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.status is not None and args.http_path is None:
        parser.error("--status needs --http PATH")
    body: dict[str, object] = {
        "port": args.port,
        "mode": "tcp" if args.http_path is None else "http",
        "interval": round(args.interval * 1000),
        "timeout": round(args.timeout * 1000),
    }
    if args.http_path is not None:
        body["path"] = args.http_path
    if args.status is not None:
        body["statusMin"], body["statusMax"] = args.status
    # The agent ends the stream by itself at --timeout; the margin covers a busy machine.
    # A refusal by the agent (its own API port, a rule of a newer agent) is its answer: exit 1,
    # as for `expose`; what can be checked here was checked by the argument types.
    event = _client(args, parser, args.timeout + CLIENT_TIMEOUT).watch(body)
    if event.get("type") == "ready":
        print(f"port {args.port} is ready")
        return EXIT_OK
    print(f"error: {event.get('error') or 'the port is not ready'}", file=sys.stderr)
    return EXIT_API_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # the program itself, not a caller in-process
        # Installed already by agent.entry (the console script, `python -m agent`, the zipapp)
        # before this module's imports; here for `python -m agent.cli` and older installs.
        exit_on_sigint()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return int(args.handler(args, parser))
    except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except KeyboardInterrupt:  # main(argv) called in-process, or Ctrl-C after `run`'s loop ended
        return EXIT_INTERRUPTED
    except _ApiError as exc:
        print(f"error: {exc.message} ({exc.code})", file=sys.stderr)
        return EXIT_API_ERROR
    except _Unreachable:
        url = getattr(args, "api", None) or os.environ.get(ENV_API) or DEFAULT_API
        print(
            f"error: cannot reach the tunnel agent at {url} — is `tunnel-agent run` running?",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE
    except (KeyError, TypeError):  # a 2xx answer without the fields we print
        if args.command == "run":
            raise
        print("error: unexpected response from the tunnel agent (BAD_RESPONSE)", file=sys.stderr)
        return EXIT_API_ERROR


if __name__ == "__main__":
    sys.exit(main())
