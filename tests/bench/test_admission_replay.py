"""bench.admission_replay on a small batch: every row finishes every line, and the
constrained prior admits more of a new kind's first wave than projecting the limit."""

from __future__ import annotations

import json
from pathlib import Path

from bench.admission_replay import main


def test_replay_rows(tmp_path: Path) -> None:
    out = tmp_path / "replay.json"
    main(["--num-prompts", "120", "--capacity-tokens", "12000", "--max-num-seqs", "64",
          "--max-batch-tokens", "1024", "--out", str(out)])
    data = json.loads(out.read_text())
    rows = data["rows"]
    prior = f"B_prior_{data['prior_constrained']}"
    assert set(rows) == {"A_exact_unconstrained", "B_prior_none", prior, "B_prior_0.5",
                         "B_all_to_limit_prior_none", f"B_all_to_limit_{prior[2:]}",
                         "B_all_to_limit_prior_0.5"}
    assert rows[prior]["steps"] <= rows["B_prior_0.5"]["steps"]
    assert rows[prior]["steps"] < rows["B_prior_none"]["steps"]
    assert rows[prior]["peak_running"] > rows["B_prior_none"]["peak_running"]
    assert rows["B_prior_none"]["preemptions"] == rows[prior]["preemptions"] == 0
    assert rows[f"B_all_to_limit_{prior[2:]}"]["preemptions"] > 0
    assert rows["B_all_to_limit_prior_none"]["preemptions"] == 0


def test_waves_replay(tmp_path: Path) -> None:
    """--waves with decode-step timings that have a floor (the shape of a GPU's): (a)'s
    40 prompts, 31 of which fit, run as 20 + 20 instead of 31 + 9, modelled faster; every
    workload finishes either way."""
    timings = tmp_path / "timings.json"
    buckets = [1, 2, 4, 8, 16, 24, 32, 48, 64]
    timings.write_text(json.dumps({"commit": "test", "engine": {
        "cache_tokens": 8000, "decode_graph_ms": {str(b): max(3.0, 0.1 * b) for b in buckets},
        "decode_runs_as": {}}}))
    out = tmp_path / "waves.json"
    main(["--waves", str(timings), "--waves-prompts", "40", "--num-prompts", "60",
          "--max-num-seqs", "64", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"a", "b", "c", "structured"}
    for row in rows.values():
        assert row["greedy"]["steps"] > 0 and row["even"]["steps"] > 0
        assert row["even_speedup"] >= 1.0
    a = rows["a"]
    assert [w[0] for w in a["greedy"]["decode_waves"]] == [31, 9]
    assert a["even"]["decode_waves"] == [[20, 254]]  # two waves of 20, 127 steps each
    assert a["even_speedup"] > 1.0
