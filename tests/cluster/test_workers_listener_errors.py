"""A listener that cannot be opened ends ``tunneld serve --workers N`` as it ends a single
``tunneld serve``: exit 1, one ``ERROR`` line naming the listener, its address and its settings,
no traceback, and nothing left running (the supervisor holds the ports before it starts its
private redis-server or any worker; tunneld/supervisor.py ``reserve_port``, ``listener_error``).

docs/operations.md, "Running tunneld": "`tunneld serve` exits with 2 and one line on stderr for a
configuration error, 1 if a listener cannot be bound (its port in use, or a host name that does
not resolve ...; the `ERROR` line names the listener and its settings, `cannot start: cannot open
the public listener on edge.example:8080 (public_host, public_port): [Errno -2] Name or service
not known` ...; with `--workers N` the supervisor's line is the same, before it starts anything,
also for a port that another `--workers` tunneld holds ...)"; "Workers", Ports: "The supervisor
binds each port once, without listening, to hold it (the HTTP-to-HTTPS redirect port too, when
on) ... A port it cannot hold (in use, also by another `--workers` tunneld; not allowed; a host
that does not resolve) ends the start before any worker, with the single process's line and exit
1".

Each case runs both modes at once and holds them to one wording. Before: the supervisor said
``cannot start: [Errno 98] Address already in use`` (or ``[Errno -2] Name or service not
known``) without the listener; a port held by another process's ``SO_REUSEPORT`` listener of the
same user (another ``tunneld serve --workers`` on the same ports) was shared, not refused: the
supervisor and its workers started and the kernel split the connections between the two; and the
HTTP-to-HTTPS redirect listener was not held by the supervisor: its port in use was found by
each worker in turn (two ``ERROR`` lines, then the supervisor's failed start).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.e2e.procs import Processes, wait_for
from tests.signal_hooks import session_members

ROOT = Path(__file__).resolve().parent.parent.parent
SECRETS = {"TUNNELD_ADMIN_TOKEN": "a", "TUNNELD_SECRET": "b"}
MODES = {"single": (), "workers": ("--workers", "2")}
DOC = " ".join((ROOT / "docs" / "operations.md").read_text().split())
SETPRIV = shutil.which("setpriv")
needs_redis = pytest.mark.skipif(
    shutil.which("redis-server") is None and not Path("/usr/bin/redis-server").exists(),
    reason="--workers on a sqlite store runs a private redis-server",
)


@dataclass
class Ended:
    status: int
    text: str
    left: list[str]  # processes of its session still running after it exited


def start(
    tmp: Path, mode: str, args: list[str], prefix: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    """A real ``python -m tunneld serve`` (the tree under test) in a session of its own, its
    output in a file (never a pipe nobody reads while it runs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNELD_")}
    env.update(SECRETS, PYTHONUNBUFFERED="1", TUNNELD_NODE_PORT="0")
    argv = [*prefix, sys.executable, "-m", "tunneld", "serve", *MODES[mode]]
    argv += ["--public-port", "0", "--agent-port", "0", "--admin-port", "0"]
    argv += ["--state-dir", str(tmp / f"state-{mode}"), *args]  # after: the last flag wins
    with (tmp / f"{mode}.log").open("wb") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
        )


def end(tmp: Path, mode: str, proc: subprocess.Popen[bytes]) -> Ended:
    """Its exit (one still running after 30 s started: killed, with its session, and failed)."""
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)  # its private redis-server has a process group of its own
        proc.wait(10)
        text = (tmp / f"{mode}.log").read_text(errors="replace")
        raise AssertionError(f"{mode}: started instead of refusing\n{text[-3000:]}") from None
    left = session_members(proc.pid)
    kill_session(proc.pid)  # a failing test leaves nothing behind either
    return Ended(proc.returncode, (tmp / f"{mode}.log").read_text(errors="replace"), left)


