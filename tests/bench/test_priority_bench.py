"""bench/priority.py end to end on the tiny model on CPU: a worker and the API through
an embedded Redis, idle and busy interactive latencies, the batch alone and with
interactive traffic, every figure in the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.priority import main


@pytest.mark.slow
def test_priority_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "priority.json"
    res = main(["--model", "preset:tiny", "--device", "cpu", "--num-prompts", "48",
                "--idle-requests", "2", "--warmup", "4", "--max-num-seqs", "16",
                "--gap", "0.2", "--max-tokens", "16", "--yield-tokens", "4",
                "--out", str(out)])
    assert "error" not in res, res.get("error")
    saved = json.loads(out.read_text())
    assert saved["commit"] and saved["date"] and "CPU" in saved["device"]
    assert saved["idle"]["n"] == 2 and saved["busy"]["n"] >= 1
    assert saved["busy"]["errors"] == []
    assert saved["batch_alone"]["requests"] == saved["batch_with_interactive"]["requests"] == 48
    assert set(saved["ratios"]) == {"busy_over_idle_median", "busy_over_idle_p90",
                                    "batch_throughput_drop", "busy_fraction",
                                    "drop_per_busy_fraction"}
    assert 0 < saved["ratios"]["busy_fraction"] <= 1
    assert saved["worker"]["yield_tokens"] == 4
    assert set(saved["target"]) == {"interactive_at_most_2x_idle", "batch_drop_at_most_10pct"}
