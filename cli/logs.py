"""Structured logs: ``NEOXQ_LOG_FORMAT=json`` makes every neoxq process (API, worker, CLI)
write one JSON object per line, which log shippers (Loki, Fluent Bit, CloudWatch) parse
without regexes. ``text`` (the default) is for people at a terminal.

Configured once, in the ``neoxq`` entry point, before any command runs: the worker's own
``logging.basicConfig`` is then a no-op, Celery leaves the root logger alone
(``worker_hijack_root_logger=False``), and uvicorn's default logging config is pointed at
the same formatter.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from typing import Any

# LogRecord attributes that are not "extra" fields.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (ISO 8601 UTC), level, logger, message, process,
    host, any ``extra={...}`` fields, and the exception text if there is one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # uvicorn's dictConfig passes fmt/use_colors; they mean nothing here.
        super().__init__()
        self.host = socket.gethostname()

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
            "host": self.host,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, str | int | float | bool | None) \
                    else repr(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(fmt: str | None = None, level: str | int = "INFO") -> str:
    """Install a root handler in ``fmt`` (default ``$NEOXQ_LOG_FORMAT`` or ``text``);
    returns the format used. Idempotent: it replaces the handler it installed before."""
    fmt = (fmt or os.environ.get("NEOXQ_LOG_FORMAT") or "text").lower()
    if fmt not in ("text", "json"):
        raise SystemExit(f"NEOXQ_LOG_FORMAT: 'text' or 'json' expected, got {fmt!r}")
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_neoxq", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._neoxq = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    # httpx logs every request at INFO: the CLI's polling would drown everything else.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if fmt == "json":
        _uvicorn_json()
    return fmt


def _uvicorn_json() -> None:
    """Point uvicorn's default logging config (used by ``uvicorn.run``) at JSON lines."""
    try:
        from uvicorn.config import LOGGING_CONFIG
    except ImportError:  # the worker image may lack uvicorn: nothing to configure
        return
    for name in LOGGING_CONFIG.get("formatters", {}):
        LOGGING_CONFIG["formatters"][name] = {"()": "cli.logs.JsonFormatter"}
