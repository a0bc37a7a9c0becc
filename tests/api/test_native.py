"""Native batch routes on real SQLite and PostgreSQL with a real Redis queue: submit (raw
and multipart), poll, list, cancel, results and errors streamed in input order."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from store.db import session_scope
from store.queries import heartbeat, register_worker
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
    # No worker generates for it: no rate, no ETA (finished results alone say nothing of now).
    assert g["tokens_per_s"] == 0 and g["eta_s"] is None
    # Two live workers report what they generate for it, in-flight tokens included.
    with session_scope(api.db) as s:
        for w, rate, inflight in (("w1", 20.0, 6), ("w2", 5.0, 4)):
            figures = {"tokens_per_s": rate, "inflight_tokens": inflight, "inflight_items": 1,
                       "inflight_budget": 64}
            register_worker(session=s, worker_id=w, host="h", pid=1, model="m",
                            devices=["cpu"], pipeline_parallel=1)
            heartbeat(session=s, worker_id=w, status="busy", tokens_per_s=rate + 1,
                      items_done=0, tokens_done=0,
                      batch_rates={b["id"]: figures,
                                   "batch_other": {"tokens_per_s": 1.0, "inflight_tokens": 0}})
    g = api.client.get(f"/batches/{b['id']}").json()
    assert g["tokens_per_s"] == 25.0
    # 18 pending items x 5 tokens per item so far, less 10 in flight, at 25 tok/s
    assert g["eta_s"] == pytest.approx((18 * 5 - 10) / 25, abs=0.05)
    assert g["items_per_s"] == pytest.approx(25 / 5)
    listed = api.client.get("/batches").json()["data"][0]
    assert (listed["tokens_per_s"], listed["eta_s"]) == (g["tokens_per_s"], g["eta_s"])
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
    # finished: the whole run's average, not 0.0
    run = g["finalizing_at"] - g["in_progress_at"]  # the last result came in at finalizing
    assert g["tokens_per_s"] == pytest.approx(g["tokens"]["completion"] / run, rel=1e-3)
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


def test_eta_before_any_item_finished_uses_the_items_own_max_tokens() -> None:
    from api.render import batch_rates
    from store.tables import Batch

    b = Batch(id="batch_x", status="in_progress", request_total=8, request_completed=0,
              request_failed=0, completion_tokens=0, defaults={})
    # 6 items of max_tokens 300 in flight, 600 tokens generated so far, 100 tok/s
    rate, items_per_s, eta = batch_rates(b, tokens_per_s=100.0, inflight_tokens=600,
                                         inflight_items=6, inflight_budget=1800)
    assert (rate, items_per_s) == (100.0, pytest.approx(100 / 300))
    assert eta == pytest.approx((8 * 300 - 600) / 100)
    # nothing in flight and nothing finished: the batch's own max_tokens (default 64)
    assert batch_rates(b, tokens_per_s=32.0)[2] == pytest.approx(8 * 64 / 32)
    assert batch_rates(b)[2] is None  # nobody generating: unknown, not "0:00"
