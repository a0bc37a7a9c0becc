"""The throughput benchmark's CPU smoke mode runs end to end and writes its JSON."""

from __future__ import annotations

import json
from pathlib import Path

from bench.throughput import main, roofline
from models.config import get_preset


def test_smoke_run_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "tiny.json"
    main(["--model", "preset:tiny", "--device", "cpu", "--num-prompts", "16",
          "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["commit"] and data["date"]
    assert data["ceilings"]["copy_bytes_per_s"] > 0 and data["ceilings"]["gemm_flops_per_s"] > 0
    for name in ("a", "b"):
        w = data["workloads"][name]
        assert w["prompts"] == 16
        assert w["ours"]["output_tokens"] == w["output_tokens"]
        assert w["ours"]["output_tok_per_s"] > 0 and w["roofline"]["seconds"] > 0
        assert w["hf"]["subset"] and w["hf"]["output_tok_per_s"] > 0
        assert set(w["ratios"]) == {"ours_over_roofline", "ours_over_hf"}
    # A second run for one workload merges into the same file.
    main(["--model", "preset:tiny", "--device", "cpu", "--num-prompts", "4", "--workload", "a",
          "--skip-hf", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["workloads"]["a"]["prompts"] == 4 and data["workloads"]["b"]["prompts"] == 16


def test_roofline_matches_design_figures() -> None:
    """DESIGN.md: on an H200 (4.3 TB/s, 795 TFLOP/s, ~84 GB of KV) the 20B's roofline is
    about 7,200 output tok/s for workload (a)."""
    cfg = get_preset("gpt-neox-20b")
    n = 1024
    roof = roofline(cfg, [128] * n, [128] * n, capacity_tokens=int(84e9 / cfg.kv_bytes_per_token),
                    bandwidth=4.3e12, gemm=795e12, weight_bytes=2 * cfg.num_params(),
                    kv_bytes_per_token=cfg.kv_bytes_per_token)
    assert 6000 < roof["output_tok_per_s"] < 8500, roof
