"""Fine-tuning jobs end to end, with real processes: ``neoxq api`` under uvicorn, ``neoxq
trainer`` and ``neoxq worker`` subprocesses, real Redis, SQLite and PostgreSQL, a tiny
byte-level model on CPU. The official ``openai`` package drives the API."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI
from sqlalchemy import select

from store.db import make_engine, session_scope
from store.tables import Result
from tests.api.live import Live, fresh_database, start_stack
from tests.train.conftest import byte_model  # noqa: F401 - the fixture
from trainer.job import checkpoint_step

BASE = "tiny-bytes"


def chat_lines(n: int, offset: int = 0) -> str:
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}
            for i in range(offset, offset + n)]
    return "".join(json.dumps(r) + "\n" for r in rows)


def neoxq_method(**options: Any) -> dict[str, Any]:
    return {"type": "supervised",
            "supervised": {"hyperparameters": {"batch_size": 4, "learning_rate_multiplier": 5}},
            "neoxq": {"method": "lora", "lora_rank": 4, "max_length": 128, **options}}


def wait(cond: Callable[[], Any], timeout: float, what: str, live: Live,
         every: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    logs = "\n".join(f"--- {n}\n{live.log(n)[-3000:]}" for n in live.procs)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{logs}")


def rank_processes(job_id: str) -> list[int]:
    """Pids of training ranks of ``job_id`` (their command line names its directory)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"trainer.rank" in cmd and any(job_id.encode() in c for c in cmd):
            pids.append(int(d.name))
    return pids


def rank_pids(job_id: str, live: Live, timeout: float = 90) -> list[int]:
    """Wait for the job's training ranks to start; their pids."""
    return wait(lambda: rank_processes(job_id), timeout, "the training ranks", live)


def freeze_at_checkpoint(job_dir: Path, pids: list[int], above: int, live: Live,
                         timeout: float = 90) -> int:
    """SIGSTOP the ranks ``pids`` as soon as a checkpoint past step ``above`` is complete
    on disk; its step. A tiny model trains dozens of steps a second, so a test that only
    watched the API could find the job finished before it could interrupt it."""
    step = wait(lambda: (n := checkpoint_step(job_dir)) > above and n, timeout,
                f"a checkpoint past step {above}", live, every=0.002)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return step


