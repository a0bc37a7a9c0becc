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
