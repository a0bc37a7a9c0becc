"""Model routing through the API: ``/v1/models``, a batch for a model nobody serves waits
(and says why), an unknown name is refused, each model's chunks go to its own queue."""

from __future__ import annotations

import json

import redis

from core.celery_app import model_queue
from store.db import session_scope
from store.queries import register_worker
from store.registry import announce_model, fine_tuned_name, register_fine_tuned
from tests.api.conftest import Api, jsonl, prompts

NDJSON = {"content-type": "application/x-ndjson"}


def _worker(api: Api, wid: str, model: str, dtype: str = "float32", pp: int = 1) -> None:
    with session_scope(api.db) as s:
        register_worker(session=s, worker_id=wid, host="h", pid=1, model=model,
                        devices=["cpu"], pipeline_parallel=pp, checkpoint="preset:tiny",
                        dtype=dtype)
        announce_model(session=s, name=model, checkpoint="preset:tiny")


def _depth(api: Api, model: str) -> int:
    r = redis.Redis.from_url(api.settings.redis_url)
    try:
        return r.llen(api.settings.redis_key_prefix + model_queue(api.settings, model))
    finally:
        r.close()


def test_models_lists_what_live_workers_serve(api: Api) -> None:
    assert api.client.get("/v1/models").json() == {"object": "list", "data": []}
    _worker(api, "w1", "pythia-a", pp=2)
    _worker(api, "w2", "pythia-a", dtype="bfloat16")
    _worker(api, "w3", "pythia-b")
    data = api.client.get("/v1/models").json()["data"]
    assert [(m["id"], m["object"], m["workers"]) for m in data] == [
        ("pythia-a", "model", 2), ("pythia-b", "model", 1)]
    assert data[0]["dtypes"] == ["bfloat16", "float32"] and data[0]["pipeline_parallel"] == [1, 2]
    assert data[0]["checkpoint"] == "preset:tiny" and data[0]["kind"] == "base"
    # every known name, served or not: the default model too
    every = {m["id"]: m["workers"] for m in api.client.get("/v1/models?all=true").json()["data"]}
    assert every == {"pythia-a": 2, "pythia-b": 1, api.settings.model_name: 0}
    assert api.client.get("/v1/models/pythia-b").json()["workers"] == 1
    r = api.client.get("/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_fine_tuned_name_is_resolved_through_the_registry(api: Api) -> None:
    name = fine_tuned_name(base="pythia-a", suffix="poems", job_id="ftjob-abc")
    assert name == "ft:pythia-a:poems:ftjob-abc"
    with session_scope(api.db) as s:
        register_fine_tuned(session=s, name=name, base="pythia-a", checkpoint="/ckpt/x",
                            job_id="ftjob-abc", owner="local")
    m = api.client.get(f"/v1/models/{name}").json()
    assert (m["kind"], m["parent"], m["checkpoint"], m["workers"]) == (
        "fine-tuned", "pythia-a", "/ckpt/x", 0)
    # accepted (known), waiting for a worker
    r = api.client.post("/batches", params={"model": name}, content=jsonl(prompts(3)),
                        headers=NDJSON)
    assert r.status_code == 201, r.text
    assert r.json()["model"] == name and "no" in r.json()["waiting"]
    assert _depth(api, name) == 1 and api.queued() == 0


def test_unserved_model_waits_visibly_then_stops_waiting(api: Api) -> None:
    _worker(api, "w1", "pythia-b")
    r = api.client.post("/batches", params={"model": "pythia-b"}, content=jsonl(prompts(12)),
                        headers=NDJSON)
    assert r.status_code == 201, r.text
    b = r.json()
    assert b["model"] == "pythia-b" and b["waiting"] is None
    assert _depth(api, "pythia-b") >= 1 and api.queued() == 0  # its own queue only
    # The default model: known, but no live worker serves it.
    d = api.client.post("/batches", content=jsonl(prompts(2)), headers=NDJSON).json()
    assert d["model"] == api.settings.model_name
    assert d["waiting"] == (f"waiting for a worker serving model "
                            f"{api.settings.model_name!r} (none is live)")
    assert api.client.get(f"/batches/{d['id']}").json()["waiting"] == d["waiting"]
    listed = {x["id"]: x["waiting"] for x in api.client.get("/batches").json()["data"]}
    assert listed == {b["id"]: None, d["id"]: d["waiting"]}
    assert api.queued() == 1
    _worker(api, "w2", api.settings.model_name)
    assert api.client.get(f"/batches/{d['id']}").json()["waiting"] is None


def test_unknown_model_is_refused(api: Api) -> None:
    r = api.client.post("/batches", params={"model": "no-such-model"},
                        content=jsonl(prompts(2)), headers=NDJSON)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert "unknown model 'no-such-model'" in err["message"]
    assert api.queued() == 0
    # OpenAI lines: the line naming it, with its number; and one model per file.
    _worker(api, "w1", "pythia-b")
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": m, "prompt": "p"}}
             for i, m in enumerate(["pythia-b", "pythia-b", "nope", "gpt-neox-20b"])]
    r = api.client.post("/batches", content="\n".join(map(json.dumps, lines)), headers=NDJSON)
    assert r.status_code == 400, r.text
    errors = [(e["line"], e["code"]) for e in r.json()["error"]["errors"]]
    assert errors == [(3, "mismatched_model"), (4, "mismatched_model")]
    lines[2]["body"]["model"] = lines[3]["body"]["model"] = "pythia-b"
    lines[0]["body"]["model"] = "nope"
    r = api.client.post("/batches", content="\n".join(map(json.dumps, lines)), headers=NDJSON)
    errors = r.json()["error"]["errors"]
    assert (errors[0]["line"], errors[0]["code"]) == (1, "model_not_found")
    assert "known: gpt-neox-20b, pythia-b" in errors[0]["message"]
