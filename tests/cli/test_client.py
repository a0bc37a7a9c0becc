"""``neoxq submit|status|results|errors|cancel|batches`` against a live ``neoxq api`` and a
real tiny-model worker (the commands run in-process; the server and worker are
subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.main import main
from tests.api.live import ROOT, Live, start_stack


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    stack = start_stack(tmp_path_factory.mktemp("live_cli"), worker=True)
    yield stack
    stack.stop()


@pytest.fixture
def env(live: Live, monkeypatch: pytest.MonkeyPatch) -> Live:
    monkeypatch.setenv("NEOXQ_API_URL", live.url)
    monkeypatch.delenv("NEOXQ_API_KEY", raising=False)
    return live


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_submit_wait_writes_results_in_order(env: Live, tmp_path: Path, capsys) -> None:
    src = write(tmp_path / "in.jsonl", [{"custom_id": f"c{i}", "prompt": f"Say {i}"}
                                        for i in range(12)])
    out = tmp_path / "out.jsonl"
    rc = main(["submit", str(src), "--wait", "-o", str(out), "--max-tokens", "5",
               "--temperature", "0", "--metadata", "who=cli", "--poll", "0.2"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    batch_id = captured.out.strip().splitlines()[0]
    assert batch_id.startswith("batch_")
    assert "tok/s" in captured.err and "ETA" in captured.err and "12/12" in captured.err
    assert "completed: wrote 12 results" in captured.err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["custom_id"] for r in rows] == [f"c{i}" for i in range(12)]
    assert all(r["usage"]["completion_tokens"] == 5 for r in rows)

    assert main(["status", batch_id]) == 0
    text = capsys.readouterr().out
    assert batch_id in text and "completed" in text and "12/12 done" in text
    assert "tok/s over the run" in text  # a finished batch shows its average, not 0.0
    assert main(["status", batch_id, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["metadata"] == {"who": "cli"} and status["defaults"]["max_tokens"] == 5
    assert main(["results", batch_id]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 12
    assert main(["batches"]) == 0
    assert batch_id in capsys.readouterr().out
    assert main(["status"]) == 0  # without an id: the recent batches
    assert batch_id in capsys.readouterr().out
    assert main(["workers"]) == 0
    assert "w-live" in capsys.readouterr().out


def test_errors_and_refusals(env: Live, tmp_path: Path, capsys) -> None:
    bad = write(tmp_path / "bad.jsonl", [{"prompt": "a"}, "{nope", {"prompt": "b", "top_p": 9}])
    assert main(["submit", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "line 2: invalid JSON" in err and "line 3: top_p" in err

    out = tmp_path / "r.jsonl"
    rc = main(["submit", str(bad), "--on-invalid", "record", "--wait", "-o", str(out),
               "--max-tokens", "3", "--poll", "0.2"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    batch_id = captured.out.strip().splitlines()[0]
    assert "2 failed" in captured.err and f"neoxq errors {batch_id}" in captured.err
    assert len(out.read_text().splitlines()) == 1
    assert main(["errors", batch_id]) == 0
    errors = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(e["line"], e["code"]) for e in errors] == [(2, "invalid_json_line"),
                                                        (3, "invalid_value")]
    assert main(["status", "batch_nope"]) == 1
    assert "No batch found" in capsys.readouterr().err
    assert main(["submit", str(tmp_path / "missing.jsonl")]) == 1


def test_cancel(env: Live, tmp_path: Path, capsys) -> None:
    src = write(tmp_path / "long.jsonl", [{"prompt": f"Long {i}", "max_tokens": 400,
                                           "ignore_eos": True} for i in range(150)])
    assert main(["submit", str(src)]) == 0
    batch_id = capsys.readouterr().out.strip()
    assert main(["cancel", batch_id]) == 0
    out = capsys.readouterr().out
    assert batch_id in out and ("cancelling" in out or "cancelled" in out)


def test_submit_plain_text_with_prompts_and_line_numbers(env: Live, tmp_path: Path,
                                                         capsys) -> None:
    src = tmp_path / "prompts.txt"
    src.write_text('First prompt\n\n{"not": "json object line one"} is text here\nLast\n')
    out = tmp_path / "out.jsonl"
    rc = main(["submit", str(src), "--wait", "-o", str(out), "--max-tokens", "2",
               "--include-prompt", "--poll", "0.2"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "prompts.txt: plain text, one prompt per line" in captured.err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["line"], r["prompt"]) for r in rows] == [
        (1, "First prompt"), (3, '{"not": "json object line one"} is text here'), (4, "Last")]
    # OpenAI Batch lines get their body's prompt
    oa = write(tmp_path / "oa.jsonl", [{"custom_id": "a", "method": "POST",
                                        "url": "/v1/completions",
                                        "body": {"model": "gpt-neox-20b", "prompt": "Hi there",
                                                 "max_tokens": 2}}])
    assert main(["submit", str(oa), "--wait", "-o", str(out), "--include-prompt",
                 "--poll", "0.2"]) == 0
    capsys.readouterr()
    [row] = [json.loads(x) for x in out.read_text().splitlines()]
    assert row["custom_id"] == "a" and row["prompt"] == "Hi there"
    # A .jsonl file is JSONL even when its first line is broken: refused, not run as text.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"\n')
    assert main(["submit", str(bad)]) == 1
    assert "invalid JSON" in capsys.readouterr().err
    assert main(["submit", str(src), "--include-prompt"]) == 2
    assert "--include-prompt needs --wait" in capsys.readouterr().err


def test_results_into_a_closed_pipe(env: Live, tmp_path: Path, capsys) -> None:
    # More than a pipe's 64 KiB buffer, so the writer is still writing when head exits.
    src = write(tmp_path / "many.jsonl", [{"prompt": f"p{i}"} for i in range(400)])
    assert main(["submit", str(src), "--wait", "-o", str(tmp_path / "o.jsonl"),
                 "--max-tokens", "2", "--poll", "0.2"]) == 0
    assert (tmp_path / "o.jsonl").stat().st_size > 1 << 17
    batch_id = capsys.readouterr().out.strip().splitlines()[0]
    proc = subprocess.run(f"{sys.executable} -m cli.main results {batch_id} | head -1",
                          shell=True, cwd=ROOT, env=dict(env.env, NEOXQ_API_URL=env.url),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 1
    assert proc.stderr == ""  # no BrokenPipeError traceback


def test_live_rate_and_eta_while_generating(env: Live, tmp_path: Path, capsys) -> None:
    # Long generations: nothing finishes for a while, yet the rate is there at once,
    # because workers count tokens as they generate them.
    import time

    import httpx

    src = write(tmp_path / "slow.jsonl", [{"prompt": f"p{i}", "max_tokens": 300,
                                           "ignore_eos": True} for i in range(6)])
    assert main(["submit", str(src)]) == 0
    batch_id = capsys.readouterr().out.strip()
    seen = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        b = httpx.get(f"{env.url}/batches/{batch_id}").json()
        if b["tokens_per_s"] > 0 and b["counts"]["completed"] == 0:
            seen = b
            break
        time.sleep(0.2)
    assert seen is not None, "no live rate before the first item finished"
    assert seen["eta_s"] is not None and seen["eta_s"] > 0
    # every place shows the same workers' figure
    workers = httpx.get(f"{env.url}/workers").json()["data"]
    metrics = httpx.get(f"{env.url}/metrics").text
    gauge = [float(line.split()[-1]) for line in metrics.splitlines()
             if line.startswith("neoxq_tokens_per_second")]
    assert sum(w["tokens_per_s"] for w in workers) > 0 and gauge and gauge[0] > 0
    assert main(["cancel", batch_id]) == 0
    capsys.readouterr()


def test_unreachable_server(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("NEOXQ_API_URL", "http://127.0.0.1:9")
    assert main(["batches"]) == 2
    assert "cannot reach the API at http://127.0.0.1:9" in capsys.readouterr().err


def test_models_and_submit_to_a_model(env: Live, tmp_path: Path, capsys) -> None:
    # The live worker serves the default name once it has loaded.
    deadline = time.monotonic() + 120
    while not (main(["models"]) == 0 and "gpt-neox-20b" in capsys.readouterr().out):
        assert time.monotonic() < deadline, "the worker's model never showed in neoxq models"
        time.sleep(0.5)
    assert main(["models", "--all"]) == 0
    row = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("gpt-neox-20b")]
    assert row and row[0].split()[1:3] == ["base", "1"]
    src = write(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    assert main(["submit", str(src), "--model", "no-such-model"]) == 1
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert main(["submit", str(src), "--model", "gpt-neox-20b", "--wait", "--max-tokens",
                 "2", "-o", str(tmp_path / "o.jsonl"), "--poll", "0.2"]) == 0


def test_api_key_from_flag_and_environment(env: Live, tmp_path: Path, capsys,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Last in this module: once a key exists, the server requires one.
    key = subprocess.run([sys.executable, "-m", "cli.main", "keys", "create", "cli"],
                         cwd=ROOT, env=env.env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert main(["batches"]) == 1
    assert "Missing API key" in capsys.readouterr().err
    assert main(["batches", "--api-key", key]) == 0
    assert "(more" not in capsys.readouterr().out  # this key owns no batch yet
    monkeypatch.setenv("NEOXQ_API_KEY", key)
    src = write(tmp_path / "k.jsonl", [{"prompt": "hi"}])
    assert main(["submit", str(src), "--max-tokens", "2"]) == 0
    batch_id = capsys.readouterr().out.strip()
    assert main(["status", batch_id]) == 0
    listed = subprocess.run([sys.executable, "-m", "cli.main", "keys", "list"], cwd=ROOT,
                            env=env.env, capture_output=True, text=True, check=True).stdout
    assert "cli" in listed and "active" in listed and key not in listed
    kid = listed.splitlines()[1].split()[0]
    subprocess.run([sys.executable, "-m", "cli.main", "keys", "revoke", kid], cwd=ROOT,
                   env=env.env, check=True, capture_output=True)
    assert main(["status", batch_id]) == 1
    assert "revoked" in capsys.readouterr().err
