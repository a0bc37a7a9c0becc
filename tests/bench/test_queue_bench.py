"""Smoke test of bench/queue.py: a small run writes a well-formed report."""

from __future__ import annotations

import json
from pathlib import Path

from bench.queue import main


def test_queue_bench_small_run(tmp_path: Path, redis_url: str) -> None:
    out = tmp_path / "queue.json"
    assert main(["--requests", "60", "--max-tokens", "4", "--ingest-lines", "500",
                 "--repeats", "1", "--chunk-items", "16", "--redis-url", redis_url,
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    for key in ("commit", "date", "device", "direct_seconds", "queue_seconds", "overhead"):
        assert key in report, key
    assert report["queue_chunks"] == 4
    assert report["ingest"]["lines"] == 500 and report["ingest"]["seconds"] > 0
    assert report["direct_seconds"] > 0 and report["queue_seconds"] > 0
