"""``tunneld serve --workers N``: a supervisor and N worker processes on one host.

Theory of operation
-------------------
One tunneld event loop uses one core. With ``workers`` > 1, ``tunneld serve`` becomes a
supervisor that serves no traffic itself: it starts N workers, each a complete single-process
tunneld (``python -m tunneld.cli serve --worker-index I``: a fresh interpreter, not a fork, since
asyncio and fork do not mix), watches them, and is the one process systemd sees.

**Listeners: SO_REUSEPORT.** Every worker binds and listens on the same public, agent and admin
ports with ``SO_REUSEPORT`` (``Config.reuse_port``). The kernel then keeps one accept queue per
worker and spreads new connections over them by a hash of the connection's addresses, so the workers
never contend for one queue or wake each other up for one connection. The known cost: the spread is
blind to load (a busy worker gets its share anyway), and when a worker dies the connections waiting
in its accept queue, not yet accepted, are reset (Linux >= 5.14 migrates them to another worker
instead when ``net.ipv4.tcp_migrate_req = 1``). Before starting any worker the supervisor binds each
listener once itself, with ``SO_REUSEADDR`` alone, and never listens on it: a socket that does not
listen receives no connections, but it holds the port (the workers' listeners, with ``SO_REUSEADDR``
too, may bind beside a socket that does not listen, socket(7)). That reservation is what makes
``--public-port 0`` work (the supervisor learns the port and gives every worker the same explicit
one) and keeps the ports ours while a worker restarts; while every worker is down at once, another
socket with ``SO_REUSEADDR`` may bind and listen beside it (the same rule). The HTTP-to-HTTPS
redirect listener, when on, is held the same way. A listener that cannot be held (its port in use,
also by another process's ``SO_REUSEPORT`` socket; a host that does not resolve) ends the start
before any worker, with the single process's line and status: ``cannot start: cannot open the public
listener on 127.0.0.1:8080 (public_host, public_port): [Errno 98] ...``, exit 1 (``reserve_port``,
``listener_error``).

**State.** Workers share nothing in memory. Exposures and agent ownership live in a shared
Redis store, as between hosts. With the operator's Redis (``store = redis://...``) the workers
use it; with ``sqlite`` or ``memory`` the supervisor runs a private ``redis-server`` on a Unix
socket for them and keeps ``exposures.db`` the copy at rest (:mod:`tunneld.private_redis`: why,
and how the two copies never diverge). Should it die, it is restarted by a task on the loop
(``_check_private_store``), never by a wait that blocks the loop; a stop meanwhile waits for that
restart before writing the exposures back. A worker is a cluster node like any other: its node id is
``{node_id or hostname}-w{index}``, and its node-link port is ``node_port + index``. An agent
holds its session with whichever worker the kernel gave its connection to; when that worker
dies, the agent reconnects and lands on any worker.

**Each worker gets** the supervisor's configuration: the same config file (``--config``) and
command-line values, in ``$TUNNELD_WORKER_OVERRIDES`` (JSON: command-line values beat the file and
the environment, as they do for a single process) with the ports made explicit, plus
``reuse_port``, ``workers = 1``, its node id and node port.

**systemd.** The supervisor opens its own notification socket (:mod:`tunneld.systemd`, with
``SO_PASSCRED`` so the kernel names each message's sender) and gives it to the workers as
``NOTIFY_SOCKET``. It tells the real ``$NOTIFY_SOCKET`` ``READY=1`` once every worker has said
``READY=1`` (after writing ``--ports-file``), and never again; ``WATCHDOG=1`` only while every
running worker has pinged within its own interval (half of the supervisor's, given to the workers
as ``WATCHDOG_USEC``; without ``WATCHDOG_PID``, which cannot be known before the worker starts);
``STOPPING=1`` when it is told to stop. Its socket is abstract, so anyone on the host may send to
it: a message whose kernel-stamped pid is not a worker's is ignored, and at most
``MAX_NOTIFICATIONS_PER_WAKEUP`` are read per turn of the loop, so a flood cannot hold it.

**Signals.** A worker's Python start, up to tunneld/cli.py's first lines (which install
tunneld/entry.py's handlers and then unblock them), runs with SIGHUP, SIGTERM and SIGINT blocked
(``_start``: the mask is inherited through exec), so that one sent to it then (passed on by the
supervisor, systemd's stop, a terminal's Ctrl-C) waits for those handlers rather than kill it by
its default action: a SIGHUP is deferred to the end of its start, a SIGTERM or SIGINT ends it at
once with one line, exit 0 or 130. SIGHUP is passed to every worker (each reloads, one still
starting once it serves), and one that came before ``run`` took it over is applied then. SIGTERM
or SIGINT: ``STOPPING=1``, SIGTERM to every worker, starting or not (``SIGTERM: stopping 2
workers, 1 of them still starting``), each drains for its grace period (one still starting stops
what it began); a worker still running ``grace_period + STOP_MARGIN`` later is killed (also one
whose start hangs with its signals still blocked); the supervisor exits 0. A worker that exits
once the supervisor is stopping is logged (``worker 1 (pid N) exited with status 0, before it was
ready``), neither restarted nor a failed start, also when the supervisor sees that exit before
its own signal: systemd's stop or a Ctrl-C reaches a worker and the supervisor together, and a
SIGCHLD pending with them is handled first (``_reap_soon``: reaped one turn of the loop later).
Each worker also asks the kernel for SIGTERM should the supervisor die
(``PR_SET_PDEATHSIG``), so a killed supervisor leaves no worker holding the ports. The handlers are
installed first thing in ``run`` (before, tunneld/entry.py's, which end the process at once:
nothing is started yet) and removed last: the start (ports, the private redis-server, the copy into
it) is a task that a SIGTERM or SIGINT cancels, which stops the redis-server it started
(``PrivateRedis.start_async``), starts no worker, and writes back only a copy that was complete
(exit 0; exit 1 when a recovering start is cut short: its exposures stay unsaved). At the end the
write-back and the redis-server's stop are on the loop, each wait bounded
(``PrivateRedis.stop_async``: SIGKILL after ``STOP_TIMEOUT``, logged); a second signal then is
logged, not the default action that would kill the supervisor mid-stop. systemd's stop sends
SIGTERM to the redis-server too (to every process of the unit): one that shut down cleanly before
the write-back is started again on its append-only file for it (``_revive_private_store``, before
every check, up to three rounds: redis-server goes on answering for up to 0.1 s after its SIGTERM,
then exits).

**Restarts.** A worker that exits on its own (the supervisor not stopping; also one stopped alone
by someone else's SIGTERM, exit 0) is logged (exit code or signal) and started again after a
backoff: 1 s, doubling to 30 s, back to 1 s for a worker that ran 60 s. A worker that exits
before every worker was ready the first time is a failed start (a bad store URL, a port in use; a
worker stopped alone then too): the supervisor stops the others and exits with that worker's
status (2 stays 2; 0 becomes 1).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

from relay.budget import RateLimitedLog

from . import systemd
from .config import Config, ConfigError, load_config
from .entry import START_SIGNALS, take_deferred_reload
from .listen import bind_error
from .private_redis import REDIS_DIR, UNSAVED, PrivateRedis
from .redis_store import is_redis_url
from .store import SqliteStore, StoredExposure, StoreError

log = logging.getLogger("tunneld.supervisor")

RESTART_DELAY_MIN: Final = 1.0  # a crash loop costs one start a second at worst...
RESTART_DELAY_MAX: Final = 30.0  # ...and a worker that cannot start is retried twice a minute
STABLE_AFTER: Final = 60.0  # a worker that ran this long restarts after RESTART_DELAY_MIN again
# SIGTERM -> SIGKILL: a worker's own drain is bounded by its grace period; this is for one hung
# beyond it (a stuck store call, a blocked loop).
STOP_MARGIN: Final = 10.0
KILL_WAIT: Final = 5.0  # after SIGKILL, the kernel's part
WORKER_ENV: Final = "TUNNELD_WORKER_OVERRIDES"
SUPERVISOR_PID_ENV: Final = "TUNNELD_SUPERVISOR_PID"
# Inherited from systemd for the supervisor alone: the workers get their own (or none).
_NOT_FOR_WORKERS: Final = (
    "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
)  # fmt: skip
# Notifications read per wake-up of the loop (a worker sends one every few seconds; the socket
# can be flooded by anyone on the host: _on_notify).
MAX_NOTIFICATIONS_PER_WAKEUP: Final = 8
# The listeners the supervisor holds, in the order a single process binds them (tunneld/edge.py's
# EdgeServer.start: the first one that fails is the one named), with the settings that place each
# (tunneld/edge.py's _LISTENER_SETTINGS: one wording for both, tests/cluster/
# test_workers_listener_errors.py). The HTTP-to-HTTPS redirect listener only when it is on.
_LISTENERS: Final = {
    "agent": ("agent_host", "agent_port"),
    "public": ("public_host", "public_port"),
    "admin": ("admin_host", "admin_port"),
    "HTTP-to-HTTPS redirect": ("public_host", "public_redirect_port"),
}
_PR_SET_PDEATHSIG: Final = 1


def supervise(
    config: Config, config_path: str | None, ports_file: str | None, overrides: dict[str, Any]
) -> int:
    """Run the supervisor until it is stopped; the exit status for ``tunneld serve``."""
    return asyncio.run(Supervisor(config, config_path, ports_file, overrides).run())


def worker_node_id(base: str, index: int) -> str:
    return f"{base or socket.gethostname().split('.')[0] or 'host'}-w{index}"


def prepare_worker() -> dict[str, Any]:
    """In a worker (``--worker-index``): the configuration overrides its supervisor chose, and
    SIGTERM from the kernel if the supervisor dies. ConfigError when not started by one."""
    raw = os.environ.get(WORKER_ENV)
    if raw is None:
        raise ConfigError(
            "--worker-index is for the workers `tunneld serve --workers N` starts "
            f"(no ${WORKER_ENV})"
        )
    try:
        overrides = json.loads(raw)
    except ValueError:
        raise ConfigError(f"${WORKER_ENV} is not JSON") from None
    if not isinstance(overrides, dict):
        raise ConfigError(f"${WORKER_ENV} is not a JSON object")
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: an orphaned worker is stopped by hand
        pass
    supervisor = os.environ.get(SUPERVISOR_PID_ENV, "")
    if supervisor.isdigit() and os.getppid() != int(supervisor):
        # It died before prctl took effect: nobody would ever stop this worker.
        raise ConfigError("the supervisor that started this worker is gone")
    return overrides


def reserve_port(host: str, port: int) -> list[socket.socket]:
    """Bind (never listen) sockets on every address of ``host``, all on one port (the first
    address's, when ``port`` is 0). They hold the port; they receive nothing.

    ``SO_REUSEADDR``, not ``SO_REUSEPORT``: the workers' listeners (``SO_REUSEADDR`` and
    ``SO_REUSEPORT``) may bind beside a socket that does not listen, and a port that another
    socket holds is refused (EADDRINUSE), as a single process's listener is, also when that
    socket has ``SO_REUSEPORT`` itself (the kernel lets two such sockets of one user share a port:
    another ``tunneld serve --workers`` on the same ports would start and take half of their
    connections). A bind error is worded by tunneld/listen.py's ``bind_error``, as its ``bind``
    words it."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio does
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            try:
                sock.bind(address)
            except OSError as exc:
                raise bind_error(address, exc) from None
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        raise OSError(f"no address to listen on for host {host!r}")
    return sockets


