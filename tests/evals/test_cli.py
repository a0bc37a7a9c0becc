"""``neoxq evaluate`` end to end, and lm-eval's own CLI with ``--model neoxq``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import assets
from cli.main import main

ROOT = Path(__file__).resolve().parents[2]


def test_evaluate_prints_table_writes_json(
    tiny_hf_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "results.json"
    rc = main(["evaluate", str(tiny_hf_dir), "--tasks", "lambada,piqa", "--data-dir",
               str(data_dir), "--limit", "8", "--batch-size", "5", "--bootstrap-iters", "1000",
               "-o", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    table = captured.out
    for word in ("lambada_openai", "piqa", "acc", "ppl", "acc_norm", "±", "Stderr"):
        assert word in table
    assert "scoring requests" in captured.err  # the progress bar, on stderr
    report = json.loads(out.read_text())
    assert report["n_samples"] == {"lambada_openai": 8, "piqa": 8}
    assert set(report["results"]["lambada_openai"]) == {
        "acc", "acc_stderr", "perplexity", "perplexity_stderr"}
    assert set(report["results"]["piqa"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert report["n_requests"] == 8 + 2 * 8
    assert report["timing"]["requests_per_s"] > 0


def test_missing_data_file_named_before_loading_model(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rc = main(["evaluate", "preset:does-not-matter", "--tasks", "piqa", "--data-dir",
               str(tmp_path)])
    assert rc == 2
    assert f"{tmp_path}/piqa/valid.jsonl: PIQA validation file not found" in capsys.readouterr().err


def test_malformed_line_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "lambada_test.jsonl").write_text('{"text": "a b"}\n{"text": "c d"\n')
    rc = main(["evaluate", "preset:tiny", "--tasks", "lambada", "--data-dir", str(tmp_path)])
    assert rc == 2
    assert "lambada_test.jsonl:2: not valid JSON" in capsys.readouterr().err


def test_bundled_data_without_data_dir(tmp_path: Path) -> None:
    # A fresh install evaluates with nothing but the model spec: the data ships with neoxq.
    out = tmp_path / "results.json"
    rc = main(["evaluate", "preset:tiny", "--tasks", "lambada,piqa", "--limit", "3",
               "--bootstrap-iters", "0", "--no-progress", "-o", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["config"]["data_dir"] == str(assets.DATA_DIR)
    assert report["n_samples"] == {"lambada_openai": 3, "piqa": 3}


def test_lm_eval_cli_with_neoxq_model(tiny_hf_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    """``python -m evals`` is lm-eval's CLI with ``neoxq`` registered; the YAML tasks in
    evals/lm_tasks read --data-dir through --metadata and touch no network."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "DISABLE_MULTIPROC": "1"}
    cmd = [
        sys.executable, "-m", "evals", "--model", "neoxq",
        "--model_args", f"model={tiny_hf_dir},device=cpu,dtype=float32",
        "--tasks", "lambada_openai_local,piqa_local", "--include_path", "evals/lm_tasks",
        "--metadata", json.dumps({"data_dir": str(data_dir)}), "--limit", "4",
        "--batch_size", "8", "--output_path", str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lambada_openai_local" in proc.stdout and "piqa_local" in proc.stdout
    assert "perplexity" in proc.stdout and "acc_norm" in proc.stdout
