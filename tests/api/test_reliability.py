"""Hostile inputs and crash leftovers through the real API, on SQLite and PostgreSQL:
each answer is a 4xx naming what is wrong (never a 500), nothing is queued or kept for a
refused request, no batch is left in a state nothing will move it out of, and the
sweeper settles what a crash leaves behind."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import redis
from sqlalchemy import func, select, update

from api.sweeper import sweep, sweep_uploads
from api.uploads import upload_paths
from specs.status import ACTIVE, TERMINAL
from store.db import session_scope
from store.queries import register_worker
from store.tables import Batch, File, Item, Worker
from tests.api.conftest import Api, jsonl, prompts, write_results

NDJSON = {"content-type": "application/x-ndjson"}
LISTINGS = ("/batches", "/v1/batches", "/dashboard/api/overview")


def _count(api: Api, table) -> int:
    with session_scope(api.db) as s:
        return s.scalar(select(func.count()).select_from(table)) or 0


def _files_on_disk(api: Api) -> list[Path]:
    d = api.settings.files_dir
    return sorted(d.iterdir()) if d.exists() else []


def _no_stuck_batches(api: Api) -> None:
    with session_scope(api.db) as s:
        statuses = set(s.scalars(select(Batch.status)))
    assert statuses <= TERMINAL | {"in_progress"}, statuses


def _listings_work(api: Api) -> None:
    for url in LISTINGS:
        r = api.client.get(url)
        assert r.status_code in (200, 404), (url, r.status_code, r.text[:300])
        assert r.status_code != 500


def test_lone_surrogate_metadata_is_400_before_anything_is_queued(api: Api) -> None:
    r = api.client.post("/batches", params={"metadata": '{"a": "\\ud800"}'},
                        content=jsonl(prompts(2)), headers=NDJSON)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "metadata.a"
    assert "surrogate" in r.json()["error"]["message"]
    fid = api.client.post("/v1/files", files={"file": ("in.jsonl", jsonl([
        {"custom_id": "a", "method": "POST", "url": "/v1/completions",
         "body": {"model": "m", "prompt": "p"}}]))}, data={"purpose": "batch"}).json()["id"]
    for meta in ('{"a": "\\ud800"}', '{"\\udfff": "b"}', '{"a": "x\\u0000"}'):
        body = ('{"input_file_id": "' + fid + '", "endpoint": "/v1/completions", '
                '"completion_window": "24h", "metadata": ' + meta + '}')
        r = api.client.post("/v1/batches", content=body.encode(),
                            headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
    body = ('{"input_file_id": "file-\\ud800", "endpoint": "/v1/completions", '
            '"completion_window": "24h"}')
    assert api.client.post("/v1/batches", content=body.encode(),
                           headers={"content-type": "application/json"}).status_code == 400
    assert api.queued() == 0 and _count(api, Batch) == 0
    _listings_work(api)


def test_bad_text_in_lines_names_line_field_and_custom_id(api: Api) -> None:
    cases = [
        (b'{"prompt": "a\\ud800b", "custom_id": "x1"}', "prompt", "x1"),
        (b'{"prompt": "ok", "custom_id": "x\\udc00"}', "custom_id", None),
        (b'{"prompt": "nul \\u0000 here", "custom_id": "x3"}', "prompt", "x3"),
        (b'{"custom_id": "x4", "method": "POST", "url": "/v1/completions", '
         b'"body": {"model": "m\\ud83d", "prompt": "p"}}', "body.model", "x4"),
    ]
    for line, param, cid in cases:
        r = api.client.post("/batches", content=jsonl(prompts(2)) + line + b"\n",
                            headers=NDJSON)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert (err["param"], err["errors"][0]["line"]) == (param, 3), err
        assert err["errors"][0]["custom_id"] == cid
        b = api.client.get(f"/batches/{err['batch_id']}").json()
        assert b["status"] == "failed" and b["input_file_id"] is None
    assert _count(api, Item) == 0 and api.queued() == 0
    assert _files_on_disk(api) == []  # refused uploads are not kept
    _no_stuck_batches(api)
    _listings_work(api)


def test_deep_nesting_is_a_400_not_a_recursion_error(api: Api) -> None:
    deep = b'{"prompt": "p", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = api.client.post("/batches", content=jsonl(prompts(1)) + deep + b"\n", headers=NDJSON)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_json_line" and err["errors"][0]["line"] == 2
    body = b'{"input_file_id": "f", "endpoint": "/v1/completions", "completion_window": ' \
           b'"24h", "metadata": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}"
    r = api.client.post("/v1/batches", content=body,
                        headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text[:300]
    nested = '{"a": ' * 3000 + "1" + "}" * 3000
    r = api.client.post("/batches", params={"defaults": nested}, content=jsonl(prompts(1)),
                        headers=NDJSON)
    assert r.status_code == 400 and r.json()["error"]["param"] == "defaults", r.text[:300]
    r = api.client.post("/batches", data={"defaults": nested},
                        files={"file": ("a.jsonl", jsonl(prompts(1)))})
    assert r.status_code == 400 and r.json()["error"]["param"] == "defaults", r.text[:300]
    # Nested inside a field a line may have (stop), just below the parser's limit.
    stop = '{"prompt": "p", "stop": ' + "[" * 900 + "]" * 900 + "}"
    r = api.client.post("/batches", content=stop.encode() + b"\n",
                        params={"on_invalid": "record"}, headers=NDJSON)
    assert r.status_code == 201, r.text[:300]
    assert r.json()["counts"]["failed"] == 1
    assert len(api.client.get(f"/batches/{r.json()['id']}/errors").text) < 2000
    assert [p.name for p in _files_on_disk(api)] == [f"{r.json()['input_file_id']}.jsonl"]
    _no_stuck_batches(api)


def test_filenames_with_nul_or_surrogates_are_stored_cleaned(api: Api) -> None:
    r = api.client.post("/batches", params={"filename": "a\x00b.jsonl"},
                        content=jsonl(prompts(1)), headers=NDJSON)
    assert r.status_code == 201, r.text
    f = api.client.get(f"/v1/files/{r.json()['input_file_id']}").json()
    assert f["filename"] == "a\ufffdb.jsonl"
    r = api.client.post("/batches", files={"file": ("c\x00d.jsonl", jsonl(prompts(1)))})
    assert r.status_code == 201, r.text
    r = api.client.post("/v1/files", files={"file": ("e\x00.jsonl", jsonl(prompts(1)))},
                        data={"purpose": "batch"})
    assert r.status_code == 200, r.text
    with session_scope(api.db) as s:
        assert all(Path(p).exists() for p in s.scalars(select(File.path)))
    assert len(_files_on_disk(api)) == 3 and not any(
        p.name.startswith(".tmp-") for p in _files_on_disk(api))


def test_413_names_the_same_limit_for_every_upload_path(api_factory) -> None:
    api = api_factory(max_file_bytes=3 * 1024 * 1024)
    body = b'{"prompt": "p"}\n' * (3 * 1024 * 1024 // 16 + 10)
    messages = [
        api.client.post("/batches", content=body, headers=NDJSON),
        api.client.post("/batches", content=iter([body[:1000], body[1000:]]), headers=NDJSON),
        api.client.post("/batches", files={"file": ("a.jsonl", body)}),
        api.client.post("/v1/files", files={"file": ("a.jsonl", body)},
                        data={"purpose": "batch"}),
    ]
    assert [r.status_code for r in messages] == [413] * 4
    assert {r.json()["error"]["message"] for r in messages} == {
        "The file is larger than the limit of 3145728 bytes (3 MiB; NEOXQ_MAX_FILE_BYTES)."}
    assert _files_on_disk(api) == []


def test_results_escape_unicode_line_breaks(api: Api) -> None:
    """U+0085, U+2028 and U+2029 in generated text and error messages are escaped in every
    JSONL the API streams: native results and errors, OpenAI output and error files."""
    from store.tables import Result

    odd = "a\u2028b\x85c\u2029d"
    b = api.client.post("/batches", content=jsonl(prompts(3)), headers=NDJSON).json()
    write_results(api.db, b["id"], fail={2})
    with session_scope(api.db) as s:
        s.execute(update(Result).where(Result.index < 2).values(text=odd, choices=[
            {"index": 0, "text": odd, "finish_reason": "length", "logprobs": None}]))
        s.execute(update(Result).where(Result.index == 2).values(
            error={"code": "c", "message": odd, "param": None}))
    ob = api.client.get(f"/v1/batches/{b['id']}").json()
    streams = {f"/batches/{b['id']}/results": 2, f"/batches/{b['id']}/errors": 1,
               f"/v1/files/{ob['output_file_id']}/content": 2,
               f"/v1/files/{ob['error_file_id']}/content": 1}
    for url, n in streams.items():
        raw = api.client.get(url).content
        assert not any(c.encode() in raw for c in "\u2028\x85\u2029"), url
        lines = raw.decode().splitlines()
        assert len(lines) == n, (url, lines)
        assert all(odd in json.dumps(json.loads(x), ensure_ascii=False) for x in lines), url


def test_record_mode_keeps_custom_ids_and_reports_duplicates_once(api: Api) -> None:
    body = jsonl([{"prompt": "a", "custom_id": "a"}, {"prompt": "b", "custom_id": "b",
                                                      "temperature": -1},
                  {"prompt": "c", "custom_id": "a"}, {"prompt": "", "custom_id": "d"}])
    r = api.client.post("/batches", params={"on_invalid": "record"}, content=body,
                        headers=NDJSON)
    assert r.status_code == 201, r.text
    bid = r.json()["id"]
    errors = [json.loads(x) for x in api.client.get(f"/batches/{bid}/errors").text.splitlines()]
    assert [(e["line"], e["custom_id"], e["param"]) for e in errors] == [
        (2, "b", "temperature"), (3, None, "custom_id"), (4, "d", "prompt")]
    write_results(api.db, bid)
    results = [json.loads(x) for x in api.client.get(f"/batches/{bid}/results").text.splitlines()]
    assert [x["custom_id"] for x in results] == ["a"]  # "a" once, in results only


def test_refusal_messages(api: Api) -> None:
    r = api.client.post("/batches", content=b"\n\n", headers=NDJSON)
    assert r.json()["error"]["message"] == "The file was refused: the file has no requests."
    r = api.client.post("/v1/batches", content=b"not json",
                        headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] is None
    assert r.json()["error"]["code"] == "invalid_json"


def test_first_key_adopts_what_was_made_without_keys(api: Api) -> None:
    b = api.client.post("/batches", content=jsonl(prompts(1)), headers=NDJSON).json()
    key = api.key()
    auth = {"Authorization": f"Bearer {key}"}
    assert api.client.get(f"/batches/{b['id']}", headers=auth).status_code == 200
    assert api.client.get(f"/v1/files/{b['input_file_id']}", headers=auth).status_code == 200
    other = {"Authorization": f"Bearer {api.key('second')}"}
    assert api.client.get(f"/batches/{b['id']}", headers=other).status_code == 404


def test_readyz_counts_only_live_workers(api: Api) -> None:
    with session_scope(api.db) as s:
        for wid in ("up", "stopped", "silent"):
            register_worker(session=s, worker_id=wid, host="h", pid=1, model="m",
                            devices=[], pipeline_parallel=1)
        s.execute(update(Worker).where(Worker.id == "stopped").values(status="stopped"))
        s.execute(update(Worker).where(Worker.id == "silent").values(
            last_seen=time.time() - api.settings.dead_worker_after - 1))
    assert api.client.get("/readyz").json()["workers"] == 1


def test_expired_batches_are_swept_and_report_unrun_items(api: Api) -> None:
    b = api.client.post("/batches", content=jsonl(prompts(3)), headers=NDJSON).json()
    write_results(api.db, b["id"], upto=1)
    with session_scope(api.db) as s:
        s.execute(update(Batch).values(expires_at=time.time() - 1))
    sweep(api.db, api.settings)  # (the app's own sweeper thread may have been first)
    ob = api.client.get(f"/v1/batches/{b['id']}").json()
    assert ob["status"] == "expired" and ob["expired_at"] and ob["error_file_id"]
    lines = api.client.get(f"/v1/files/{ob['error_file_id']}/content").text.splitlines()
    assert [json.loads(x)["error"]["code"] for x in lines] == ["batch_expired"] * 2
    # What finished before the window closed stays in the output file.
    out = api.client.get(f"/v1/files/{ob['output_file_id']}/content").text.splitlines()
    assert [json.loads(x)["response"]["status_code"] for x in out] == [200]
    assert api.client.post(f"/batches/{b['id']}/cancel").status_code == 409
    assert sweep(api.db, api.settings).expired == 0


def test_validating_leftovers_are_failed(api: Api) -> None:
    from store.queries import create_batch

    with session_scope(api.db) as s:
        bid = create_batch(session=s, owner="local").id
        s.execute(update(Batch).values(created_at=time.time() - 10_000))
    sweep(api.db, api.settings)
    b = api.client.get(f"/batches/{bid}").json()
    assert b["status"] == "failed" and b["errors"][0]["code"] == "ingest_interrupted"


def test_upload_leftovers_are_finished_or_removed(api: Api) -> None:
    d = api.settings.files_dir
    d.mkdir(parents=True, exist_ok=True)
    committed = api.client.post("/v1/files", files={"file": ("in.jsonl", b"{}\n")},
                                data={"purpose": "batch"}).json()["id"]
    tmp, final = upload_paths(d, committed)
    final.rename(tmp)  # as if the process died between the commit and the rename
    orphan_tmp, _ = upload_paths(d, "file-gone1")
    _, orphan_final = upload_paths(d, "file-gone2")
    fresh_tmp, _ = upload_paths(d, "file-uploading")
    for p in (orphan_tmp, orphan_final, fresh_tmp):
        p.write_bytes(b"x")
    old = time.time() - api.settings.stale_upload_after - 5
    for p in (tmp, orphan_tmp, orphan_final):
        os.utime(p, (old, old))
    sweep_uploads(api.db, d, stale_after=api.settings.stale_upload_after)
    assert sorted(p.name for p in d.iterdir()) == sorted([final.name, fresh_tmp.name])
    assert api.client.get(f"/v1/files/{committed}/content").content == b"{}\n"


def test_refusing_a_50000_line_file_stores_nothing(api_factory) -> None:
    api = api_factory(max_lines=50_000)
    body = jsonl(prompts(49_999)) + b'{"prompt": "p", "temperature": -1}\n'
    t0 = time.perf_counter()
    r = api.client.post("/batches", content=body, headers=NDJSON)
    took = time.perf_counter() - t0
    assert r.status_code == 400 and r.json()["error"]["errors"][0]["line"] == 50_000
    assert _count(api, Item) == 0 and _files_on_disk(api) == []
    print(f"refused 50,000 lines on {api.db.dialect.name} in {took:.1f}s")
    assert took < 15  # validated before any insert: no rollback of 50,000 rows
    with session_scope(api.db) as s:
        assert set(s.scalars(select(Batch.status))) <= TERMINAL and not ACTIVE & {"failed"}


def test_rows_written_before_the_checks_do_not_break_listings(api: Api) -> None:
    """A batch stored by an older version with a lone surrogate in its metadata, defaults
    and errors: every listing and view of its owner still answers."""
    from store.queries import create_batch

    with session_scope(api.db) as s:
        bid = create_batch(session=s, owner="local", metadata={"a": "x\ud800"},
                           defaults={"stop": ["\udfff"]}).id
        s.execute(update(Batch).values(errors=[{"line": 1, "param": "p\ud800", "code": "c",
                                                "message": "m\ud800"}]))
    for url in (*LISTINGS, f"/batches/{bid}", f"/v1/batches/{bid}"):
        r = api.client.get(url)
        assert r.status_code == 200, (url, r.text[:300])
    assert api.client.get(f"/batches/{bid}").json()["metadata"] == {"a": "x?"}


def test_sync_completions_refuse_bad_text_and_deep_nesting(api: Api) -> None:
    """The interactive routes parse their own bodies: the same 400s as a batch line, no
    RecursionError and no unserializable surrogate pushed to the workers' lane."""
    json_body = {"content-type": "application/json"}
    model = api.settings.model_name
    cases = [
        ("/v1/completions", '{"model": "M", "prompt": "a\\ud800"}', "prompt"),
        ("/v1/completions", '{"model": "M\\udfff", "prompt": "a"}', "model"),
        ("/v1/chat/completions",
         '{"model": "M", "messages": [{"role": "user", "content": "x\\ud83d"}]}',
         "messages.content"),
        ("/v1/completions", '{"model": "M", "prompt": "a", "stop": '
         + "[" * 5000 + "]" * 5000 + "}", None),
        ("/v1/chat/completions", '{"model": "M", "messages": '
         + "[" * 100_000 + "]" * 100_000 + "}", None),
    ]
    for url, body, param in cases:
        r = api.client.post(url, content=body.replace('"M', '"' + model, 1).encode(),
                            headers=json_body)
        assert r.status_code == 400, (url, body[:60], r.text[:300])
        assert r.json()["error"]["param"] == param, r.text[:300]
    r = redis.Redis.from_url(api.settings.redis_url)
    try:  # nothing reached the interactive lane
        assert not list(r.scan_iter(match=f"{api.settings.redis_key_prefix}*interactive*"))
    finally:
        r.close()


