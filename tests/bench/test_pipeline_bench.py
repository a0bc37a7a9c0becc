"""bench.pipeline's CPU smoke run: the one-GPU engine and a 2-stage pipeline through the
same measuring loop (bench.throughput.run_ours), each with its time by step kind."""

from __future__ import annotations

import json
from pathlib import Path

from bench.pipeline import main


def test_pipeline_bench_small_run(tmp_path: Path) -> None:
    out = tmp_path / "pp.json"
    main(["--model", "preset:tiny", "--device", "cpu", "--stages", "1", "2",
          "--num-prompts", "12", "--out", str(out)])
    runs = json.loads(out.read_text())["runs"]
    for n in ("1", "2"):
        run = runs[n]["run"]
        assert run["output_tokens"] == 12 * 128 and run["output_tok_per_s"] > 0
        st = run["step_times"]
        assert st["decode"]["steps"] + st["mixed"]["steps"] == run["engine_stats"]["steps"]
