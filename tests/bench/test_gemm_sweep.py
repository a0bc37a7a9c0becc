"""bench.gemm_sweep's CPU smoke run: every batch size timed, per-token cost derived."""

from __future__ import annotations

import json
from pathlib import Path

from bench.gemm_sweep import block_shapes, main


def test_sweep_writes_every_size(tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    main(["--device", "cpu", "--sizes", "8:33:8", "--reps", "2", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["model"] == "tiny" and data["commit"]
    assert [r["m"] for r in data["rows"]] == [8, 16, 24, 32]
    for r in data["rows"]:
        assert r["step_ms"] > 0 and r["tflops"] > 0
        assert abs(r["us_per_token"] * r["m"] / 1e3 - r["step_ms"]) < 1e-6 * r["step_ms"] + 1e-9
        assert set(r["per_layer_us"]) == {name for name, _, _ in block_shapes("tiny")[1]}


def test_block_shapes_are_the_20b_s() -> None:
    layers, shapes = block_shapes("gpt-neox-20b")
    assert layers == 44
    assert shapes == [("query_key_value", 18432, 6144), ("dense", 6144, 6144),
                      ("dense_h_to_4h", 24576, 6144), ("dense_4h_to_h", 6144, 24576)]


def test_merge_bench_times_both_layouts(tmp_path: Path) -> None:
    """bench.gemm_merge's CPU smoke run: apart and merged timed at each size, ratios
    derived from them."""
    from bench.gemm_merge import main as merge_main

    out = tmp_path / "merge.json"
    merge_main(["--device", "cpu", "--sizes", "4,16", "--reps", "2", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["model"] == "tiny" and [r["m"] for r in data["rows"]] == [4, 16]
    for r in data["rows"]:
        us = r["per_layer_us"]
        assert set(us) == {"up_apart", "up_merged", "down_apart", "down_merged"}
        assert all(v > 0 for v in us.values())
        assert r["up_merged_over_apart"] == us["up_apart"] / us["up_merged"]
