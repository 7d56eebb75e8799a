"""deploy/sandbox-image/ built and run (issue 10: the sandbox image uses the agent zipapp).

No Docker engine here and no Docker Hub: deploy/sandbox-image/build-local.sh builds the real
Dockerfile with buildah (daemonless, ``--isolation chroot``) on a local base (``--build-arg
BASE_IMAGE``): Debian bookworm's python3 3.11 and the little else the Dockerfile runs, unpacked by
mmdebstrap; the root's tarball is cached in build/sandbox-image/cache (or $SANDBOX_CACHE) by a
hash of what makes it. podman runs the image as built: its own ENTRYPOINT (entrypoint.sh), CMD
and unprivileged USER, with ``--init`` as the README's ``docker run`` has it, on the host's
network since every listener here is on loopback.

A real ``tunneld serve`` with a TLS agent listener on 127.0.0.1 is the edge. Inside the container
``python3 -m http.server`` serves a file the sandbox user wrote, ``tunnel-agent expose`` prints
the preview URL, and the test GETs it through the edge's public listener.

buildah, podman, runc and mmdebstrap come from Debian (``make ensure-test-tools`` installs them);
when one is missing the test fails and says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent.conftest import ROOT, tls_files
from tests.e2e.procs import Processes, is_connected, preview_get, wait_for

BUILD_LOCAL = ROOT / "deploy" / "sandbox-image" / "build-local.sh"
TOOLS = ("buildah", "podman", "runc", "mmdebstrap")
SANDBOX = "sb-image"
CA_IN_IMAGE = "/run/tunnel-ca.pem"
SECRET_IN_IMAGE = "/run/secrets/tunnel-agent-token"  # the entrypoint's default token file

# A cold build first makes the base root with mmdebstrap (20-30 s here); each step of the test
# has its own timeout below.
pytestmark = pytest.mark.timeout(900)


def _missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


class Podman:
    """podman on the test's own storage, with build-local.sh's driver (overlay unless
    $SANDBOX_STORAGE_DRIVER says otherwise)."""

    def __init__(self, store: Path) -> None:
        self.base = [
            "podman",
            "--root",
            str(store / "root"),
            "--runroot",
            str(store / "run"),
            "--storage-driver",
            os.environ.get("SANDBOX_STORAGE_DRIVER", "overlay"),
            # runc: crun 1.8 refuses this machine's hybrid cgroup v1/v2 layout. No systemd, no
            # journald: cgroupfs and a file for podman's events.
            "--runtime",
            "runc",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
        ]

    def __call__(
        self,
        *args: str,
        timeout: float = 120,
        check: bool = True,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*self.base, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=env,
        )
        if check:
            assert done.returncode == 0, f"podman {' '.join(args)}: {done.stderr}{done.stdout}"
        return done


@pytest.fixture(scope="module")
def store() -> Iterator[Path]:
    """buildah's and podman's storage for this module, removed afterwards (hundreds of MB).
    Directly under the temp directory: podman refuses a runroot longer than 50 characters, and
    pytest's own paths (with pytest-xdist, .../pytest-N/popen-gwN/containers0) are longer."""
    path = Path(tempfile.mkdtemp(prefix="tsb-"))
    try:
        yield path
    finally:
        Podman(path)("rm", "--all", "--force", check=False)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def context(pyz: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A build context holding only what the Dockerfile copies: dist/tunnel-agent.pyz and
    deploy/sandbox-image/."""
    missing = _missing_tools()
    assert not missing, (
        f"missing for the sandbox image test: {' '.join(missing)} "
        "(make ensure-test-tools installs them; apt-get install buildah podman runc mmdebstrap)"
    )
    path = tmp_path_factory.mktemp("context")
    (path / "dist").mkdir()
    shutil.copyfile(pyz, path / "dist" / "tunnel-agent.pyz")
    shutil.copytree(ROOT / "deploy" / "sandbox-image", path / "deploy" / "sandbox-image")
    return path


def build_local(context: Path, store: Path, name: str) -> subprocess.CompletedProcess[str]:
    """build-local.sh, what ``make sandbox-image`` runs, on the test's own storage."""
    built = subprocess.run(
        ["/bin/sh", str(BUILD_LOCAL), str(context)],
        env={**os.environ, "SANDBOX_STORE": str(store), "SANDBOX_IMAGE": name},
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    assert built.stdout == f"{name}\n"
    return built


@pytest.fixture(scope="module")
def image(context: Path, store: Path) -> str:
    name = f"localhost/tunneld-test-sandbox:{os.getpid()}"
    build_local(context, store, name)
    return name


def test_the_image_is_the_dockerfiles(image: str, store: Path) -> None:
    """The built image's configuration is the one the Dockerfile and the README describe."""
    (config,) = json.loads(Podman(store)("image", "inspect", image).stdout)
    assert config["Config"]["User"] == "sandbox"
    assert config["Config"]["Entrypoint"] == ["/usr/local/bin/sandbox-entrypoint"]
    assert config["Config"]["Cmd"] == ["sleep", "infinity"]
    assert config["Config"]["WorkingDir"] == "/home/sandbox"
    assert "PYTHONUNBUFFERED=1" in config["Config"]["Env"]


def test_a_second_build_reuses_the_base(image: str, context: Path, store: Path) -> None:
    """The base's tarball (cache) and image (store) are made once: a second build only runs
    buildah on the Dockerfile, and gives an image with the same configuration."""
    again = build_local(context, store, f"{image}-again")
    assert "making the base root" not in again.stderr
    assert "importing" not in again.stderr
    assert f"building {image}-again on localhost/tunneld-sandbox-base:" in again.stderr
    podman = Podman(store)
    (first,) = json.loads(podman("image", "inspect", image).stdout)
    (second,) = json.loads(podman("image", "inspect", f"{image}-again").stdout)
    assert second["Config"] == first["Config"]


def _free_port() -> int:
    """A port free on 127.0.0.1 now: the container shares the host's network (loopback only)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# Inside the container: the agent process's uid and command line, read from /proc.
FIND_AGENT = """
import os
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\\0")[:-1]
        status = open(f"/proc/{pid}/status").read()
    except OSError:
        continue
    if argv[1:3] == ["/usr/local/bin/tunnel-agent", "run"]:
        uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
        print(uid, " ".join(argv[1:]))
"""


PYTHON_PROBE = """
import importlib.util, sys
found = [m for m in ("orjson", "uvloop", "h11", "wsproto") if importlib.util.find_spec(m)]
print(f"{sys.version_info[0]}.{sys.version_info[1]}", found)
"""


@pytest.mark.parametrize("token_from", ["environment", "secret-file"])
def test_the_image_serves_a_preview_url_through_a_tls_edge(
    image: str, store: Path, pyz: Path, tmp_path: Path, token_from: str
) -> None:
    podman = Podman(store)
    tls = tls_files(tmp_path, "127.0.0.1")
    p = Processes(tmp_path, "asyncio")
    container = f"tunneld-test-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        p.start_edge("--tls-cert", str(tls.cert), "--tls-key", str(tls.key))
        api_port, http_port = _free_port(), _free_port()
        token = p.token(SANDBOX)
        token_args = ["--env", "TUNNEL_AGENT_TOKEN"]  # the value from podman's environment
        if token_from == "secret-file":
            (tmp_path / "token").write_text(token + "\n")
            (tmp_path / "token").chmod(0o644)  # the container's user is uid 1000, not us
            token_args = ["--volume", f"{tmp_path / 'token'}:{SECRET_IN_IMAGE}:ro"]
        podman(
            "run",
            "--detach",
            "--init",
            "--name",
            container,
            "--network",
            "host",
            # podman raises these limits to values this machine's runc may not set; keep them low
            "--ulimit",
            "nofile=4096:4096",
            "--ulimit",
            "nproc=4096:4096",
            "--volume",
            f"{tls.ca}:{CA_IN_IMAGE}:ro",
            "--env",
            f"TUNNEL_AGENT_SERVER=127.0.0.1:{p.ports['agent']}",
            "--env",
            f"TUNNEL_AGENT_SANDBOX_ID={SANDBOX}",
            "--env",
            f"TUNNEL_AGENT_TLS_CA={CA_IN_IMAGE}",
            # never 3000 on the host's network; the test's own port instead
            "--env",
            f"TUNNEL_AGENT_ARGS=--api-port {api_port}",
            *token_args,
            image,  # no command: the image's ENTRYPOINT and CMD
            env={**os.environ, "TUNNEL_AGENT_TOKEN": token},
        )
        wait_for(lambda: is_connected(p, SANDBOX), timeout=60, what="the image's agent connected")

        # The agent, started by the entrypoint: the pyz, unprivileged, dialling with TLS.
        agents = podman("exec", container, "python3", "-c", FIND_AGENT).stdout.splitlines()
        assert len(agents) == 1, agents
        uid, command = agents[0].split(" ", 1)
        assert uid == "1000"
        expected = f"/usr/local/bin/tunnel-agent run --tls --tls-ca {CA_IN_IMAGE}"
        if token_from == "secret-file":
            expected += f" --token-file {SECRET_IN_IMAGE}"
        assert command == f"{expected} --api-port {api_port}"
        assert podman("exec", container, "id", "-un").stdout == "sandbox\n"
        # Debian bookworm's python3 and nothing else: the agent's packages come from the pyz.
        python = podman("exec", container, "python3", "-c", PYTHON_PROBE).stdout
        assert python == "3.11 []\n"
        installed = podman("exec", container, "sha256sum", "/usr/local/bin/tunnel-agent").stdout
        assert installed.split()[0] == hashlib.sha256(pyz.read_bytes()).hexdigest()
        mode = podman("exec", container, "stat", "-c", "%a %U", "/usr/local/bin/tunnel-agent")
        assert mode.stdout == "755 root\n"

        # The sandbox's service: a file the sandbox user writes, served by python3's http.server.
        body = f"hello from the sandbox image {secrets.token_hex(8)}\n"
        podman("exec", container, "sh", "-c", 'printf %s "$1" > hello.txt', "sh", body)
        podman(
            "exec",
            "--detach",
            container,
            "python3",
            "-m",
            "http.server",
            str(http_port),
            "--bind",
            "127.0.0.1",
        )
        wait_for(lambda: _listening(http_port), timeout=30, what="http.server in the container")
        api_env = ("--env", f"TUNNEL_AGENT_API=http://127.0.0.1:{api_port}")
        exposed = podman(
            "exec",
            *api_env,
            container,
            "tunnel-agent",
            "expose",
            str(http_port),
            "--name",
            "web",
        )
        url = exposed.stdout.strip()
        assert url.startswith(f"http://{http_port}-{SANDBOX}-"), exposed.stdout + exposed.stderr

        status = podman("exec", *api_env, container, "tunnel-agent", "status").stdout
        assert status == f"sandbox  {SANDBOX}\nedge     connected\n"

        answer = preview_get(p, url, "/hello.txt")
        assert answer.status_code == 200, answer.text
        assert answer.text == body
        owner = podman("exec", container, "stat", "-c", "%U %u", "hello.txt").stdout
        assert owner == "sandbox 1000\n"

        # `podman stop`: --init forwards SIGTERM to the CMD, the container ends, and with it the
        # agent: the edge sees the session end.
        podman("stop", "--time", "20", container, timeout=60)
        state = podman("inspect", "--format", "{{.State.ExitCode}}", container).stdout
        assert state.strip() == "143"  # sleep, ended by the SIGTERM
        wait_for(lambda: not is_connected(p, SANDBOX), timeout=30, what="the session gone")
        logs = podman("logs", container)
        assert "Traceback" not in logs.stdout + logs.stderr
    finally:
        podman("rm", "--force", container, check=False)
        p.close()
