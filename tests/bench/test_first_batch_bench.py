"""Smoke test of bench/first_batch.py on CPU: a fresh worker without and with its warm-up,
two batches each, through a real Redis and SQLite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.first_batch import main


@pytest.mark.slow
def test_first_batch_bench_small_run(tmp_path: Path, redis_url: str) -> None:
    out = tmp_path / "first.json"
    main(["--model", "preset:tiny", "--device", "cpu", "--num-prompts", "12",
          "--max-num-seqs", "16", "--redis-url", redis_url, "--out", str(out)])
    report = json.loads(out.read_text())
    for key in ("commit", "date", "device", "model", "workload", "first_over_second"):
        assert key in report, key
    off, on = report["modes"]["off"], report["modes"]["on"]
    assert off["warmup_seconds"] is None and on["warmup_seconds"] > 0
    for res in (off, on):
        for run in (res["first"], res["second"]):
            assert run["requests"] == 12 and run["output_tokens"] > 0
        assert res["first_over_second"] == res["first"]["seconds"] / res["second"]["seconds"]
        after = [res[k]["seconds"] - res[k]["submit_seconds"] for k in ("first", "second")]
        assert 0 < after[0] and res["worker_first_over_second"] == after[0] / after[1]
    assert set(report["first_over_second"]) == {"off", "on"}