def signal_pending(pid: int, sig: int) -> bool:
    """Whether ``sig`` waits, undelivered, on process ``pid`` (a stopped one, say), or
    the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    if "State:\tZ" in status:
        return True
    masks = [int(ln.split()[1], 16) for ln in status.splitlines()
             if ln.startswith(("SigPnd:", "ShdPnd:"))]
    return any(m & (1 << (sig - 1)) for m in masks)


@pytest.fixture
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Live]:
    with fresh_database(request.param, tmp_path) as url:
        live = start_stack(tmp_path, worker=False, database_url=url, dead_worker_after="3")
        live.db_url = url  # type: ignore[attr-defined]
        try:
            yield live
        finally:
            live.stop()


def start_trainer(live: Live, name: str) -> Any:
    return live.start(name, "trainer", "--device", "cpu", "--trainer-id", name, "--poll",
                      "0.5", "--out-dir", str(live.logs.parent / "jobs"))


@pytest.mark.slow
@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_openai_client_fine_tunes_then_serves_the_result(stack: Live, byte_model: Path,  # noqa: F811
                                                         tmp_path: Path) -> None:
    live = stack
    client = OpenAI(base_url=live.url + "/v1", api_key="unused-without-keys", max_retries=0)
    # A worker serving the base model records it (and where its files are) in the registry.
    live.start("w-base", "worker", "--model", str(byte_model), "--name", BASE, "--device",
               "cpu", "--worker-id", "w-base", "--concurrency", "2")
    start_trainer(live, "t1")
    (tmp_path / "train.jsonl").write_text(chat_lines(24))
    (tmp_path / "val.jsonl").write_text(chat_lines(8, offset=100))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(chat_lines(2) + '{"messages": []}\n' + chat_lines(1) + "nope\n")
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=bad.open("rb"), purpose="fine-tune")
    body = refused.value.body
    assert [e["line"] for e in body["errors"]] == [3, 5], body
    train = client.files.create(file=(tmp_path / "train.jsonl").open("rb"), purpose="fine-tune")
    val = client.files.create(file=(tmp_path / "val.jsonl").open("rb"), purpose="fine-tune")
    wait(lambda: any(m.id == BASE for m in client.models.list().data), 60, "the base worker",
         live)
    with pytest.raises(openai.BadRequestError, match="unknown base model"):
        client.fine_tuning.jobs.create(model="no-such-base", training_file=train.id)

    job = client.fine_tuning.jobs.create(
        model=BASE, training_file=train.id, validation_file=val.id, suffix="loop", seed=3,
        method=neoxq_method(max_steps=4, save_every=2))  # type: ignore[arg-type]
    assert job.status == "queued" and job.fine_tuned_model is None
    done = wait(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in (
        "succeeded", "failed", "cancelled") and j, 120, "the job to finish", live)
    assert done.status == "succeeded", (done.error, live.log("t1")[-3000:])
    name = f"ft:{BASE}:loop:{job.id}"
    assert done.fine_tuned_model == name and done.finished_at >= done.created_at
    assert done.hyperparameters.n_epochs == 1 and done.hyperparameters.batch_size == 4
    assert done.hyperparameters.learning_rate_multiplier == 5

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=3))  # paged by the SDK
    messages = [e.message for e in events]
    assert "Fine-tuning job started on trainer t1" in messages
    assert f"New fine-tuned model created: {name}" in messages
    assert messages[0] == "The job has successfully completed"
    metrics = sorted((e for e in events if e.type == "metrics"), key=lambda e: e.data["step"])
    assert [e.data["step"] for e in metrics] == [1, 2, 3, 4]
    assert all(e.data["train_loss"] > 0 and e.data["total_steps"] == 4 for e in metrics)
    assert metrics[0].message.startswith("Step 1/4: training loss=")
    assert metrics[-1].data["valid_loss"] > 0  # validation at checkpoints and the end
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [4, 2]
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{name}:ckpt-step-4"
    assert checkpoints[0].metrics.train_loss == metrics[-1].data["train_loss"]
    assert checkpoints[0].metrics.valid_loss == metrics[-1].data["valid_loss"]

    # A cancelled job stops training; cancelling a finished one is a conflict.
    long = client.fine_tuning.jobs.create(model=BASE, training_file=train.id,
                                          method=neoxq_method(max_steps=10_000))  # type: ignore[arg-type]
    wait(lambda: any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(
        long.id, limit=5).data), 60, "the second job to train", live)
    assert client.fine_tuning.jobs.cancel(long.id).status == "cancelled"
    wait(lambda: any(e.message.startswith("Training stopped at step") for e in
                     client.fine_tuning.jobs.list_events(long.id, limit=5).data), 30,
         "the trainer to stop the cancelled job", live)
    assert not rank_processes(long.id)
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.cancel(job.id)
    listed = [j.id for j in client.fine_tuning.jobs.list(limit=1)]  # one page at a time
    assert listed == [long.id, job.id]

    # Serve the result by its name, and run a batch on it next to one on the base model:
    # each batch runs only on the worker of its model.
    live.start("w-ft", "worker", "--model", name, "--device", "cpu", "--worker-id", "w-ft",
               "--concurrency", "2")
    wait(lambda: any(m.id == name and m.workers for m in
                     client.models.list().data), 60, "the fine-tuned worker", live)
    batches = {}
    for model in (name, BASE):
        src = tmp_path / f"batch-{len(batches)}.jsonl"
        src.write_text("".join(json.dumps({
            "custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "max_tokens": 8, "temperature": 0,
                     "messages": [{"role": "user", "content": f"What is {i} plus {i}?"}]}})
            + "\n" for i in range(6)))
        f = client.files.create(file=src.open("rb"), purpose="batch")
        batches[model] = client.batches.create(input_file_id=f.id,
                                               endpoint="/v1/chat/completions",
                                               completion_window="24h")
    db = make_engine(live.db_url)  # type: ignore[attr-defined]
    try:
        for model, worker in ((name, "w-ft"), (BASE, "w-base")):
            b = wait(lambda m=model: (x := client.batches.retrieve(batches[m].id)).status in (
                "completed", "failed") and x, 90, f"the batch on {model}", live)
            assert b.status == "completed" and b.request_counts.completed == 6, b
            out = [json.loads(ln) for ln in
                   client.files.content(b.output_file_id).text.splitlines()]
            assert len(out) == 6 and all(o["response"]["body"]["model"] == model for o in out)
            with session_scope(db) as s:
                workers = set(s.scalars(select(Result.worker_id).where(
                    Result.batch_id == b.id)))
            assert workers == {worker}
    finally:
        db.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("stack", ["postgresql"], indirect=True)
def test_a_stopped_or_killed_trainers_job_resumes_from_its_checkpoint(
        stack: Live, byte_model: Path, tmp_path: Path) -> None:  # noqa: F811
    live = stack
    from store.registry import announce_model

    db = make_engine(live.db_url)  # type: ignore[attr-defined]
    with session_scope(db) as s:  # as a worker serving it would
        announce_model(session=s, name=BASE, checkpoint=str(byte_model))
    db.dispose()
    client = OpenAI(base_url=live.url + "/v1", api_key="unused-without-keys", max_retries=0)
    (tmp_path / "train.jsonl").write_text(chat_lines(40))
    train = client.files.create(file=(tmp_path / "train.jsonl").open("rb"), purpose="fine-tune")
    t1 = start_trainer(live, "t1")
    total = 30
    job = client.fine_tuning.jobs.create(model=BASE, training_file=train.id, suffix="kill",
                                         method=neoxq_method(max_steps=total, save_every=3))  # type: ignore[arg-type]

    def checkpoints() -> list[int]:
        return [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id,
                                                                                  limit=50)]

    job_dir = tmp_path / "jobs" / job.id  # start_trainer's --out-dir
    ranks = rank_pids(job.id, live)
    first = freeze_at_checkpoint(job_dir, ranks, 0, live)
    # SIGTERM: the trainer stops its ranks and hands the job on at once. A rank without a
    # handler of its own dies of the trainer's SIGTERM even while frozen; one with a
    # handler takes it when it is let go.
    t1.terminate()
    wait(lambda: all(signal_pending(p, signal.SIGTERM) for p in ranks), 30,
         "t1 to signal its ranks", live)
    for pid in ranks:
        with contextlib.suppress(ProcessLookupError):  # already dead and reaped
            os.kill(pid, signal.SIGCONT)
    assert t1.wait(timeout=60) == 0
    assert not rank_processes(job.id)
    handed = max(checkpoints())
    assert handed == first
    assert client.fine_tuning.jobs.retrieve(job.id).status == "running"
    t2 = start_trainer(live, "t2")
    ranks = rank_pids(job.id, live)
    on_disk = freeze_at_checkpoint(job_dir, ranks, handed, live)
    wait(lambda: max(checkpoints()) == on_disk, 30, "t2 to record its checkpoint", live)
    # SIGKILL: nothing hands the job on, and the rank dies with its trainer ...
    os.kill(t2.pid, signal.SIGKILL)
    t2.wait()
    wait(lambda: not rank_processes(job.id), 10, "the rank to die with its trainer", live)
    # ... and the job stays running, its lease held by a dead trainer.
    assert client.fine_tuning.jobs.retrieve(job.id).status == "running"
    killed_at = max(checkpoints())
    # Two trainers come up; exactly one takes the job over once the lease is stale.
    start_trainer(live, "t3")
    start_trainer(live, "t4")
    done = wait(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in (
        "succeeded", "failed", "cancelled") and j, 150, "the resumed job to finish", live)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:{BASE}:kill:{job.id}"
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))[::-1]
    messages = [e.message for e in events]
    stopped = [m for m in messages if m.startswith("Trainer t1 stopped")]
    assert len(stopped) == 1 and f"(step {handed})" in stopped[0], messages
    resumes = [m for m in messages if m.startswith("Resuming")]
    assert len(resumes) == 2, resumes
    assert resumes[0].startswith(f"Resuming from the checkpoint at step {handed} on trainer "
                                 "t2 (its trainer stopped)")
    assert "(trainer t2 stopped heart-beating)" in resumes[1]
    assert int(resumes[1].split("step ")[1].split(" ")[0]) == killed_at
    steps = sorted(e.data["step"] for e in events if e.type == "metrics")
    assert steps == list(range(1, total + 1))  # every step once, across the three runs
    ckpts = checkpoints()
    assert ckpts == sorted(ckpts, reverse=True) and ckpts[0] == total
    # A job whose examples do not fit its max_length fails naming their lines (that check
    # needs the model's tokenizer, so the trainer makes it, not the upload).
    failing = client.fine_tuning.jobs.create(model=BASE, training_file=train.id,
                                             method=neoxq_method(max_length=16, max_steps=2))  # type: ignore[arg-type]
    failed = wait(lambda: (j := client.fine_tuning.jobs.retrieve(failing.id)).status in (
        "succeeded", "failed", "cancelled") and j, 120, "the bad job to fail", live)
    assert failed.status == "failed" and failed.error.code == "training_failed"
    assert "40 bad line(s)" in failed.error.message
    assert f"{train.id}:1: " in failed.error.message  # the file's id, not a server path
    assert "longer than max_length 16" in failed.error.message
    assert failed.fine_tuned_model is None
    assert any(e.level == "error" and e.message.startswith("The job failed")
               for e in client.fine_tuning.jobs.list_events(failing.id).data)
