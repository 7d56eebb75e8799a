"""A bad preview domain: an embedded ``EdgeServer`` refuses it at construction (``ConfigError``)
instead of handing out preview URLs no client can use, and ``tunneld serve`` refuses it at start
(exit 2, one line). tests/protocol/test_preview_domain_rule.py has the rule itself.

Found here: an edge given "-bad.example" (or "a..b", a 64-character label...) answered an expose
with ``200 {"exposedAt": "http://8000-sb1-<token>.-bad.example:.../"}``; and
``tunneld serve --domain "\\u212a.example"`` (KELVIN SIGN) started and printed such URLs, as the
configuration check took letters that Unicode folds into a-z.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunneld.config import ConfigError, load_config

from .conftest import Stack

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent.parent
SECRETS = {"TUNNELD_ADMIN_TOKEN": "a", "TUNNELD_SECRET": "b"}
# is_dns_name took these before (re.IGNORECASE folds them into [a-z]); so did load_config
FOLDED = ["\u212a.example", "\u017fite.example", "\u0130x.example", "\u0131x.example"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize(
    "domain", ["-bad.example", "a..b", "a" * 64 + ".example", "example.com..", FOLDED[0]]
)
async def test_an_edge_under_a_bad_domain_does_not_start(domain: str) -> None:
    """An edge embedded with a Config that skipped validate() (load_config always runs it): the
    EdgeServer refuses it (ConfigError), so no expose is stored and no agent's welcome fails.
    Before that, an expose was answered 400 INVALID_DOMAIN only once it was stored, and every
    agent that connected failed in its welcome and reconnected in a loop
    (tests/e2e/test_preview_host_length.py has the other settings of a preview URL)."""
    stack = Stack(domain=domain)
    with pytest.raises(ConfigError) as info:
        await stack.start()
    assert str(info.value).startswith("cannot build preview URLs: Invalid preview domain: ")
    assert stack.edge is None


@pytest.mark.parametrize("domain", FOLDED)
def test_load_config_refuses_a_domain_with_letters_folded_into_ascii(domain: str) -> None:
    with pytest.raises(ConfigError, match=r"^invalid domain .*: a DNS name is labels of"):
        load_config(None, environ={**SECRETS, "TUNNELD_DOMAIN": domain})


def test_tunneld_serve_exits_2_for_a_domain_with_a_kelvin_sign(tmp_path: Path) -> None:
    """A real ``python -m tunneld serve`` of the tree under test (``-m`` with this cwd). Had it
    started, it would write its ports file: the wait ends there, or at exit (bounded)."""
    ports_file = tmp_path / "ports.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNELD_")}
    env.update(SECRETS)
    argv = [sys.executable, "-m", "tunneld", "serve", "--domain", FOLDED[0], "--store", "memory"]
    argv += ["--public-port", "0", "--agent-port", "0", "--admin-port", "0"]
    argv += ["--ports-file", str(ports_file), "--state-dir", str(tmp_path / "state")]
    err = tmp_path / "stderr"
    with err.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=out)
    try:
        deadline = time.monotonic() + 30
        while proc.poll() is None and not ports_file.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        started = ports_file.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    stderr = err.read_text(encoding="utf-8", errors="replace")
    assert not started, "tunneld served preview URLs under a domain that is no DNS name"
    assert proc.returncode == 2, stderr
    assert stderr.startswith(
        "tunneld: configuration error: invalid domain '\u212a.example': a DNS name is"
    ), stderr
    assert stderr.count("\n") == 1, stderr
