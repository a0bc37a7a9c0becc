"""OpenAI's fine-tuning routes against a real database (SQLite and PostgreSQL) and Redis:
training files checked at upload, jobs created, listed, paged, cancelled, isolated per
key; the store's job lease. (The trainer running jobs: tests/trainer.)"""

from __future__ import annotations

import json
import time

import redis

from core.training_queue import queue_key
from specs.status import JobStatus
from store.db import session_scope
from store.jobs import (
    add_checkpoint,
    add_event,
    claim_job,
    claimable_jobs,
    finish_job,
    heartbeat,
    release_job,
)
from store.registry import announce_model
from tests.api.conftest import Api, jsonl

CHAT = [{"messages": [{"role": "user", "content": f"hi {i}"},
                      {"role": "assistant", "content": f"hello {i}"}]} for i in range(3)]


def upload(api: Api, body: bytes, headers: dict | None = None, purpose: str = "fine-tune"):
    return api.client.post("/v1/files", files={"file": ("train.jsonl", body)},
                           data={"purpose": purpose}, headers=headers or {})


def base_model(api: Api, name: str = "tiny-base") -> str:
    with session_scope(api.db) as s:
        announce_model(session=s, name=name, checkpoint="preset:tiny")
    return name


def make_job(api: Api, headers: dict | None = None, **body) -> dict:
    f = upload(api, jsonl(CHAT), headers)
    assert f.status_code == 200, f.text
    r = api.client.post("/v1/fine_tuning/jobs", headers=headers or {},
                        json={"model": base_model(api), "training_file": f.json()["id"],
                              **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_upload_checks_every_line_and_names_the_bad_ones(sqlite_api: Api) -> None:
    good = upload(sqlite_api, jsonl(CHAT))
    assert good.status_code == 200 and good.json()["purpose"] == "fine-tune"
    lines = [CHAT[0], b"{not json", {"messages": [{"role": "robot", "content": "x"}]},
             CHAT[1], {"prompt": "p", "completion": "c"}, b"", {"text": 3}, CHAT[2]]
    r = upload(sqlite_api, jsonl(lines))
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "invalid_training_file"
    assert [e["line"] for e in err["errors"]] == [2, 3, 5, 7]
    assert "lines 2, 3, 5, 7" in err["message"]
    messages = [e["message"] for e in err["errors"]]
    assert "not valid JSON" in messages[0]
    assert "messages[0]'.role" in messages[1]
    assert "a prompt_completion line in a chat file" in messages[2]
    # the refused upload is not kept
    assert [f["id"] for f in sqlite_api.client.get("/v1/files").json()["data"]] == [
        good.json()["id"]]
    blank = upload(sqlite_api, b"\n\n")
    assert blank.status_code == 400 and "no training examples" in blank.json()["error"]["message"]
    # batch files are not checked as training data
    assert upload(sqlite_api, jsonl([{"prompt": "x"}]), purpose="batch").status_code == 200
    bad_purpose = upload(sqlite_api, jsonl(CHAT), purpose="fine_tune")
    assert bad_purpose.status_code == 400 and bad_purpose.json()["error"]["param"] == "purpose"


def test_create_list_page_retrieve_cancel(api: Api) -> None:
    job = make_job(api, suffix="demo", seed=7, method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}},
        "neoxq": {"method": "full", "save_every": 5}})
    assert job["object"] == "fine_tuning.job" and job["status"] == "queued"
    assert job["seed"] == 7 and job["user_provided_suffix"] == "demo"
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": "auto",
                                      "learning_rate_multiplier": "auto"}
    assert job["method"]["neoxq"]["method"] == "full"
    assert job["method"]["neoxq"]["save_every"] == 5
    assert job["fine_tuned_model"] is None
    # queued jobs are announced on the training queue
    r = redis.Redis.from_url(api.settings.redis_url)
    try:
        assert r.lrange(queue_key(api.settings), 0, -1) == [job["id"].encode()]
    finally:
        r.close()
    events = api.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    assert [e["message"] for e in events][0] == "Files validated, moving job to queued state"
    assert all(e["object"] == "fine_tuning.job.event" for e in events)

    ids = [job["id"]]
    for _ in range(4):
        time.sleep(0.002)
        ids.append(make_job(api)["id"])
    page1 = api.client.get("/v1/fine_tuning/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page1["data"]] == ids[::-1][:2] and page1["has_more"]
    page2 = api.client.get("/v1/fine_tuning/jobs",
                           params={"limit": 3, "after": page1["data"][-1]["id"]}).json()
    assert [j["id"] for j in page2["data"]] == ids[::-1][2:] and not page2["has_more"]
    assert api.client.get(f"/v1/fine_tuning/jobs/{ids[1]}").json()["id"] == ids[1]

    cancelled = api.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["finished_at"] is not None
    again = api.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_not_cancellable"
    events = api.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events",
                            params={"limit": 1}).json()
    assert events["data"][0]["message"] == "Fine-tuning job cancelled" and events["has_more"]
    older = api.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events",
                           params={"after": events["data"][0]["id"]}).json()["data"]
    assert older[0]["message"].startswith("Files validated")
    assert api.client.get("/metrics").text.count(
        'neoxq_fine_tuning_jobs{status="queued"} 4.0') == 1