def kill_session(sid: int) -> None:
    for member in session_members(sid):
        try:
            os.kill(int(member.split()[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass


def refusals(tmp: Path, args: list[str], prefix: tuple[str, ...] = ()) -> dict[str, str]:
    """Run both modes at once with ``args``; check each ended as documented and return its
    ``ERROR`` line's message (after the logger's name)."""
    procs = {mode: start(tmp, mode, args, prefix) for mode in MODES}
    messages = {}
    for mode, proc in procs.items():
        ended = end(tmp, mode, proc)
        text = ended.text
        assert ended.status == 1, (mode, ended.status, text[-3000:])
        assert "Traceback" not in text, (mode, text)
        assert ended.left == [], (mode, f"left running: {ended.left}", text[-3000:])
        errors = [line for line in text.splitlines() if " ERROR " in line]
        assert len(errors) == 1, (mode, text)
        logger = "tunneld.supervisor" if mode == "workers" else "tunneld"
        _, _, messages[mode] = errors[0].partition(f" ERROR   {logger}: ")
        assert messages[mode].startswith("cannot start: cannot open the "), (mode, text)
        if mode == "workers":  # refused before anything was started
            assert "started (pid" not in text and "redis-server" not in text, text
            assert not (tmp / "state-workers").exists(), text
    assert messages["workers"] == messages["single"], messages
    return messages


@pytest.fixture
def taken() -> Iterator[socket.socket]:
    """A port in use: another process's listener on 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock


def in_use(name: str, settings: str, port: int) -> str:
    return (
        f"cannot start: cannot open the {name} listener on 127.0.0.1:{port} ({settings}): "
        f"[Errno 98] error while attempting to bind on address ('127.0.0.1', {port}): "
        "address already in use"
    )


def test_the_doc_says_both_modes_word_it_alike() -> None:
    assert (
        "with `--workers N` the supervisor's line is the same, before it starts anything, also "
        "for a port that another `--workers` tunneld holds: "
        "`tests/cluster/test_workers_listener_errors.py`" in DOC
    )
    assert (
        "while every worker is down at once, a socket with `SO_REUSEADDR`, as most servers "
        "set, may take it: "
        "`test_workers_listener_errors.py::test_what_the_reservation_keeps_out`" in DOC
    )
    assert (
        "to hold it (the HTTP-to-HTTPS redirect port too, when on)" in DOC
        and "A port it cannot hold (in use, also by another `--workers` tunneld; not allowed; a "
        "host that does not resolve) ends the start before any worker, with the single "
        "process's line and exit 1"
        in DOC
    )


@pytest.mark.parametrize(
    "name, flag, settings",
    [
        ("public", "--public-port", "public_host, public_port"),
        ("admin", "--admin-port", "admin_host, admin_port"),
    ],
)
def test_a_port_in_use(
    tmp_path: Path, taken: socket.socket, name: str, flag: str, settings: str
) -> None:
    port = taken.getsockname()[1]
    messages = refusals(tmp_path, [flag, str(port)])
    assert messages["workers"] == in_use(name, settings, port)


def test_a_port_another_reuse_port_listener_holds(tmp_path: Path) -> None:
    """As another ``tunneld serve --workers`` holds its ports: ``SO_REUSEPORT``, same user."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        messages = refusals(tmp_path, ["--public-port", str(port)])
    assert messages["workers"] == in_use("public", "public_host, public_port", port)


def test_a_host_name_that_does_not_resolve(tmp_path: Path) -> None:
    messages = refusals(tmp_path, ["--agent-host", "no-such-host.invalid"])
    # EAI_NONAME (-2), or EAI_AGAIN (-3) on a host without DNS: the same in both modes
    assert messages["workers"].startswith(
        "cannot start: cannot open the agent listener on no-such-host.invalid:0 "
        "(agent_host, agent_port): [Errno -"
    ), messages


def test_the_redirect_listener_port_in_use(tmp_path: Path, taken: socket.socket) -> None:
    cert, key = tls_files(tmp_path)
    port = taken.getsockname()[1]
    args = ["--public-tls-cert", cert, "--public-tls-key", key, "--public-redirect-port", str(port)]
    messages = refusals(tmp_path, args)
    assert messages["workers"] == in_use(
        "HTTP-to-HTTPS redirect", "public_host, public_redirect_port", port
    )


def test_a_port_it_may_not_bind(tmp_path: Path) -> None:
    """Port 1 without CAP_NET_BIND_SERVICE (root: the capability dropped with setpriv)."""
    if Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text().strip() in ("0", "1"):
        pytest.skip("every port may be bound here")
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        if SETPRIV is None:
            pytest.skip("root without setpriv: every port may be bound")
        prefix = (SETPRIV, "--bounding-set=-net_bind_service", "--inh-caps=-net_bind_service")
        if subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode:
            pytest.skip("setpriv may not drop capabilities here (no CAP_SETPCAP)")
    messages = refusals(tmp_path, ["--admin-port", "1"], prefix)
    assert messages["workers"] == (
        "cannot start: cannot open the admin listener on 127.0.0.1:1 (admin_host, admin_port): "
        "[Errno 13] error while attempting to bind on address ('127.0.0.1', 1): permission denied"
    )


def test_what_the_reservation_keeps_out() -> None:
    """``reserve_port``'s socket, while no worker listens beside it: the workers' listeners
    (``SO_REUSEADDR`` and ``SO_REUSEPORT``, as asyncio's ``reuse_port=True`` binds) may bind and
    listen, a socket without either option may not, and one with ``SO_REUSEADDR`` may (socket(7):
    it binds unless a socket listens on the port), as docs/operations.md, Workers, says."""
    from tunneld.supervisor import reserve_port

    def binds(reuse_addr: bool, reuse_port: bool) -> bool:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(reuse_addr))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuse_port))
            try:
                sock.bind(("127.0.0.1", port))
                sock.listen()
            except OSError as exc:
                assert exc.errno == errno.EADDRINUSE, exc
                return False
            return True

    reserved = reserve_port("127.0.0.1", 0)
    try:
        port = reserved[0].getsockname()[1]
        assert not binds(reuse_addr=False, reuse_port=False)
        assert binds(reuse_addr=True, reuse_port=True)  # a worker
        assert binds(reuse_addr=True, reuse_port=False)  # the limit the doc states
    finally:
        for sock in reserved:
            sock.close()


