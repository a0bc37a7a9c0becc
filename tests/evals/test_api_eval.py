"""``neoxq evaluate --api``: LAMBADA and PIQA scored through a running neoxq (batch lines
with echo + logprobs, run by a real worker on the tiny model) give the local path's
metrics on the same model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import assets
from cli.main import main
from tests.api.live import start_stack


def test_api_metrics_equal_local(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tok = str(assets.TOKENIZER)
    common = ["--tasks", "lambada,piqa", "--limit", "24", "--bootstrap-iters", "1000",
              "--tokenizer", tok, "--no-progress"]
    local_out, api_out = tmp_path / "local.json", tmp_path / "api.json"
    assert main(["evaluate", "preset:tiny", *common, "-o", str(local_out)]) == 0
    stack = start_stack(tmp_path / "stack", worker=False)
    try:
        stack.start("worker", "worker", "--model", "preset:tiny", "--device", "cpu",
                    "--tokenizer", tok, "--worker-id", "w-eval", "--concurrency", "2")
        rc = main(["evaluate", "--api", stack.url, "--max-length", "512", *common,
                   "-o", str(api_out)])
        assert rc == 0, capsys.readouterr().err + stack.log("worker")[-3000:]
    finally:
        stack.stop()
    local = json.loads(local_out.read_text())["results"]
    api = json.loads(api_out.read_text())
    assert api["n_samples"] == {"lambada_openai": 24, "piqa": 24}
    assert len(api["config"]["batches"]) == 1  # one batch file: the fleet shares it
    res = api["results"]
    assert res["lambada_openai"]["acc"] == local["lambada_openai"]["acc"]
    assert res["piqa"]["acc"] == local["piqa"]["acc"]
    assert res["piqa"]["acc_norm"] == local["piqa"]["acc_norm"]
    assert res["lambada_openai"]["perplexity"] == pytest.approx(
        local["lambada_openai"]["perplexity"], rel=1e-4)
    assert "lambada_openai" in capsys.readouterr().out


def test_api_refuses_lm_eval_tasks(capsys: pytest.CaptureFixture) -> None:
    assert main(["evaluate", "--api", "http://127.0.0.1:9", "--tasks", "hellaswag"]) == 2
    assert "--api runs lambada and piqa only" in capsys.readouterr().err