def test_bad_jobs_are_refused_clearly(api: Api) -> None:
    f = upload(api, jsonl(CHAT)).json()["id"]
    batch_file = upload(api, jsonl([{"prompt": "x"}]), purpose="batch").json()["id"]
    base = base_model(api)

    def create(**body):
        return api.client.post("/v1/fine_tuning/jobs", json={"training_file": f,
                                                             "model": base, **body})

    unknown = create(model="no-such-model")
    assert unknown.status_code == 400
    assert unknown.json()["error"]["code"] == "model_not_found"
    assert "unknown base model 'no-such-model'" in unknown.json()["error"]["message"]
    # the deployment's default name is known, but no worker recorded what to load for it
    untrainable = create(model=api.settings.model_name)
    assert untrainable.status_code == 400
    assert untrainable.json()["error"]["code"] == "model_not_trainable"
    missing = create(training_file="file-nope")
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "training_file"
    wrong = create(training_file=batch_file)
    assert wrong.status_code == 400 and "purpose 'fine-tune'" in wrong.json()["error"]["message"]
    assert create(validation_file=batch_file).json()["error"]["param"] == "validation_file"
    assert create(suffix="a:b").status_code == 400
    assert create(method={"type": "dpo"}).status_code == 400
    assert create(method={"type": "supervised", "neoxq": {"method": "qlora"}}).status_code == 400
    assert create(method={"type": "supervised", "neoxq": {"lora_rank": 0}}).status_code == 400
    assert create(integrations=[{"type": "wandb"}]).status_code == 400
    assert api.client.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_another_keys_job_is_not_found(api: Api) -> None:
    a = {"Authorization": f"Bearer {api.key('a')}"}
    b = {"Authorization": f"Bearer {api.key('b')}"}
    job = make_job(api, headers=a)
    for method, path in (("get", ""), ("post", "/cancel"), ("get", "/events"),
                         ("get", "/checkpoints")):
        r = getattr(api.client, method)(f"/v1/fine_tuning/jobs/{job['id']}{path}", headers=b)
        assert r.status_code == 404, (path, r.text)
        assert getattr(api.client, method)(
            f"/v1/fine_tuning/jobs/{job['id']}{path}", headers=a).status_code == 200
    assert api.client.get("/v1/fine_tuning/jobs", headers=b).json()["data"] == []
    # b cannot train on a's file either
    r = api.client.post("/v1/fine_tuning/jobs", headers=b,
                        json={"model": "tiny-base", "training_file": job["training_file"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "training_file"


def test_lease_one_holder_takeover_after_silence(api: Api) -> None:
    """The store's job lease: one winner, a live holder keeps it, a silent one loses it
    to another trainer, a cancelled job stops its holder, only the holder finishes it."""
    job = make_job(api)
    jid = job["id"]
    with session_scope(api.db) as s:
        assert claimable_jobs(session=s, dead_after=30) == [jid]
        first = claim_job(session=s, job_id=jid, trainer_id="t1", dead_after=30, out_dir="/o")
        assert first is not None and not first.resumed and first.previous is None
        assert first.job.status == JobStatus.RUNNING and first.job.attempts == 1
        # a live holder keeps it
        assert claim_job(session=s, job_id=jid, trainer_id="t2", dead_after=30,
                         out_dir="/x") is None
        assert claimable_jobs(session=s, dead_after=30) == []
        assert heartbeat(session=s, job_id=jid, trainer_id="t1")
        assert not heartbeat(session=s, job_id=jid, trainer_id="t2")
    time.sleep(0.3)
    with session_scope(api.db) as s:
        # t1 went silent for longer than dead_after: t2 takes it over, keeping out_dir
        assert claimable_jobs(session=s, dead_after=0.2) == [jid]
        second = claim_job(session=s, job_id=jid, trainer_id="t2", dead_after=0.2,
                           out_dir="/x")
        assert second is not None and second.resumed and second.previous == "t1"
        assert second.job.out_dir == "/o" and second.job.attempts == 2
        assert not heartbeat(session=s, job_id=jid, trainer_id="t1")  # t1 must stop
        assert not finish_job(session=s, job_id=jid, trainer_id="t1",
                              status=JobStatus.SUCCEEDED)
        # a clean stop hands it to the next trainer at once
        assert release_job(session=s, job_id=jid, trainer_id="t2")
        assert claimable_jobs(session=s, dead_after=30) == [jid]
        third = claim_job(session=s, job_id=jid, trainer_id="t3", dead_after=30, out_dir="/y")
        assert third is not None and third.previous is None and third.resumed
        add_event(session=s, job_id=jid, type="metrics", message="step 1", step=1,
                  data={"step": 1, "train_loss": 2.5})
        add_checkpoint(session=s, job_id=jid, step=1, metrics={"train_loss": 2.5},
                       path="/o/checkpoints/step1")
        assert add_checkpoint(session=s, job_id=jid, step=1, metrics={}, path=None) is None
    ck = api.client.get(f"/v1/fine_tuning/jobs/{jid}/checkpoints").json()["data"]
    assert ck[0]["step_number"] == 1 and ck[0]["metrics"]["train_loss"] == 2.5
    assert ck[0]["fine_tuned_model_checkpoint"] == f"ft:tiny-base::{jid}:ckpt-step-1"
    metrics = [e for e in api.client.get(f"/v1/fine_tuning/jobs/{jid}/events").json()["data"]
               if e["type"] == "metrics"]
    assert metrics[0]["data"] == {"step": 1, "train_loss": 2.5}
    assert api.client.post(f"/v1/fine_tuning/jobs/{jid}/cancel").status_code == 200
    with session_scope(api.db) as s:
        assert not heartbeat(session=s, job_id=jid, trainer_id="t3")  # cancelled: stop
        assert not finish_job(session=s, job_id=jid, trainer_id="t3",
                              status=JobStatus.SUCCEEDED, fine_tuned_model="ft:x")
    assert api.client.get(f"/v1/fine_tuning/jobs/{jid}").json()["status"] == "cancelled"


def test_race_for_a_queued_job_has_one_winner(api: Api) -> None:
    import threading

    jid = make_job(api)["id"]
    wins: list[str] = []

    def grab(name: str) -> None:
        with session_scope(api.db) as s:
            if claim_job(session=s, job_id=jid, trainer_id=name, dead_after=30, out_dir="/o"):
                wins.append(name)

    threads = [threading.Thread(target=grab, args=(f"t{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1, wins
    body = api.client.get(f"/v1/fine_tuning/jobs/{jid}").json()
    assert body["status"] == "running"
    assert json.dumps(body)  # renders while running


def test_dashboard_lists_jobs_with_their_loss_curves(api: Api) -> None:
    job = make_job(api)
    with session_scope(api.db) as s:
        for step in range(1, 501):
            add_event(session=s, job_id=job["id"], type="metrics", message=f"step {step}",
                      step=step, data={"step": step, "train_loss": 5.0 - step / 200,
                                       "valid_loss": 4.0 if step % 100 == 0 else None})
    other = make_job(api)
    body = api.client.get("/dashboard/api/jobs").json()
    assert [j["id"] for j in body["jobs"]] == [other["id"], job["id"]]
    j = body["jobs"][1]
    assert (j["step"], j["train_loss"], j["valid_loss"]) == (500, 2.5, 4.0)
    curve = j["curve"]
    # thinned to about 200 points, keeping the last and every validation point
    assert 200 <= len(curve) <= 206 and curve[-1]["step"] == 500
    assert [p["step"] for p in curve if p["valid_loss"] is not None] == [100, 200, 300, 400, 500]
    assert body["jobs"][0]["curve"] == [] and body["jobs"][0]["step"] is None
