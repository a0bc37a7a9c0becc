"""Smoke test of bench/scale.py on CPU: one worker, then two, through a real Redis and
SQLite; the report has every figure, and a second run adds to the same file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.scale import main


@pytest.mark.slow
def test_scale_bench_small_run(tmp_path: Path, redis_url: str) -> None:
    out = tmp_path / "scale.json"
    common = ["--model", "preset:tiny", "--device", "cpu", "--num-prompts-a", "16",
              "--num-prompts-b", "16", "--warmup", "4", "--max-num-seqs", "16",
              "--redis-url", redis_url, "--out", str(out)]
    main(["--configs", "1", *common])
    main(["--configs", "2", *common])
    report = json.loads(out.read_text())
    for key in ("commit", "date", "device", "model", "workloads", "summary", "target"):
        assert key in report, key
    assert set(report["configs"]) == {"1", "2"}
    one, two = report["configs"]["1"], report["configs"]["2"]
    assert "error" not in one and "error" not in two, (one.get("error"), two.get("error"))
    assert one["workers"] == 1 and two["workers"] == 2
    for cfg in (one, two):
        for wl in ("a", "b"):
            r = cfg["runs"][wl]
            assert r["requests"] == 16 and r["output_tokens"] > 0 and r["seconds"] > 0
            assert sum(w["items"] for w in r["workers"].values()) == 16
    assert two["runs"]["a"]["tail_seconds"] >= 0
    assert len(two["runs"]["a"]["workers"]) == 2  # both workers ran part of the batch
    assert report["summary"]["a"]["2"]["speedup_over_1"] > 0
    assert "partial" not in one and "partial" not in two


def test_a_config_that_fails_keeps_its_finished_workloads(tmp_path: Path,
                                                         redis_url: str) -> None:
    """Workload (b) cannot run (no lines: an empty batch is refused): (a)'s figures,
    written as soon as (a) finished, stay in the file next to the error."""
    out = tmp_path / "scale.json"
    main(["--configs", "1", "--model", "preset:tiny", "--device", "cpu",
          "--num-prompts-a", "8", "--num-prompts-b", "-1", "--warmup", "2",
          "--max-num-seqs", "8", "--redis-url", redis_url, "--out", str(out)])
    cfg = json.loads(out.read_text())["configs"]["1"]
    assert cfg["error"] and "partial" not in cfg
    assert cfg["runs"]["a"]["requests"] == 8 and "b" not in cfg["runs"]


def test_fleet_gpus_are_indices_among_the_visible_ones(monkeypatch: pytest.MonkeyPatch,
                                                       ) -> None:
    from bench.scale import visible_devices

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_devices(["0", "1"]) == "0,1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 1")
    assert visible_devices(["0"]) == "3" and visible_devices(["1", "0"]) == "1,3"
    with pytest.raises(SystemExit, match="not among"):
        visible_devices(["2"])