def test_fine_tuning_uploads_refuse_deep_nesting_and_lone_surrogates(api: Api) -> None:
    """Training lines are read by their own checker: nesting past the JSON parser's depth
    and lone surrogates (which the tokenizer would refuse mid-training) are bad lines of
    a 400, and the refused upload is not kept."""
    body = jsonl([
        b'{"prompt": "a", "completion": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"prompt": "a", "completion": "b\\ud800"}',
        b'{"prompt": "a", "completion": "\\ud83d\\ude00"}',  # a whole pair is text
    ])
    r = api.client.post("/v1/files", data={"purpose": "fine-tune"},
                        files={"file": ("t.jsonl", body)})
    assert r.status_code == 400, r.text[:300]
    errors = r.json()["error"]["errors"]
    assert [e["line"] for e in errors] == [1, 2]
    assert "nested too deeply" in errors[0]["message"]
    assert "surrogate" in errors[1]["message"]
    assert _files_on_disk(api) == [] and _count(api, File) == 0


def test_nul_in_any_url_is_a_4xx_on_every_route(api: Api) -> None:
    """PostgreSQL refuses U+0000 in a compared string (the driver raises; SQLite just finds
    nothing): every route with an id in its path, and every read's query parameters,
    answer a 4xx for one - on both backends alike."""
    b = api.client.post("/batches", content=jsonl(prompts(1)), headers=NDJSON).json()
    with_ids = [(m.upper(), p) for p, ops in api.client.app.openapi()["paths"].items()
                if "{" in p for m in ops]
    assert len(with_ids) >= 15, with_ids
    for method, path in with_ids:
        url = re.sub(r"\{[^}]+\}", "x%00y", path)
        r = api.client.request(method, url)
        assert r.status_code == 404, (method, url, r.status_code, r.text[:200])
    for url in ("/batches", "/v1/batches", "/v1/files", "/v1/fine_tuning/jobs",
                "/dashboard/api/overview"):
        r = api.client.get(url, params={"after": "a\x00", "limit": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "after", (url, r.text)
    # What exists is still found, and a NUL in an upload's filename is still stored cleaned.
    assert api.client.get(f"/batches/{b['id']}").status_code == 200
    assert api.client.post("/batches", params={"filename": "a\x00"}, content=jsonl(prompts(1)),
                           headers=NDJSON).status_code == 201
