"""The FP8 accuracy benchmark in its test-sized form, and the throughput benchmark's modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.fp8_accuracy import main as accuracy_main
from bench.fp8_accuracy import table as accuracy_table
from bench.throughput import main as throughput_main
from bench.throughput import table as throughput_table


@pytest.mark.slow
def test_accuracy_small_run(tmp_path: Path) -> None:
    out = tmp_path / "acc.json"
    accuracy_main(["--small", "--device", "cpu", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["commit"] and data["date"] and data["device"] == "cpu"
    for part in ("random_20b", "trained_small"):
        p = data["parts"][part]
        assert p["tokens"] > 0
        assert set(p["modes"]) == {"bf16", "fp8-kv", "fp8-weights", "fp8-all"}
        base = p["modes"]["bf16"]
        assert base["mean_abs_logit_diff"] == 0 and base["top1_agreement"] == 1
        for mode in ("fp8-kv", "fp8-weights", "fp8-all"):
            m = p["modes"][mode]
            # FP8 changes the numbers, a little.
            assert 0 < m["mean_abs_logit_diff"] <= m["max_abs_logit_diff"] < 1
            assert m["top1_agreement"] >= 0.5
            assert abs(m["perplexity_ratio"] - 1) < 0.05
            assert 0 <= m["greedy_agreement"] <= 1
        assert p["modes"]["fp8-weights"]["weight_bytes"] < base["weight_bytes"]
    train = data["parts"]["trained_small"]["train"]
    assert train["final_loss"] < train["first_loss"]
    assert "| trained_small | fp8-all |" in accuracy_table(data)


@pytest.mark.slow
def test_throughput_modes_write_rows_and_ratios(tmp_path: Path) -> None:
    out = tmp_path / "modes.json"
    throughput_main(["--model", "preset:tiny", "--device", "cpu", "--num-prompts", "4",
                     "--workload", "a", "--modes", "bf16,fp8-kv,fp8-all", "--skip-hf",
                     "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["mode_order"] == ["bf16", "fp8-kv", "fp8-all"]
    modes = data["modes"]
    assert modes["fp8-kv"]["engine"]["kv_cache_dtype"] == "fp8"
    assert modes["fp8-all"]["engine"]["quantization"] == "fp8"
    # The FP8 cache holds more tokens in the same memory; FP8 weights take fewer bytes.
    assert modes["fp8-kv"]["engine"]["cache_tokens"] > modes["bf16"]["engine"]["cache_tokens"]
    assert modes["fp8-all"]["engine"]["weight_bytes"] < modes["bf16"]["engine"]["weight_bytes"]
    for mode in ("fp8-kv", "fp8-all"):
        assert modes[mode]["workloads"]["a"]["ours"]["output_tokens"] == 4 * 128
        assert data["ratios_over_first"][mode]["a"] > 0
    assert data["workloads"]["a"] == modes["bf16"]["workloads"]["a"]
    # A second run (another workload) merges into each mode's rows.
    throughput_main(["--model", "preset:tiny", "--device", "cpu", "--num-prompts", "2",
                     "--workload", "b", "--modes", "bf16,fp8-kv,fp8-all", "--skip-hf",
                     "--out", str(out)])
    data = json.loads(out.read_text())
    assert set(data["modes"]["fp8-kv"]["workloads"]) == {"a", "b"}
    assert set(data["ratios_over_first"]["fp8-all"]) == {"a", "b"}
    assert "| fp8-all | (b) |" in throughput_table(data)
