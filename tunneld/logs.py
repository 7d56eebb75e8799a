"""``--log-format json``: one JSON object per log line, with the stdlib's logging and orjson.

The stdlib formatter is enough here (no python-json-logger or structlog): a record becomes
``{"time", "level", "logger", "message"}``, plus ``worker`` for a worker of ``--workers N``,
``exception`` when one is attached, and the access log's fields (``record.access``: client,
sandbox, port, method, path, status, bytes_in, bytes_out, duration_ms, ttfb_ms, request_id)
as top-level keys, so a log shipper needs no parsing.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson

__all__ = ["JsonFormatter"]


class JsonFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker is not None:
            out["worker"] = self.worker
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            out.update(access)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()