def listener_error(name: str, host: str, port: int, exc: OSError) -> OSError:
    """``exc``, met reserving the ``name`` listener, said as a single process says it
    (tunneld/edge.py's ``_listening``): which listener, where, and which settings place it."""
    host_setting, port_setting = _LISTENERS[name]
    where = f"{host or '*'}:{port} ({host_setting}, {port_setting})"
    error = OSError(f"cannot open the {name} listener on {where}: {exc}")
    error.errno = exc.errno  # str() without a second "[Errno N]"
    return error


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


class Worker:
    """One worker slot: the process in it now, and its restart backoff."""

    __slots__ = ("delay", "index", "last_seen", "proc", "ready", "restart", "started")

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.last_seen = 0.0  # last READY=1 or WATCHDOG=1 (monotonic)
        self.ready = False
        self.delay = RESTART_DELAY_MIN
        self.restart: asyncio.TimerHandle | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0


class Supervisor:
    def __init__(
        self,
        config: Config,
        config_path: str | None,
        ports_file: str | None,
        overrides: dict[str, Any],
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.ports_file = ports_file
        self.overrides = {k: v for k, v in overrides.items() if v is not None}
        self.workers = [Worker(i) for i in range(config.workers)]
        self.ports: dict[str, int] = {}
        self._reserved: list[socket.socket] = []
        self._notify: socket.socket | None = None
        self._notify_name = ""
        self._usec = systemd.watchdog_usec()  # ours, from systemd; the workers get half
        self._ready_sent = False
        self._stopping = False
        self._status = 0
        self._done = asyncio.Event()
        self._silent: set[int] = set()  # worker indexes whose missed watchdog was logged
        self._strangers = RateLimitedLog(
            log, "notifications from processes that are not workers", level=logging.DEBUG
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._private: PrivateRedis | None = None  # the workers' store without one of ours
        self._restarting: asyncio.Task[None] | None = None  # the private store coming back
        self._sqlite: SqliteStore | None = None  # held (locked) while the private one runs
        # The private one holds the newest exposures (UNSAVED exists): write them back at the stop.
        self._write_back = False
        self._starting: asyncio.Task[None] | None = None  # everything before the first worker

    # -- lifecycle -------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = self._loop = asyncio.get_running_loop()
        # The signals are ours before anything is started, and until the end. A SIGTERM while
        # the private redis-server starts (up to START_TIMEOUT) abandons the start and stops what
        # it began, rather than kill this process and leave it behind; one during the final
        # write-back and stop of that redis-server is logged, not the end of either.
        loop.add_signal_handler(signal.SIGTERM, self._stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self._stop, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        if take_deferred_reload():  # a SIGHUP before this handler (tunneld/entry.py): now
            log.info("SIGHUP during start-up: reloading now")
            self._reload()
        try:
            return await self._run(loop)
        finally:
            for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    async def _start_up(self) -> None:
        """Hold the ports, open the notification socket, start the private store: everything
        before the first worker. A task: a stop signal meanwhile cancels it (``_stop``)."""
        config = self.config
        for name, (host_setting, port_setting) in _LISTENERS.items():
            host, port = getattr(config, host_setting), getattr(config, port_setting)
            if name == "HTTP-to-HTTPS redirect" and not port:
                continue  # off (0 is no port to pick: it means no redirect listener)
            try:
                sockets = reserve_port(host, port)
            except OSError as exc:
                raise listener_error(name, host, port, exc) from None
            self._reserved += sockets
            if name in ("agent", "public", "admin"):  # the redirect port is explicit already
                self.ports[name] = sockets[0].getsockname()[1]
        self._check_node_ports()
        self._notify, self._notify_name = systemd.open_notify_socket()
        if not is_redis_url(config.store):
            await self._start_private_store()

    async def _run(self, loop: asyncio.AbstractEventLoop) -> int:
        config = self.config
        start = self._starting = loop.create_task(self._start_up())
        try:
            await asyncio.wait([start])  # bounded: START_TIMEOUT for redis-server, then the copy
        finally:
            self._starting = None
        error = None if start.cancelled() else start.exception()
        if error is not None:
            expected = isinstance(error, (OSError, ConfigError, StoreError))
            if expected:
                log.error("cannot start: %s", error)
            self._close()
            await self._stop_private_store(save=False)  # nothing left running, either way
            if not expected:
                raise error
            return 1 if isinstance(error, OSError) else 2
        if self._stopping:  # SIGTERM or SIGINT during the start: no worker was started
            self._close()
            await self._stop_private_store(save=True)  # only if the copy was complete
            log.info("supervisor stopped")
            return self._status
        assert self._notify is not None
        loop.add_reader(self._notify, self._on_notify)
        loop.add_signal_handler(signal.SIGCHLD, self._reap_soon)
        self._check_private_store()  # a death before that handler was there
        log.info(
            "supervisor (pid %d): %d workers on public %s:%d, agents %s:%d, admin %s:%d",
            os.getpid(),
            len(self.workers),
            config.public_host,
            self.ports["public"],
            config.agent_host,
            self.ports["agent"],
            config.admin_host,
            self.ports["admin"],
        )
        watchdog = loop.create_task(self._watchdog(self._usec / 1e6)) if self._usec else None
        try:
            for worker in self.workers:
                if not self._stopping:
                    self._start(worker)
            await self._done.wait()
        finally:
            if watchdog is not None:
                watchdog.cancel()
            self._close()
            if self._restarting is not None:  # a stop during a restart: let it end (bounded),
                log.info(  # so that the exposures can be written back
                    "waiting for the private redis-server's restart to write the exposures back"
                )
                await asyncio.wait([self._restarting])
            await self._stop_private_store(save=True)
        log.info("supervisor stopped")
        return self._status

    # -- the workers' private store (tunneld/private_redis.py) -----------------------------------
    async def _start_private_store(self) -> None:
        from .store import default_state_dir

        config = self.config
        if config.store == "memory":
            self._private = PrivateRedis(None)
            await self._private.start_async(fresh=True)
        else:
            state_dir = config.state_dir or str(default_state_dir())
            self._sqlite = SqliteStore.open(state_dir, unsaved_ok=True)  # holds the lock
            data_dir = self._sqlite.state_dir / REDIS_DIR
            recover = (data_dir / UNSAVED).exists()
            self._write_back = recover  # a stop before it answers cannot: the marker stays
            self._private = PrivateRedis(data_dir)
            await self._private.start_async(fresh=not recover)
            if recover:
                log.warning(
                    "recovering the exposures of a --workers run that did not stop cleanly from "
                    "%s (newer than %s)",
                    data_dir,
                    self._sqlite.path,
                )
            else:
                records = self._sqlite.read_all_now()
                await _copy(records, self._private.url)
                _write_marker(data_dir / UNSAVED)
                self._write_back = True  # before: exposures.db was the newest copy, untouched
                log.info(
                    "workers share state through a private redis-server: %d exposures copied "
                    "from %s, written back at a clean stop",
                    len(records),
                    self._sqlite.path,
                )
        self.overrides["store"] = self._private.url

    async def _stop_private_store(self, *, save: bool) -> None:
        """Write the exposures back into exposures.db (``save``, when the private redis-server
        holds the newest copy), then stop it. On the loop, every wait bounded: its answer (1 s),
        each command (RedisStore's timeout), its exit (STOP_TIMEOUT, then SIGKILL, logged);
        SQLite's one transaction is the only step that blocks."""
        private, sqlite = self._private, self._sqlite
        self._private = self._sqlite = None
        save = save and self._write_back
        try:
            answers = False
            if private is not None and sqlite is not None and save:
                # A redis-server that got the stop's SIGTERM too goes on answering until its next
                # cron tick (up to 0.1 s), then exits: each check is made after a revival (which
                # leaves one that answers as it is), never on its own, so an exit between two
                # checks is revived, not taken for a dead store. Bounded: three rounds.
                for _ in range(3):
                    await self._revive_private_store(private)
                    if await private.ping_async():
                        answers = True
                        break
            if private is not None and sqlite is not None and save and not answers:
                log.error(
                    "exposures NOT written back: the private redis-server does not answer; the "
                    "next --workers start recovers them"
                )
                self._status = self._status or 1
            elif private is not None and sqlite is not None and save:
                from .redis_store import RedisStore

                for attempt in (1, 2):
                    store = RedisStore(private.url, node_id="supervisor")
                    try:
                        records = await store.load_all()
                        break
                    except StoreError:
                        if attempt == 2:
                            raise
                    finally:
                        await store.close()
                    # It answered the ping, then exited under the read (the same signal, seen
                    # by it a moment later): once more on its append-only file.
                    await self._revive_private_store(private)
                count = sqlite.import_now(records, replace=True)
                await private.stop_async()  # its append-only file is now a stale copy: drop the
                # marker (after SIGKILL too, logged: the copy that counts is written back)
                marker = sqlite.state_dir / REDIS_DIR / UNSAVED
                marker.unlink(missing_ok=True)
                log.info("%d exposures written back to %s", count, sqlite.path)
        except StoreError as exc:
            log.error(
                "exposures NOT written back (%s): the next --workers start recovers them", exc
            )
            self._status = self._status or 1  # not a clean stop: say so
        finally:
            if private is not None:
                await private.stop_async()
                private.cleanup()
            if sqlite is not None:
                sqlite.close_now()

    async def _revive_private_store(self, private: PrivateRedis) -> None:
        """Before the write-back: a redis-server that shut down cleanly on someone else's signal
        is started again on its append-only file (``appendfsync always``: it holds every
        exposure). systemd's stop sends SIGTERM to every process of the unit at once
        (``KillMode=control-group``), so the redis-server gets it with the supervisor and exits
        (within about 0.1 s, status 0) while the workers drain. One that answers, never
        answered (``proc`` None: ``start_async`` stopped it), or died otherwise (killed,
        crashed: an unclean stop, said by the caller) is left as it is."""
        proc = private.proc
        if proc is None or (private.exited() is None and await private.ping_async()):
            return
        await private.stop_async()  # one still shutting down: let it end (bounded, as at a stop)
        if proc.returncode != 0:
            return
        log.warning(
            "the private redis-server was stopped before the exposures were written back; "
            "starting it again on its append-only file to write them back"
        )
        await private.start_async(fresh=False)  # StoreError: not written back (logged, exit 1)

    def _check_private_store(self) -> None:
        """SIGCHLD: the private redis-server died: start it again on its own data at once. The
        restart runs as a task (up to START_TIMEOUT): the loop goes on taking signals, workers'
        exits and notifications meanwhile. A stop that arrives during it proceeds; ``run`` waits
        for the restart to end before it writes the exposures back."""
        private = self._private
        if (
            private is None
            or self._restarting is not None
            or private.exited() is None
            or self._stopping
        ):
            return
        log.error("the workers' private redis-server exited (%s); restarting it", private.exited())
        assert self._loop is not None
        self._restarting = self._loop.create_task(self._restart_private_store(private))

    async def _restart_private_store(self, private: PrivateRedis) -> None:
        try:
            await private.start_async(fresh=False)
        except StoreError as exc:
            log.error("cannot restart the private redis-server: %s; stopping", exc)
            self._status = 1
            self._stop("the private store failed")
        else:
            log.info("the workers' private redis-server restarted")
        finally:
            self._restarting = None
        # It may have died again while coming up (a SIGCHLD seen during the restart).
        self._check_private_store()

    def _close(self) -> None:
        if self._notify is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._notify)
            self._notify.close()
            self._notify = None
        for sock in self._reserved:
            sock.close()
        self._reserved = []

    def _check_node_ports(self) -> None:
        last = self.config.node_port + len(self.workers) - 1
        if self.config.node_port and last > 65535:
            raise ConfigError(
                f"node_port {self.config.node_port} + {len(self.workers)} workers passes 65535"
            )

    # -- workers ---------------------------------------------------------------------------------
    def worker_overrides(self, index: int) -> dict[str, Any]:
        config = self.config
        overrides = dict(self.overrides)
        overrides.update(
            public_port=self.ports["public"],
            agent_port=self.ports["agent"],
            admin_port=self.ports["admin"],
            reuse_port=True,
            workers=1,
            node_id=worker_node_id(config.node_id, index),
        )
        if config.node_port:  # 0 stays 0: each worker takes a port of its own
            overrides["node_port"] = config.node_port + index
        if config.node_advertise:
            host, _, port = config.node_advertise.rpartition(":")
            overrides["node_advertise"] = f"{host}:{int(port) + index}"
        return overrides

    def _worker_env(self, index: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _NOT_FOR_WORKERS}
        env["NOTIFY_SOCKET"] = self._notify_name
        if self._usec:
            env["WATCHDOG_USEC"] = str(max(self._usec // 2, 1000))
        env[WORKER_ENV] = json.dumps(self.worker_overrides(index))
        env[SUPERVISOR_PID_ENV] = str(os.getpid())
        return env

    def _start(self, worker: Worker) -> None:
        worker.restart = None
        argv = [sys.executable, "-m", "tunneld.cli", "serve", "--worker-index", str(worker.index)]
        if self.config_path:
            argv += ["--config", self.config_path]
        # SIGHUP, SIGTERM and SIGINT held blocked across the worker's Python start (the mask is
        # inherited through exec): one passed on (or sent by systemd's stop, a terminal's Ctrl-C)
        # then waits for tunneld/cli.py's first lines, which let it in to tunneld/entry.py's
        # handlers (a reload deferred; a stop: exit 0 or 130), instead of killing the worker by
        # its default action. Ours meanwhile wait the few milliseconds of the spawn.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, START_SIGNALS)
        try:
            worker.proc = subprocess.Popen(
                argv, env=self._worker_env(worker.index), stdin=subprocess.DEVNULL
            )
        except OSError as exc:
            log.error("worker %d: cannot start: %s", worker.index, exc)
            if not self._ready_sent:
                self._status = 1
                self._stop("a failed start")
            else:
                self._schedule_restart(worker)
            return
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        worker.started = worker.last_seen = time.monotonic()
        worker.ready = False
        log.info("worker %d started (pid %d)", worker.index, worker.pid)

    def _reap_soon(self) -> None:
        """SIGCHLD: :meth:`_reap` at the next turn of the loop, after a stop signal that came with
        it. systemd's stop (SIGTERM to every process of the unit) or a Ctrl-C (SIGINT to the
        whole group) reach a worker and this process together; when the worker exits before
        this process runs again (a busy host), both signals are pending here at once, and Linux
        runs the higher-numbered one's handler first (each pending signal gets its frame, the
        last on top): SIGCHLD's before SIGTERM's or SIGINT's. Reaped at once, the worker would
        be a failed start or a crash to restart; one turn later, ``_stop`` has run first."""
        assert self._loop is not None
        self._loop.call_soon(self._reap)

    def _reap(self) -> None:
        """Collect every worker that exited (signals coalesce: check them all)."""
        self._check_private_store()
        for worker in self.workers:
            proc = worker.proc
            if proc is None or proc.poll() is None:
                continue
            worker.proc = None
            ready, worker.ready = worker.ready, False
            self._on_exit(worker, proc.pid, proc.returncode, ready)
        if self._stopping and all(w.proc is None for w in self.workers):
            self._done.set()

    def _on_exit(self, worker: Worker, pid: int, returncode: int, ready: bool = True) -> None:
        how = describe_exit(returncode)
        ran = time.monotonic() - worker.started
        if self._stopping:  # stopped by us (or with us: systemd's stop, a Ctrl-C): no restart
            log.info(
                "worker %d (pid %d) %s%s",
                worker.index,
                pid,
                how,
                "" if ready else ", before it was ready",
            )
            return
        if not self._ready_sent:
            log.error("worker %d (pid %d) %s during start-up; stopping", worker.index, pid, how)
            self._status = returncode if returncode > 0 else 1
            self._stop("a failed start")
            return
        if ran >= STABLE_AFTER:
            worker.delay = RESTART_DELAY_MIN
        log.warning(
            "worker %d (pid %d) %s after %.1fs; restarting it in %.0fs",
            worker.index,
            pid,
            how,
            ran,
            worker.delay,
        )
        self._schedule_restart(worker)
        systemd.notify(f"STATUS={self._describe_status()}")

    def _schedule_restart(self, worker: Worker) -> None:
        assert self._loop is not None
        worker.restart = self._loop.call_later(worker.delay, self._start, worker)
        worker.delay = min(worker.delay * 2, RESTART_DELAY_MAX)

    def _describe_status(self) -> str:
        ready = sum(1 for w in self.workers if w.ready)
        return f"{ready} of {len(self.workers)} workers serving"

    # -- notifications from the workers ----------------------------------------------------------
    def _on_notify(self) -> None:
        """Read the pending notifications, at most ``MAX_NOTIFICATIONS_PER_WAKEUP`` of them: the
        socket is abstract (no permissions), so anyone on the host can send to it, and a flood
        must not keep the loop here (signals, restarts and the watchdog wait meanwhile). The
        reader is level-triggered: what is left is read at the loop's next turn."""
        assert self._notify is not None
        for _ in range(MAX_NOTIFICATIONS_PER_WAKEUP):
            message = systemd.receive_notification(self._notify)
            if message is None:
                return
            pid, fields = message
            worker = next((w for w in self.workers if pid and w.pid == pid), None)
            if worker is None:
                assert self._loop is not None
                self._strangers.log(
                    self._loop.time(), "notification from pid %d, not a worker: ignored", pid
                )
                continue
            if fields.get("READY") == "1" or fields.get("WATCHDOG") == "1":
                worker.last_seen = time.monotonic()
                self._silent.discard(worker.index)
            if fields.get("READY") == "1" and not worker.ready:
                worker.ready = True
                log.info("worker %d (pid %d) ready", worker.index, pid)
                self._on_worker_ready()

    def _on_worker_ready(self) -> None:
        if self._stopping or not all(w.ready for w in self.workers):
            return
        pids = [w.pid for w in self.workers]
        if self.ports_file:
            self._write_ports(self.ports_file, pids)  # before READY=1: whoever waits reads it
        status = f"serving with {len(pids)} workers"
        if not self._ready_sent:
            self._ready_sent = True
            log.info("all %d workers ready (pids %s)", len(pids), " ".join(map(str, pids)))
            systemd.notify(f"READY=1\nSTATUS={status}")
        else:
            log.info("all %d workers serving again (pids %s)", len(pids), " ".join(map(str, pids)))
            systemd.notify(f"STATUS={status}")

    def _write_ports(self, path: str, pids: list[int]) -> None:
        with open(path + ".tmp", "w") as f:
            json.dump({**self.ports, "workers": pids}, f)
        os.replace(path + ".tmp", path)

    async def _watchdog(self, period: float) -> None:
        """Ping systemd twice per period while every running worker pinged within half of it."""
        while True:
            await asyncio.sleep(period / 2)
            if self._ready_sent and not self._stopping and self._healthy(period / 2):
                systemd.notify("WATCHDOG=1")

    def _healthy(self, limit: float) -> bool:
        now = time.monotonic()
        healthy = True
        for worker in self.workers:
            if worker.proc is None:
                continue  # being restarted: that is this process doing its job
            silent = now - worker.last_seen
            if silent > limit:
                healthy = False
                if worker.index not in self._silent:
                    self._silent.add(worker.index)
                    log.warning(
                        "worker %d (pid %d) silent for %.1fs: withholding the systemd watchdog",
                        worker.index,
                        worker.pid,
                        silent,
                    )
        return healthy

    # -- signals ---------------------------------------------------------------------------------
    def _reload(self) -> None:
        if self._stopping:
            return
        try:
            # Only the grace period matters here; the workers re-read everything themselves.
            self.config.grace_period = load_config(self.config_path, self.overrides).grace_period
        except ConfigError as exc:
            log.error("SIGHUP: configuration not reloaded: %s", exc)
            return
        # To the workers still starting too: each defers it to its reload handler (a worker may
        # have read the configuration before this SIGHUP; tunneld/entry.py).
        running = [w for w in self.workers if w.proc is not None]
        for worker in running:
            self._signal(worker, signal.SIGHUP)
        log.info("SIGHUP: passed to %d workers", len(running))

    def _stop(self, why: str) -> None:
        if self._stopping:
            if why in ("SIGTERM", "SIGINT"):
                log.info("%s again: already stopping", why)
            return
        assert self._loop is not None
        self._stopping = True
        if self._starting is not None:
            log.info("%s during start-up: stopping before any worker is started", why)
            systemd.notify("STOPPING=1")
            self._starting.cancel()  # its redis-server is stopped (PrivateRedis.start_async)
            return
        running = [w for w in self.workers if w.proc is not None]
        starting = sum(1 for w in running if not w.ready)
        log.info(
            "%s: stopping %d workers%s (grace period %.0fs)",
            why,
            len(running),
            f", {starting} of them still starting" if starting else "",
            self.config.grace_period,
        )
        if why in ("SIGTERM", "SIGINT"):
            systemd.notify("STOPPING=1")
        for worker in self.workers:
            if worker.restart is not None:
                worker.restart.cancel()
                worker.restart = None
            self._signal(worker, signal.SIGTERM)
        self._loop.call_later(self.config.grace_period + STOP_MARGIN, self._kill_all)
        if not running:
            self._done.set()

    def _kill_all(self) -> None:
        assert self._loop is not None
        for worker in self.workers:
            if worker.proc is not None and worker.proc.poll() is None:
                log.warning(
                    "worker %d (pid %d) still running %.0fs after SIGTERM: SIGKILL",
                    worker.index,
                    worker.pid,
                    self.config.grace_period + STOP_MARGIN,
                )
                self._signal(worker, signal.SIGKILL)
        self._loop.call_later(KILL_WAIT, self._done.set)

    def _signal(self, worker: Worker, sig: signal.Signals) -> None:
        if worker.proc is not None and worker.proc.returncode is None:
            try:
                worker.proc.send_signal(sig)
            except ProcessLookupError:
                pass


async def _copy(records: list[StoredExposure], url: str) -> None:
    from .redis_store import RedisStore

    store = RedisStore(url, node_id="supervisor")
    try:
        for start in range(0, len(records), 500):
            await asyncio.gather(*map(store.put, records[start : start + 500]))
    finally:
        await store.close()


def _write_marker(path: Path) -> None:
    """Create ``path`` durably: it says exposures.db is no longer the newest copy."""
    with open(path, "w") as f:
        f.write(
            "exposures live in the private redis of a --workers run; see tunneld/private_redis.py\n"
        )
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
