"""``tunneld``: the edge daemon's command line (serve, token, exposures, port-forward, demo).

Signals while ``tunneld serve`` starts
--------------------------------------
The program starts in tunneld/entry.py, which takes SIGTERM, SIGINT and SIGHUP before this
module's imports (argparse, asyncio, the configuration ...): SIGTERM and SIGINT end the process
at once with one line on stderr, exit 0 for SIGTERM (a stop, as after a drain) and 130 for
SIGINT, no traceback, since nothing has been started yet; a SIGHUP is deferred, and applied as a
reload once :func:`_serve` (or the supervisor) installs its reload handler. Run as the program
itself (``python -m tunneld.cli``: the supervisor's workers) this module takes them the same way
in its first lines. Everything that starts something (a store, listeners, a redis-server,
workers) runs on an event loop whose own handlers replace those first: :func:`_serve` installs
them before it opens the store, and ``Supervisor.run`` (tunneld/supervisor.py) before it takes
the ports, so a SIGTERM or SIGINT there abandons the start and stops what it began. The other
commands get Python's defaults back once the command line is parsed. Only Python's own start,
``import tunneld`` and tunneld/entry.py's ``import signal`` come before the handlers (in a worker
with the three held blocked by its supervisor until then: tunneld/supervisor.py, **Signals**).
"""

from __future__ import annotations

import os
import sys

from .entry import (
    EXIT_INTERRUPTED,
    handle_start_signals,
    restore_default_signals,
    take_deferred_reload,
)


def _is_the_program() -> bool:
    """Run as ``tunneld`` (a console script written before tunneld/entry.py, which takes the
    signals first itself) or ``python -m tunneld.cli`` (a worker), not imported by someone
    else's process (a test, an embedding program)."""
    return __name__ == "__main__" or os.path.basename(sys.argv[0] if sys.argv else "") == "tunneld"


if _is_the_program():
    handle_start_signals()

import argparse  # noqa: E402 - after the handlers: a signal during these imports is handled
import asyncio  # noqa: E402
import logging  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

from relay.loop import new_event_loop  # noqa: E402

from .config import Config, ConfigError, check_store, load_config, parse_workers  # noqa: E402

log = logging.getLogger("tunneld")

EPILOG = """\
examples:
  TUNNELD_ADMIN_TOKEN=$(cat /etc/tunneld/admin-token) TUNNELD_SECRET_FILE=/etc/tunneld/secret \\
      tunneld serve --domain preview.example.com --scheme https --url-port 443
  tunneld serve --domain preview.example.com --public-port 443 --public-redirect-port 80 \\
      --public-tls-cert /etc/tunneld/wildcard.pem --public-tls-key /etc/tunneld/wildcard.key
  tunneld token abc123            # mint the agent token for sandbox abc123
  tunneld demo                    # edge + agent + sample service on loopback, prints the URL
  tunneld exposures export > backup.jsonl     # stored exposures as JSON lines (safe while running)
  tunneld exposures import backup.jsonl       # restore them (tunneld stopped)
  tunneld inspect abc123 --follow             # requests its preview URLs serve (inspection on)
  tunneld replay abc123 42                    # send recorded request 42 again
  tunneld port-forward abc123 16379:6379      # 127.0.0.1:16379 -> port 6379 in sandbox abc123

secrets never go on the command line (they would show in ps): use the environment
(TUNNELD_ADMIN_TOKEN, TUNNELD_SECRET), files (TUNNELD_ADMIN_TOKEN_FILE, TUNNELD_SECRET_FILE),
or admin_token_file / secret_file in the config file.
"""


