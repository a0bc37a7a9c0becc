"""Native batch routes on real SQLite and PostgreSQL with a real Redis queue: submit (raw
and multipart), poll, list, cancel, results and errors streamed in input order."""

from __future__ import annotations

import json

from sqlalchemy import select

from store.tables import Item
from tests.api.conftest import Api, jsonl, prompts, write_results

NDJSON = {"content-type": "application/x-ndjson"}


def submit(api: Api, rows: list, params: dict | None = None, **kw) -> dict:
    r = api.client.post("/batches", params=params or {}, content=jsonl(rows), headers=NDJSON,
                        **kw)
    assert r.status_code == 201, r.text
    return r.json()


def test_submit_raw_stores_items_and_enqueues_chunks(api: Api) -> None:
    b = submit(api, prompts(25), {"max_tokens": 7, "temperature": 0.5, "stop": ["\n", "##"],
                                  "metadata": json.dumps({"team": "nlp"})})
    assert b["status"] == "in_progress" and b["id"].startswith("batch_")
    assert b["counts"] == {"total": 25, "completed": 0, "failed": 0, "pending": 25}
    assert b["defaults"] == {"max_tokens": 7, "temperature": 0.5, "stop": ["\n", "##"]}
    assert b["metadata"] == {"team": "nlp"}
    assert api.queued() == 3  # chunk_items=10: [0,10) [10,20) [20,25)
    with api.db.connect() as conn:
        items = conn.execute(select(Item.index, Item.line_number, Item.custom_id)
                             .where(Item.batch_id == b["id"]).order_by(Item.index)).all()
    assert items[0] == (0, 1, "r0") and items[-1] == (24, 25, "r24")
    g = api.client.get(f"/batches/{b['id']}").json()
    assert g["status"] == "in_progress" and g["progress"] == 0 and g["eta_s"] is None
    assert g["input_file_id"].startswith("file-")


def test_submit_multipart_with_form_defaults(api: Api) -> None:
    r = api.client.post("/batches", files={"file": ("mine.jsonl", jsonl(prompts(3)))},
                        data={"max_tokens": "12", "stop": ["a", "b"], "on_invalid": "record"})
    assert r.status_code == 201, r.text
    assert r.json()["defaults"] == {"max_tokens": 12, "stop": ["a", "b"]}
    assert api.queued() == 1


def test_progress_results_and_errors_in_input_order(api: Api) -> None:
    b = submit(api, prompts(30))
    write_results(api.db, b["id"], upto=12, fail={3})
    g = api.client.get(f"/batches/{b['id']}").json()
    assert g["counts"] == {"total": 30, "completed": 11, "failed": 1, "pending": 18}
    assert g["progress"] == 12 / 30 and g["tokens"]["completion"] == 55
    assert g["tokens_per_s"] > 0 and g["eta_s"] is not None and g["eta_s"] > 0
    partial = [json.loads(x) for x in api.client.get(f"/batches/{b['id']}/results").text
               .splitlines()]
    assert [x["index"] for x in partial] == [i for i in range(12) if i != 3]
    first = partial[0]
    assert first["custom_id"] == "r0" and first["line"] == 1 and first["text"] == " out 0"
    assert first["finish_reason"] == "length"
    assert first["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert set(first["timings"]) >= {"queued_at", "started_at", "first_token_at",
                                     "finished_at", "tokens_per_s", "worker_id", "attempt"}
    errors = [json.loads(x) for x in api.client.get(f"/batches/{b['id']}/errors").text
              .splitlines()]
    assert errors == [{"line": 4, "index": 3, "custom_id": "r3", "param": "max_tokens",
                       "code": "context_length_exceeded",
                       "message": "max_tokens: prompt + max_tokens exceed 2048"}]
    write_results(api.db, b["id"])  # the rest: the batch completes
    g = api.client.get(f"/batches/{b['id']}").json()
    assert g["status"] == "completed" and g["completed_at"] and g["eta_s"] == 0
    lines = api.client.get(f"/batches/{b['id']}/results").text.splitlines()
    assert [json.loads(x)["index"] for x in lines] == [i for i in range(30) if i != 3]


