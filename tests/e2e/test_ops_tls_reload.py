"""docs/operations.md, "HTTPS on the public listener": renewal by SIGHUP in a real ``tunneld``.

- "`SIGHUP` ... reads every certificate and key file again ... New handshakes use the new
  certificates": every pair of the public listener (the first one, served to a client without
  SNI or with a name nobody covers, and a ``[[public_tls]]`` pair chosen by SNI) and the admin
  listener's ("reloaded on SIGHUP like the public pairs");
- "A pair that fails to load on reload leaves every certificate in use as it was, logged as
  `ERROR tunneld: SIGHUP: configuration not reloaded: …`": a renewal where one file of one pair
  is broken changes none of them, the pairs that did load included.

tests/e2e/test_public_tls.py reloads the first pair in a real process and a bad first file in
process; this covers the other pairs, the no-SNI default and the all-or-nothing rule.
"""

from __future__ import annotations

import signal
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from .procs import Processes

DOMAIN = "preview.test"


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    p = Processes(tmp_path)
    try:
        yield p
    finally:
        p.close()


def _write_pair(ca: trustme.CA, directory: Path, name: str, *hosts: str) -> None:
    cert = ca.issue_cert(*hosts)
    cert.cert_chain_pems[0].write_to_path(str(directory / f"{name}.pem"))
    cert.private_key_pem.write_to_path(str(directory / f"{name}.key"))


def _serial(ca: trustme.CA, port: int, name: str | None, check_name: bool = True) -> int:
    """The serial number of the certificate ``port`` presents to a client sending ``name`` as
    its SNI (None: no SNI). Verified against the CA; the name too when ``check_name``."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.check_hostname = name is not None and check_name
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=name) as tls:
            cert = tls.getpeercert()
            assert cert is not None
            return int(cert["serialNumber"], 16)


def _wait_for_log(procs: Processes, text: str, count: int, timeout: float = 15) -> str:
    assert procs.edge is not None
    log = procs.logs[procs.edge.pid]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text(errors="replace")
        if content.count(text) >= count:
            return content
        assert procs.edge.poll() is None, content
        time.sleep(0.05)
    raise AssertionError(f"no {count} x {text!r} in the log: {log.read_text(errors='replace')}")


def test_sighup_reloads_every_pair_or_none(procs: Processes, tmp_path: Path) -> None:
    ca = trustme.CA()
    d = tmp_path
    _write_pair(ca, d, "wild", f"*.{DOMAIN}")
    _write_pair(ca, d, "other", "*.other.test")
    _write_pair(ca, d, "admin", "127.0.0.1")
    toml = d / "tunneld.toml"
    toml.write_text(
        f'domain = "{DOMAIN}"\n'
        f'public_tls_cert = "{d / "wild.pem"}"\npublic_tls_key = "{d / "wild.key"}"\n'
        f'admin_tls_cert = "{d / "admin.pem"}"\nadmin_tls_key = "{d / "admin.key"}"\n'
        f'[[public_tls]]\ncert = "{d / "other.pem"}"\nkey = "{d / "other.key"}"\n'
    )
    ports = procs.start_edge("-c", str(toml), "--store", "memory")
    public, admin = ports["public"], ports["admin"]

    def serials() -> dict[str, int]:
        return {
            "first (SNI)": _serial(ca, public, f"8000-sb1-tok.{DOMAIN}"),
            "first (no SNI)": _serial(ca, public, None),
            "first (a name nobody covers)": _serial(ca, public, "nobody.example", False),
            "extra (SNI)": _serial(ca, public, "x.other.test"),
            "admin": _serial(ca, admin, "127.0.0.1"),
        }

    before = serials()
    first = before["first (SNI)"]
    assert before["first (no SNI)"] == before["first (a name nobody covers)"] == first
    assert len(set(before.values())) == 3  # the first pair, the extra one, the admin one

    # Renewed in place, all of them, but the extra pair's key is another certificate's: the
    # reload is refused, and not one certificate changes, those that did load included.
    for name, hosts in (("wild", [f"*.{DOMAIN}"]), ("other", ["*.other.test"])):
        _write_pair(ca, d, name, *hosts)
    _write_pair(ca, d, "admin", "127.0.0.1")
    _write_pair(ca, d, "stray", "stray.test")
    (d / "other.key").write_bytes((d / "stray.key").read_bytes())
    assert procs.edge is not None
    procs.edge.send_signal(signal.SIGHUP)
    log = _wait_for_log(procs, "SIGHUP: configuration not reloaded", 1)
    line = next(ln for ln in log.splitlines() if "SIGHUP: configuration not reloaded" in ln)
    assert " ERROR " in line and f"{d / 'other.key'} does not match" in line, line
    assert serials() == before

    # The key put right: the next SIGHUP installs every renewed certificate.
    _write_pair(ca, d, "other", "*.other.test")
    procs.edge.send_signal(signal.SIGHUP)
    _wait_for_log(procs, "SIGHUP: configuration reloaded", 1)
    after = serials()
    for what, serial in after.items():
        assert serial != before[what], what
    first = after["first (SNI)"]
    assert after["first (no SNI)"] == after["first (a name nobody covers)"] == first
