"""``neoxq jobs create|list|status|events|cancel`` against a live ``neoxq api`` (the
commands run in-process; the server is a subprocess; no trainer: the job stays queued,
tests/trainer runs jobs to the end)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.main import main
from store.db import make_engine, session_scope
from store.jobs import add_checkpoint, add_event
from store.registry import announce_model
from tests.api.live import Live, start_stack


@pytest.fixture
def live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Live]:
    stack = start_stack(tmp_path, worker=False)
    monkeypatch.setenv("NEOXQ_API_URL", stack.url)
    monkeypatch.delenv("NEOXQ_API_KEY", raising=False)
    db = make_engine(stack.env["NEOXQ_DATABASE_URL"])
    with session_scope(db) as s:
        announce_model(session=s, name="base-m", checkpoint="preset:tiny")
    db.dispose()
    yield stack
    stack.stop()


def test_jobs_commands(live: Live, tmp_path: Path, capsys) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f" a{i}"}) + "\n"
                             for i in range(5)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "completion": "a"}\n{"prompt": 3, "completion": "a"}\n')
    assert main(["jobs", "create", "base-m", "--train", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "1 bad line(s)" in err and "line 2: field 'prompt': expected a string" in err

    assert main(["jobs", "create", "nope", "--train", str(train)]) == 1
    assert "unknown base model 'nope'" in capsys.readouterr().err

    assert main(["jobs", "create", "base-m", "--train", str(train), "--suffix", "cli",
                 "--epochs", "2", "--method", "full", "--lora-rank", "4",
                 "--save-every", "10"]) == 0
    job_id = capsys.readouterr().out.strip()
    assert job_id.startswith("ftjob-")
    assert main(["jobs", "status", job_id, "--json"]) == 0
    job = json.loads(capsys.readouterr().out)
    assert job["status"] == "queued" and job["hyperparameters"]["n_epochs"] == 2
    assert job["method"]["neoxq"] == {**job["method"]["neoxq"], "method": "full",
                                      "lora_rank": 4, "save_every": 10}

    # what a trainer writes, shown by status and events
    db = make_engine(live.env["NEOXQ_DATABASE_URL"])
    with session_scope(db) as s:
        add_event(session=s, job_id=job_id, type="metrics", message="Step 1: training "
                  "loss=2.5000", step=1, data={"step": 1, "train_loss": 2.5,
                                               "valid_loss": 2.75})
        add_checkpoint(session=s, job_id=job_id, step=1, metrics={"train_loss": 2.5},
                       path=None)
    db.dispose()
    assert main(["jobs", "status", job_id]) == 0
    out = capsys.readouterr().out
    assert "queued" in out and "step 1: train loss 2.5000, validation loss 2.7500" in out
    assert "checkpoints: 1" in out
    assert main(["jobs", "events", job_id]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "Validating training file" in lines[0] and "Step 1: training loss" in lines[-1]

    assert main(["jobs", "list"]) == 0
    assert job_id in capsys.readouterr().out
    assert main(["jobs", "cancel", job_id]) == 0
    assert f"{job_id}  cancelled" in capsys.readouterr().out
    assert main(["jobs", "cancel", job_id]) == 1
    assert "409" in capsys.readouterr().err
    assert main(["jobs", "status", "ftjob-nope"]) == 1