def test_results_stream_many_pages(sqlite_api: Api) -> None:
    b = submit(sqlite_api, prompts(1200))  # more than one 500-row page
    write_results(sqlite_api.db, b["id"])
    with sqlite_api.client.stream("GET", f"/batches/{b['id']}/results") as r:
        indexes = [json.loads(x)["index"] for x in r.iter_lines() if x]
    assert indexes == list(range(1200))


def test_list_batches_paginates_newest_first(api: Api) -> None:
    ids = [submit(api, prompts(1))["id"] for _ in range(5)]
    page = api.client.get("/batches", params={"limit": 2}).json()
    assert [b["id"] for b in page["data"]] == ids[::-1][:2] and page["has_more"]
    seen = [b["id"] for b in page["data"]]
    while page["has_more"]:
        page = api.client.get("/batches", params={"limit": 2, "after": page["last_id"]}).json()
        seen += [b["id"] for b in page["data"]]
    assert seen == ids[::-1]
    assert api.client.get("/batches", params={"limit": 0}).status_code == 400
    assert api.client.get("/batches", params={"after": "batch_nope"}).json()["data"] == []


def test_cancel_without_workers_finishes_and_keeps_results(api: Api) -> None:
    b = submit(api, prompts(20))
    write_results(api.db, b["id"], upto=5)
    c = api.client.post(f"/batches/{b['id']}/cancel").json()
    # No live worker: the API completes the cancel itself.
    assert c["status"] == "cancelled" and c["cancelled_at"] and c["cancelling_at"]
    assert c["counts"]["completed"] == 5
    lines = api.client.get(f"/batches/{b['id']}/results").text.splitlines()
    assert len(lines) == 5
    again = api.client.post(f"/batches/{b['id']}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"


def test_cancel_with_a_live_worker_leaves_it_cancelling(api: Api) -> None:
    from store.db import session_scope
    from store.queries import register_worker

    with session_scope(api.db) as s:
        register_worker(session=s, worker_id="w1", host="h", pid=1, model="m",
                        devices=["cpu"], pipeline_parallel=1)
    b = submit(api, prompts(3))
    assert api.client.post(f"/batches/{b['id']}/cancel").json()["status"] == "cancelling"
    workers = api.client.get("/workers").json()["data"]
    assert [(w["id"], w["model"], w["devices"]) for w in workers] == [("w1", "m", ["cpu"])]


def test_cannot_cancel_a_completed_batch(api: Api) -> None:
    b = submit(api, prompts(2))
    write_results(api.db, b["id"])
    r = api.client.post(f"/batches/{b['id']}/cancel")
    assert r.status_code == 409 and r.json()["error"]["code"] == "batch_not_cancellable"


def test_unknown_batch_is_404_everywhere(api: Api) -> None:
    for method, path in (("GET", "/batches/batch_x"), ("POST", "/batches/batch_x/cancel"),
                         ("GET", "/batches/batch_x/results"), ("GET", "/batches/batch_x/errors")):
        r = api.client.request(method, path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path


def test_health_and_readiness(api_factory) -> None:
    api = api_factory()
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["database"] == "ok"
    down = api_factory(redis_url="redis://127.0.0.1:1/0")
    r = down.client.get("/readyz")
    assert r.status_code == 503 and r.json()["redis"].startswith("unavailable")


def test_queue_down_is_503_and_the_batch_is_failed(sqlite_api_factory) -> None:
    api = sqlite_api_factory(redis_url="redis://127.0.0.1:1/0")
    r = api.client.post("/batches", content=jsonl(prompts(3)), headers=NDJSON)
    assert r.status_code == 503 and r.json()["error"]["code"] == "queue_unavailable"
    page = api.client.get("/batches").json()["data"]
    assert page[0]["status"] == "failed"
    assert page[0]["errors"][0]["code"] == "queue_unavailable"