def _setup_logging(level: str, worker: int | None = None, fmt: str = "text") -> None:
    tag = "" if worker is None else f"[w{worker}]"  # workers share the supervisor's stderr
    from . import accesslog

    accesslog.WORKER = worker  # its lines carry the same tag (tunneld/accesslog.py)
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)-7s %(name)s{tag}: %(message)s",
        stream=sys.stderr,
    )
    if fmt == "json":
        from .logs import JsonFormatter

        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter(worker))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunneld",
        description="tunneld: preview URLs for sandbox ports ({port}-{sandbox}-{token}.{domain}).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    serve = sub.add_parser(
        "serve",
        help="run the edge daemon",
        description="Run the edge: agent listener, public preview listener, admin API.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        help="TOML config file (default $TUNNELD_CONFIG, else none: defaults and environment)",
    )
    serve.add_argument("--domain", help="preview domain (default localhost)")
    serve.add_argument(
        "--scheme",
        choices=["http", "https"],
        help="scheme printed in preview URLs (default http; https with --public-tls-cert)",
    )
    serve.add_argument(
        "--url-port", type=int, help="port printed in preview URLs (default: the public port)"
    )
    serve.add_argument("--public-host", help="public listener address (default 127.0.0.1)")
    serve.add_argument("--public-port", type=int, help="public listener port (default 8080)")
    serve.add_argument("--agent-host", help="agent listener address (default 127.0.0.1)")
    serve.add_argument("--agent-port", type=int, help="agent listener port (default 7000)")
    serve.add_argument("--admin-host", help="admin API address (default 127.0.0.1)")
    serve.add_argument("--admin-port", type=int, help="admin API port (default 7070)")
    serve.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="TLS certificate for the agent listener (default: none, plain TCP from loopback only)",
    )
    serve.add_argument("--tls-key", metavar="FILE", help="key of --tls-cert")
    serve.add_argument(
        "--public-tls-cert",
        metavar="FILE",
        help="serve preview URLs over HTTPS with this certificate (chain), normally a wildcard "
        "*.DOMAIN; more pairs chosen by SNI go in the config file ([[public_tls]]); re-read on "
        "SIGHUP. Preview URLs then default to https",
    )
    serve.add_argument("--public-tls-key", metavar="FILE", help="key of --public-tls-cert")
    serve.add_argument(
        "--public-redirect-port",
        type=int,
        metavar="PORT",
        help="also listen for plain HTTP on this port and redirect (308) to https (default 0: off)",
    )
    serve.add_argument(
        "--admin-tls-cert", metavar="FILE", help="serve the admin API over HTTPS (default: HTTP)"
    )
    serve.add_argument("--admin-tls-key", metavar="FILE", help="key of --admin-tls-cert")
    serve.add_argument(
        "--allow-plaintext-agents",
        action="store_const",
        const=True,
        help="accept plain TCP / ws:// agent links from non-loopback peers (trusted networks "
        "only: without TLS a corrupted byte on the link goes undetected)",
    )
    serve.add_argument(
        "--public-tcp-ports",
        metavar="FIRST-LAST",
        help="public TCP ports for protocol tcp exposures, one each (default: none, off)",
    )
    serve.add_argument(
        "--public-tls-passthrough",
        action="store_const",
        const=True,
        help="route TLS by server name on the public HTTPS port to protocol tls exposures, "
        "unterminated (needs --public-tls-cert for every other name)",
    )
    serve.add_argument(
        "--parser",
        choices=["auto", "httptools", "h11"],
        help="request-head parser (default auto: httptools when installed, else h11)",
    )
    serve.add_argument(
        "--no-tokens",
        action="store_const",
        const=False,
        dest="tokens",
        help="token-less URLs {port}-{sandbox}.{domain} (trusted networks only)",
    )
    serve.add_argument(
        "--grace-period", type=float, help="seconds to drain streams on SIGTERM (default 30)"
    )
    serve.add_argument(
        "--max-sandboxes",
        metavar="N",
        help="sandboxes that may hold exposures at once; an expose for one more is refused with "
        "409 TOO_MANY_SANDBOXES (default 100000)",
    )
    serve.add_argument(
        "--access-log",
        action="store_const",
        const=True,
        help="log every preview request (default off)",
    )
    serve.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="default info"
    )
    serve.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="text (default) or json: one JSON object per line, access log fields as keys",
    )
    serve.add_argument(
        "--ports-file",
        metavar="FILE",
        help="write the bound ports here as JSON, for port 0 (default: not written)",
    )
    serve.add_argument(
        "--workers",
        type=_workers_choice,
        metavar="N",
        help="processes: 1 (default) = this one; N > 1 or auto (one per core) = a supervisor and "
        "N worker processes listening on the same ports (SO_REUSEPORT: the kernel spreads "
        "connections over them). Workers share state through the store, so N > 1 needs "
        "--store redis://...; the supervisor restarts a worker that dies, passes SIGHUP on, "
        "drains them all on SIGTERM, and is what systemd sees (docs/operations.md, Workers)",
    )
    # Set by the supervisor on the workers it starts (tunneld/supervisor.py), never by hand.
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    _store_arguments(serve)

    token = sub.add_parser(
        "token",
        help="print the agent token for a sandbox id",
        description="Derive the agent token of SANDBOX_ID from the server secret (HMAC-SHA256). "
        "Hand it to the sandbox as TUNNEL_AGENT_TOKEN.",
    )
    token.add_argument("sandbox_id", metavar="SANDBOX_ID")
    token.add_argument(
        "--ttl",
        metavar="DURATION",
        help="mint a token that expires after DURATION (90s, 15m, 24h, 7d); the edge then "
        "closes the agent's session when it expires. Default: no expiry",
    )
    token.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        help="TOML config file holding secret_file (default $TUNNELD_CONFIG, else none)",
    )

    exposures = sub.add_parser(
        "exposures",
        help="export or import the stored exposures (JSON lines)",
        description="Back up, restore, inspect or migrate the exposures kept in a state directory "
        "(sqlite store). One JSON object per line: sandbox_id, port, token, name, created_at.",
    )
    exposures_sub = exposures.add_subparsers(dest="action", metavar="ACTION")
    exposures_sub.required = True
    export = exposures_sub.add_parser(
        "export",
        help="write every stored exposure to stdout",
        description="Write every stored exposure to stdout, one JSON object per line. Safe while "
        "tunneld runs (it reads a consistent snapshot).",
    )
    importer = exposures_sub.add_parser(
        "import",
        help="store exposures read from a file or stdin",
        description="Store the exposures of FILE (or stdin), in one transaction: every line is "
        "checked first (sandbox id, port, token, name, the per-sandbox cap, unique tokens) and "
        "nothing is written if one is wrong. Existing exposures are kept unless --replace. "
        "Refused while a tunneld uses the state directory: stop it first.",
    )
    importer.add_argument("file", nargs="?", metavar="FILE", help="JSON lines (default: stdin)")
    importer.add_argument(
        "--replace", action="store_true", help="drop every stored exposure first (a restore)"
    )
    for action in (export, importer):
        action.add_argument(
            "--config",
            "-c",
            metavar="FILE",
            help="TOML config file, for state_dir (default $TUNNELD_CONFIG, else none)",
        )
        action.add_argument(
            "--state-dir",
            metavar="DIR",
            help="state directory (default as serve: state_dir, $STATE_DIRECTORY under systemd, "
            "else ~/.local/state/tunneld)",
        )

    from .portforward import add_parser as add_port_forward

    add_port_forward(sub)

    from .inspect_cli import add_parsers as inspect_parsers

    inspect_parsers(sub)  # inspect, replay: request inspection over the admin API
    demo = sub.add_parser(
        "demo",
        help="run edge + agent + a sample service on loopback and print the preview URL",
        description="Everything on 127.0.0.1: tunneld, an agent for sandbox 'demo', a sample HTTP "
        "service on port 8000, exposed through the SDK. Ctrl-C stops it.",
    )
    demo.add_argument(
        "--public-port",
        type=_port_number,
        default=8080,
        help="public port (default 8080, another free one when taken; 0 = any)",
    )
    demo.add_argument(
        "--service-port",
        type=_demo_service_port,
        default=8000,
        help="sample service port, 1024-65535 but not 3000 (default 8000, another free one "
        "when taken; 0 = any)",
    )
    demo.add_argument(
        "--self-test", action="store_true", help="fetch the URL once, print it, exit 0/1"
    )
    demo.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="warning",
        help="default warning",
    )
    return parser