def tls_files(tmp: Path) -> tuple[str, str]:
    import trustme

    issued = trustme.CA().issue_cert("*.preview.test", "preview.test")
    issued.cert_chain_pems[0].write_to_path(str(tmp / "cert.pem"))
    issued.private_key_pem.write_to_path(str(tmp / "key.pem"))
    return str(tmp / "cert.pem"), str(tmp / "key.pem")


@needs_redis
def test_workers_hold_the_redirect_port_and_a_second_supervisor_is_refused(
    tmp_path: Path,
) -> None:
    """The ports the supervisor holds (bound, then ``SO_REUSEPORT``) are the workers' to share:
    both start and answer on the redirect listener; another ``--workers`` tunneld given the same
    public port is refused with the line above and leaves nothing running."""
    cert, key = tls_files(tmp_path)
    with socket.create_server(("127.0.0.1", 0)) as probe:
        redirect = probe.getsockname()[1]  # free a moment ago; ours from the supervisor's start
    procs = Processes(tmp_path)
    try:
        ports = procs.start_edge(
            "--workers", "2", "--domain", "preview.test", "--public-tls-cert", cert,
            "--public-tls-key", key, "--public-redirect-port", str(redirect),
        )  # fmt: skip
        workers: list[int] = ports["workers"]  # type: ignore[assignment]
        assert len(workers) == 2, ports
        answer = httpx.get(
            f"http://127.0.0.1:{redirect}/a", headers={"host": "8000-sb1-tok.preview.test"}
        )
        assert answer.status_code == 308, answer.text
        location = f"https://8000-sb1-tok.preview.test:{ports['public']}/a"
        assert answer.headers["location"] == location
        second = start(tmp_path, "workers", ["--public-port", str(ports["public"])])
        ended = end(tmp_path, "workers", second)
        assert ended.status == 1 and ended.left == [], ended
        assert in_use("public", "public_host, public_port", ports["public"]) in ended.text
        assert "Traceback" not in ended.text and "started (pid" not in ended.text, ended.text
        assert procs.edge is not None
        assert procs.stop(procs.edge, timeout=30) == 0, procs.output(procs.edge)[-3000:]
        wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), what="gone")
    finally:
        procs.close()
