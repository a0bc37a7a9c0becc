"""The structured-output benchmark's CPU mode runs end to end: equal output lengths in
both runs, every stopped JSON valid, the host time per step broken down, and labelled
runs kept side by side in one file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench.structured import main


def test_cpu_mode_writes_labelled_runs(tmp_path: Path) -> None:
    out = tmp_path / "structured.json"
    threads = torch.get_num_threads()
    try:
        for label in ("before", "after"):
            main(["--device", "cpu", "--num-prompts", "6", "--max-tokens", "40",
                  "--max-num-seqs", "8", "--label", label, "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    assert set(data["runs"]) == {"before", "after"}
    run = data["runs"]["after"]
    assert run["model"] == "preset:tiny" and run["machine"]["torch_threads"] == 1
    free, schema = run["unconstrained"], run["json_schema"]
    budget = run["json_schema_same_budget"]
    assert free["output_tokens"] == schema["output_tokens"] == budget["output_tokens"] > 0
    assert schema["stop_invalid"] == budget["stop_invalid"] == 0
    # Per-request seeds: a tighter max_tokens that still leaves room for the EOS gives
    # the same outputs, each ending where the grammar ended it.
    assert budget["finish_reasons"] == schema["finish_reasons"]
    assert run["same_budget_over_unconstrained"] > 0
    for r in (free, schema, budget):
        assert r["steps"] > 0 and r["host_ms_per_step"] > 0
        assert set(r["ms_per_step"]) == {"schedule", "prepare", "forward", "sample", "apply",
                                         "masks", "batch"}
