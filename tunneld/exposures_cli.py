"""``tunneld exposures export|import``: the stored exposures as JSON lines (backup, restore,
inspection, migration between stores).

Export reads without the state directory's lock: WAL gives it a consistent snapshot even while
tunneld writes. Import takes the lock, so it is refused while a tunneld runs on the directory (that
edge would neither see nor keep the change); every line is checked against the registry's rules
(sandbox id, port, name, token, the per-sandbox cap, one token per port) before anything is
written, and the write is one transaction. More sandboxes with exposures than ``max_sandboxes``
(read from the configuration as ``tunneld serve`` reads it) is not refused: as at ``serve``'s
start-up, stored data is never dropped; everything is imported and one warning line says how many
sandboxes the directory now holds and that new sandboxes will be refused until fewer hold
exposures.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

import orjson

from .config import Config, ConfigError, load_config
from .registry import Registry
from .store import SqliteStore, StoredExposure, StoreError, default_state_dir, read_exposures

_FIELDS = {
    "sandbox_id",
    "port",
    "token",
    "name",
    "created_at",
    "protocol",
    "proxy_protocol",
    "inspect",
    "public_port",
}


def _config(args: argparse.Namespace) -> Config:
    # Only state_dir and the caps matter here; the secrets may be absent on this machine.
    env = dict(os.environ)
    env.setdefault("TUNNELD_ADMIN_TOKEN", "unused-for-exposures")
    env.setdefault("TUNNELD_SECRET", "unused-for-exposures")
    return load_config(
        args.config or env.get("TUNNELD_CONFIG"), {"state_dir": args.state_dir}, environ=env
    )


def run_exposures(args: argparse.Namespace) -> int:
    config = _config(args)
    if config.store == "memory":
        raise ConfigError("store = memory: nothing is stored, nothing to export/import")
    if config.store != "sqlite":
        raise ConfigError(
            "export/import work on the sqlite store; with Redis use redis-cli or Redis's own "
            "backups (docs/operations.md, Redis store)"
        )
    state_dir = config.state_dir or str(default_state_dir())
    try:
        if args.action == "export":
            return _export(state_dir, sys.stdout)
        return _import(state_dir, config, args.file, args.replace)
    except StoreError as exc:
        print(f"tunneld exposures {args.action}: {exc}", file=sys.stderr)
        return 2


def _export(state_dir: str, out: TextIO) -> int:
    from .private_redis import read_unsaved

    records = read_unsaved(Path(state_dir))  # a --workers run holds newer ones, if any
    if records is None:
        records = read_exposures(state_dir)
    for record in records:
        out.write(orjson.dumps(record.to_json()).decode())
        out.write("\n")
    out.flush()
    print(f"exported {len(records)} exposures from {state_dir}", file=sys.stderr)
    return 0


def parse_lines(lines: Iterable[str], now: float) -> list[StoredExposure]:
    """Records from JSON lines; StoreError naming the line on anything malformed."""
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item: Any = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise StoreError(f"line {number}: not JSON ({exc})") from None
        if not isinstance(item, dict):
            raise StoreError(f"line {number}: expected a JSON object")
        unknown = set(item) - _FIELDS
        if unknown:
            raise StoreError(f"line {number}: unknown field(s) {', '.join(sorted(unknown))}")
        missing = {"sandbox_id", "port", "token"} - set(item)
        if missing:
            raise StoreError(f"line {number}: missing field(s) {', '.join(sorted(missing))}")
        created_at = item.get("created_at", now)
        if isinstance(created_at, bool) or not isinstance(created_at, (int, float)):
            raise StoreError(f"line {number}: created_at must be a number (Unix time)")
        records.append(  # option values are checked by Registry.load, as a stored record's
            StoredExposure(
                item["sandbox_id"],
                item["port"],
                item["token"],
                item.get("name"),
                created_at,
                item.get("protocol", "http"),
                item.get("proxy_protocol", False),
                item.get("inspect", False),
                item.get("public_port"),
            )
        )
    return records


def _import(state_dir: str, config: Config, path: str | None, replace: bool) -> int:
    try:
        if path is None or path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreError(f"cannot read {path or 'stdin'}: {exc}") from None
    records = parse_lines(text.splitlines(), time.time())
    store = SqliteStore.open(state_dir)  # the lock: refused while a tunneld runs here
    registry = Registry(
        max_exposures=config.max_exposures_per_sandbox, max_sandboxes=config.max_sandboxes
    )
    # Registry.load says when the records cross max_sandboxes, counting as of the record that
    # crossed it; the import says it below instead, with the count it leaves behind.
    registry_log = logging.getLogger("tunneld")
    was_disabled, registry_log.disabled = registry_log.disabled, True
    try:
        if not replace:
            registry.load(store.read_all_now())
        for number, record in enumerate(records, 1):
            try:
                registry.load([record])
            except StoreError as exc:
                raise StoreError(f"record {number}: {exc}; nothing imported") from None
        count = store.import_now(records, replace=replace)
    finally:
        registry_log.disabled = was_disabled
        store.close_now()
    print(
        f"imported {count} exposures into {store.path}"
        f"{' (replacing what was there)' if replace else ''}",
        file=sys.stderr,
    )
    cap = config.max_sandboxes
    if registry.exposing > cap:  # kept, as tunneld serve keeps them: said, never dropped
        print(
            f"tunneld exposures import: warning: {registry.exposing} sandboxes now have stored "
            f"exposures, more than max_sandboxes ({cap}): all of them were imported and tunneld "
            "serves them all, but refuses exposes for new sandboxes (409 TOO_MANY_SANDBOXES) "
            f"until fewer than {cap} hold exposures; raise max_sandboxes to admit new ones",
            file=sys.stderr,
        )
    return 0
