"""Structured logs: ``NEOXQ_LOG_FORMAT=json`` gives one JSON object per line."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli.logs import JsonFormatter, configure_logging


def test_json_formatter_fields_extras_and_exceptions() -> None:
    fmt = JsonFormatter()
    rec = logging.LogRecord("neoxq.worker", logging.WARNING, __file__, 1, "chunk %s: %d items",
                            ("c1", 3), None)
    rec.batch_id = "batch_x"  # what logger.warning(..., extra={...}) sets
    out = json.loads(fmt.format(rec))
    assert out["level"] == "warning" and out["logger"] == "neoxq.worker"
    assert out["message"] == "chunk c1: 3 items" and out["batch_id"] == "batch_x"
    assert out["ts"].endswith("Z") and out["pid"] == os.getpid() and out["host"]
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    out = json.loads(fmt.format(rec))
    assert "ValueError: boom" in out["exc"]


def test_unknown_format_is_refused() -> None:
    with pytest.raises(SystemExit, match="NEOXQ_LOG_FORMAT"):
        configure_logging("xml")


def test_a_command_logs_json_lines(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEOXQ_")}
    env.update({"NEOXQ_LOG_FORMAT": "json", "NEOXQ_DATA_DIR": str(tmp_path)})
    proc = subprocess.run([sys.executable, "-m", "cli.main", "db", "upgrade"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert lines, "alembic logs its migrations"
    records = [json.loads(x) for x in lines]  # every line is one JSON object
    assert any("Running upgrade" in r["message"] for r in records)