def _store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        type=_store_choice,
        metavar="STORE",
        help="where exposures are kept: sqlite (default: survive restarts, one edge), memory, "
        "or a Redis URL shared by several edges: redis://host:port/db, rediss://host:port/db "
        "(TLS), unix:///path/redis.sock?db=N; options ?prefix=NAME (keys, default tunneld) and "
        "?timeout=SECONDS (per command, default 2). A URL with a password belongs in "
        "TUNNELD_STORE or the config file, not here (it would show in ps)",
    )
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        help="directory of the sqlite store (default $STATE_DIRECTORY under systemd, else "
        "~/.local/state/tunneld)",
    )


def _port_number(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or int(value) > 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port 0-65535, not {value!r}")
    return int(value)


def _demo_service_port(value: str) -> int:
    from protocol.hostnames import CONTROL_PLANE_PORT, MIN_PORT

    port = _port_number(value)
    if port != 0 and (port < MIN_PORT or port == CONTROL_PLANE_PORT):  # the agent's own rule
        raise argparse.ArgumentTypeError(
            f"expected a port 1024-65535 other than 3000 (or 0: any free one), not {value!r}"
        )
    return port


def _workers_choice(value: str) -> int:
    try:
        workers = parse_workers(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("workers ")) from None
    if workers < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (or auto), not {value!r}")
    return workers


def _store_choice(value: str) -> str:
    try:
        return check_store(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("store: ")) from None


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = (
        "domain", "scheme", "url_port", "public_host", "public_port", "agent_host", "agent_port",
        "admin_host", "admin_port", "tls_cert", "tls_key", "allow_plaintext_agents", "parser",
        "tokens", "grace_period", "access_log", "log_level", "log_format", "store", "state_dir",
        "workers", "max_sandboxes",
        "public_tls_cert", "public_tls_key", "public_redirect_port", "admin_tls_cert",
        "admin_tls_key",
        "public_tcp_ports", "public_tls_passthrough",
    )  # fmt: skip
    return {k: getattr(args, k, None) for k in keys}


def main(argv: Sequence[str] | None = None) -> int:
    # The program itself (argv None): SIGTERM and SIGINT stop it cleanly and SIGHUP is deferred
    # from here on, if tunneld/entry.py or the import did not do it already; a caller
    # in-process keeps its own handling.
    program = argv is None and handle_start_signals()
    try:
        parser = build_parser()  # imports the subcommands' modules: Ctrl-C may land here
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    if program and args.command != "serve":
        restore_default_signals()  # what the other commands were written for
    try:
        if args.command == "serve":
            config_path = args.config or os.environ.get("TUNNELD_CONFIG")
            overrides = _overrides(args)
            ports_file = args.ports_file
            if args.worker_index is not None:
                from .supervisor import prepare_worker

                overrides, ports_file = prepare_worker(), None
            config = load_config(config_path, overrides)
            _setup_logging(config.log_level, args.worker_index, config.log_format)
            if args.worker_index is None:  # a worker has the supervisor's, raised already
                _raise_fd_limit(config)
            if args.worker_index is not None or config.workers <= 1:  # each serving process
                _fit_public_connections(config)
            if config.workers > 1:
                from .supervisor import supervise

                return supervise(config, config_path, ports_file, overrides)
            return serve(config, config_path, ports_file, overrides)
        if args.command == "token":
            return _token(args)
        if args.command == "exposures":
            from .exposures_cli import run_exposures

            return run_exposures(args)
        if args.command == "port-forward":
            from .portforward import run_port_forward

            return run_port_forward(args)
        if args.command in ("inspect", "replay"):
            from .inspect_cli import run_inspect, run_replay

            return run_inspect(args) if args.command == "inspect" else run_replay(args)
        if args.command == "demo":
            _setup_logging(args.log_level)
            from .demo import run_demo

            return run_demo(args)
    except ConfigError as exc:
        print(f"tunneld: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    parser.error(f"unknown command {args.command}")
    return 2  # pragma: no cover


# `tunneld serve` raises its soft RLIMIT_NOFILE to the hard limit, at most this: the LimitNOFILE of
# deploy/tunneld.service (and the kernel's default nr_open), so that started by hand or in a
# container it has the descriptors it would have under the unit (relay/fdlimit.py).
NOFILE_CEILING = 1 << 20
# Descriptors past max_connections for agents, the admin API, the store and the runtime.
NOFILE_RESERVE = 1024


def _raise_fd_limit(config: Config) -> None:
    """Raise the soft RLIMIT_NOFILE (one line; never fatal)."""
    from relay.fdlimit import raise_nofile

    before, after, error = raise_nofile(NOFILE_CEILING)
    if error is not None:
        log.info("file descriptor limit %d kept: cannot raise it (%s)", before, error)
    elif after != before:
        log.info("file descriptor limit raised from %d to %d", before, after)


def public_connections_cap(max_connections: int, nofile: int) -> int:
    """The public connections a process with the soft descriptor limit ``nofile`` admits:
    ``max_connections``, or fewer when the limit has no room for them besides
    ``NOFILE_RESERVE`` (agents, the admin API, the store): the limit minus the reserve, at least
    half of it."""
    if nofile == resource.RLIM_INFINITY or nofile >= max_connections + NOFILE_RESERVE:
        return max_connections
    return max(1, min(max_connections, max(nofile - NOFILE_RESERVE, nofile // 2)))


# Pending agent connections may take 1/PENDING_AGENTS_SHARE of the descriptors besides the
# public connections' (see pending_agents_cap).
PENDING_AGENTS_SHARE = 4


def pending_agents_cap(max_pending_agents: int, public_cap: int, nofile: int) -> int:
    """The agent connections not authenticated yet that a process with the soft descriptor
    limit ``nofile`` and ``public_cap`` public connections admits: ``max_pending_agents``, or a
    quarter of the descriptors left besides the public connections when that is fewer, so that
    connections anyone who reaches the agent port can open leave the rest of the reserve to
    agent sessions, the admin API, the store and the runtime."""
    if nofile == resource.RLIM_INFINITY:
        return max_pending_agents
    return max(1, min(max_pending_agents, (nofile - public_cap) // PENDING_AGENTS_SHARE))


def _fit_public_connections(config: Config) -> None:
    """In a process that serves: lower ``config.max_connections`` to what its descriptor limit
    has room for, with a warning. Past it a client gets 503 TOO_MANY_CONNECTIONS, as past
    ``max_connections``, instead of an accept that fails for want of a descriptor (uvloop closes
    such connections unanswered), and agents and the admin API keep descriptors of their own.
    Then ``config.max_pending_agents`` likewise, to a quarter of the rest (``pending_agents_cap``):
    agent connections that have not said hello cannot take every descriptor of the reserve."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    cap = public_connections_cap(config.max_connections, nofile)
    if cap < config.max_connections:
        log.warning(
            "file descriptor limit %d is below max_connections (%d) plus %d for agents and the "
            "admin API: public connections limited to %d (then 503 TOO_MANY_CONNECTIONS; raise "
            "LimitNOFILE or ulimit -n, or lower max_connections)",
            nofile,
            config.max_connections,
            NOFILE_RESERVE,
            cap,
        )
        config.max_connections = cap
    pending = pending_agents_cap(config.max_pending_agents, config.max_connections, nofile)
    if pending < config.max_pending_agents:
        log.warning(
            "file descriptor limit %d leaves %d besides %d public connections: agent connections "
            "waiting to authenticate limited to %d, a quarter of them (max_pending_agents %d; "
            "past it a new agent connection is closed at once)",
            nofile,
            nofile - config.max_connections,
            config.max_connections,
            pending,
            config.max_pending_agents,
        )
        config.max_pending_agents = pending


def _token(args: argparse.Namespace) -> int:
    from protocol.hostnames import ValidationError, validate_sandbox_id

    from .auth import agent_token, parse_ttl

    try:
        sandbox_id = validate_sandbox_id(args.sandbox_id)
    except ValidationError as exc:
        print(f"tunneld: {exc.message}", file=sys.stderr)
        return 2
    expires_at = None
    if args.ttl is not None:
        try:
            expires_at = int(time.time()) + parse_ttl(args.ttl)
        except ValueError as exc:
            print(f"tunneld: --ttl: {exc}", file=sys.stderr)
            return 2
    config_path = args.config or os.environ.get("TUNNELD_CONFIG")
    # Only the secret matters here; the admin token may be absent on the orchestrator's machine.
    env = dict(os.environ)
    env.setdefault("TUNNELD_ADMIN_TOKEN", "unused-for-token-minting")
    config = load_config(config_path, environ=env)
    print(agent_token(config.secret, sandbox_id, expires_at))
    return 0


def serve(
    config: Config,
    config_path: str | None = None,
    ports_file: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> int:
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(_serve(config, config_path, ports_file, overrides or {}))


async def _serve(
    config: Config, config_path: str | None, ports_file: str | None, overrides: dict[str, Any]
) -> int:
    from . import systemd
    from .edge import EdgeServer
    from .store import Store, StoreError, open_store

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals: list[str] = []
    starting: asyncio.Task[None] | None = None

    def on_stop(name: str) -> None:
        signals.append(name)
        stop.set()
        if starting is not None:
            starting.cancel()  # the start is abandoned: what it began is stopped below

    # SIGTERM and SIGINT are the loop's before the store is opened (until now _stop_starting's,
    # which ends the process: nothing was started): one during the start cancels it.
    loop.add_signal_handler(signal.SIGTERM, on_stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, on_stop, "SIGINT")
    store: Store | None = None
    server: EdgeServer | None = None

    async def start() -> None:
        nonlocal store, server
        store = open_store(config.store, config.state_dir, config.node_id)
        server = EdgeServer(config, loop, store)
        await server.start()
        if ports_file:
            _write_ports(ports_file, server)

    starting = loop.create_task(start())
    try:
        await asyncio.wait([starting])
    finally:
        started, starting = starting, None
    error = None if started.cancelled() else started.exception()
    if started.cancelled() or error is not None:
        if store is not None:
            await _abandon_start(server, store, cancelled=error is None)
        if error is None:
            log.info("%s during start-up: stopped before serving", signals[0])
            systemd.notify("STOPPING=1")
            return 0 if signals[0] == "SIGTERM" else EXIT_INTERRUPTED
        if not isinstance(error, (StoreError, OSError)):
            raise error
        log.error("cannot start: %s", error)
        return 2 if isinstance(error, StoreError) else 1
    assert server is not None
    if config.access_log:
        from . import speedups

        log.info("access log on, its per-request work in %s", speedups.describe())
    if not config.tls_cert and not config.allow_plaintext_agents:
        log.info(
            "agent listener without TLS: only agents on loopback are accepted (use tls_cert/"
            "tls_key, or allow_plaintext_agents = true on a trusted network)"
        )

    def on_reload() -> None:
        try:
            # Same sources as at start: file and environment re-read, command-line flags kept.
            new = load_config(config_path, overrides)
        except ConfigError as exc:
            log.error("SIGHUP: configuration not reloaded: %s", exc)
            return
        apply_reload(server, new)
        log.info("SIGHUP: configuration reloaded")

    if stop.is_set():  # the signal came as the start ended (nothing left to cancel)
        log.info("%s during start-up: stopped before serving", signals[0])
        systemd.notify("STOPPING=1")
        await server.stop(0)
        return 0 if signals[0] == "SIGTERM" else EXIT_INTERRUPTED
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    if take_deferred_reload():  # a SIGHUP while it started (tunneld/entry.py): a reload now
        log.info("SIGHUP during start-up: reloading now that the start is done")
        on_reload()
    systemd.notify("READY=1\nSTATUS=serving")
    interval = systemd.watchdog_interval()
    watchdog = loop.create_task(_watchdog(interval)) if interval else None
    await stop.wait()
    log.info("%s: draining (grace period %.0fs)", signals[0], config.grace_period)
    systemd.notify("STOPPING=1")
    await server.stop()
    if watchdog is not None:
        watchdog.cancel()
    log.info("stopped")
    return 0


async def _abandon_start(server: Any, store: Any, *, cancelled: bool) -> None:
    """Stop what a start cut short by a signal (``cancelled``) or failed had begun: the cluster
    node (its record and leases in Redis), the handover server, the store (its lock). The
    listeners it bound close with the process, which ends next."""
    try:
        if server is not None:
            if server.cluster is not None:
                await server.cluster.stop()
            if server.handover is not None:
                server.handover.close()
    finally:
        if cancelled:
            # A read cancelled on the loop goes on in its thread (SqliteStore.load_all): closing
            # the database under it crashed the process (SIGSEGV). Let it end first; the store
            # has no writer thread yet, so its close needs no executor.
            await asyncio.get_running_loop().shutdown_default_executor()
        await store.close()


def apply_reload(server: Any, new: Config) -> None:
    """Install the live-changeable settings of ``new`` (SIGHUP) and act on them.

    Safe to change live: secrets, timeouts, logging, the plaintext rule, the public and admin
    certificates (files re-read for new handshakes; open connections keep theirs). Listener
    addresses, and turning TLS on or off, need a restart. Agent sessions whose token no longer
    verifies under the new secret are closed.
    """
    config = server.config
    for name in ("admin_token", "secret", "head_timeout", "control_timeout", "grace_period",
                 "access_log", "log_level", "allow_plaintext_agents"):  # fmt: skip
        setattr(config, name, getattr(new, name))
    server.reload_tls(new)
    if server.public_tls is not None:
        for name in ("public_tls_cert", "public_tls_key", "public_tls_extra"):
            setattr(config, name, getattr(new, name))
    if server.admin_tls is not None:
        config.admin_tls_cert, config.admin_tls_key = new.admin_tls_cert, new.admin_tls_key
    logging.getLogger().setLevel(getattr(logging, config.log_level.upper(), logging.INFO))
    closed = server.auth.revalidate()
    if closed:
        log.warning("reload: closed %d agent session%s", closed, "" if closed == 1 else "s")


def _write_ports(path: str, server: Any) -> None:
    import json

    ports = {"public": server.public_port, "agent": server.agent_port, "admin": server.admin_port}
    if server.redirect_port:
        ports["redirect"] = server.redirect_port
    with open(path + ".tmp", "w") as f:
        json.dump(ports, f)
    os.replace(path + ".tmp", path)


async def _watchdog(interval: float) -> None:
    from . import systemd

    while True:
        systemd.notify("WATCHDOG=1")
        await asyncio.sleep(interval)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
