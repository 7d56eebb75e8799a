"""docs/operations.md, "Running tunneld": a real `tunneld serve` given a listener host that is
no IP address or host name, or an empty `state_dir`, exits 2 with one line on stderr and no
traceback; a well-formed host name that does not resolve fails at bind, exit 1, with one line
naming the listener and its settings.

Found by these tests: `--public-host example.com:8080` failed at bind, exit 1 as for a DNS
outage, and `--state-dir ""` started with the database in the default place."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
SECRETS = {"TUNNELD_ADMIN_TOKEN": "a", "TUNNELD_SECRET": "b"}


def serve(tmp: Path, *args: str, state_dir: bool = True) -> tuple[int, str]:
    """(exit status, stderr) of a real ``python -m tunneld serve`` (the tree under test), which
    must end by itself: one still running after 30 s started, and fails the test. The state
    directory is the test's own, unless ``state_dir`` is false (the flag would beat the file)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNELD_")}
    env.update(SECRETS)
    argv = [sys.executable, "-m", "tunneld", "serve", "--public-port", "0", "--agent-port", "0"]
    argv += ["--admin-port", "0"]
    if state_dir:
        argv += ["--state-dir", str(tmp / "state")]
    argv += args  # after: a flag given twice is the last one
    with subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    ) as proc:
        try:
            _, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise AssertionError(f"tunneld serve {args} started") from None
    return proc.returncode, stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--admin-host", "http://10.0.0.1"],
            "admin_host must be an IP address or a host name, not 'http://10.0.0.1' (no port, "
            'scheme or brackets; "" for every interface)',
        ),
        (
            ["--public-host", "example.com:8080"],
            "public_host must be an IP address or a host name, not 'example.com:8080'",
        ),
        (["--agent-host", "[::1]"], "agent_host must be an IP address or a host name"),
        (
            ["--state-dir", ""],
            "state_dir is empty: set a directory, or leave it out for the default "
            "($STATE_DIRECTORY under systemd, else ~/.local/state/tunneld)",
        ),
    ],
    ids=["admin_host-scheme", "public_host-port", "agent_host-brackets", "state_dir-empty"],
)
def test_a_bad_host_or_empty_state_dir_exits_2_with_one_line(
    args: list[str], message: str, tmp_path: Path
) -> None:
    status, stderr = serve(tmp_path, *args)
    assert status == 2, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tunneld: configuration error: "), stderr
    assert message in lines[0], stderr
    assert not (tmp_path / "state").exists()  # refused before the store is opened


def test_the_same_in_the_config_file(tmp_path: Path) -> None:
    toml = tmp_path / "tunneld.toml"
    toml.write_text('admin_host = "0.0.0.0:7070"\n')
    status, stderr = serve(tmp_path, "-c", str(toml))
    assert status == 2 and stderr.startswith("tunneld: configuration error: admin_host"), stderr
    toml.write_text('state_dir = ""\n')
    status, stderr = serve(tmp_path, "-c", str(toml), state_dir=False)
    assert status == 2 and stderr.startswith("tunneld: configuration error: state_dir"), stderr


@pytest.mark.parametrize("which", ["public", "agent", "admin"])
def test_a_host_name_that_does_not_resolve_exits_1_naming_the_listener(
    which: str, tmp_path: Path
) -> None:
    status, stderr = serve(tmp_path, f"--{which}-host", "no-such-host.invalid")
    assert status == 1, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, stderr
    assert (
        f"cannot start: cannot open the {which} listener on no-such-host.invalid:0 "
        f"({which}_host, {which}_port): [Errno " in errors[0]
    ), stderr
