"""Every kind of bad input gets a clear 4xx naming the line and field (or, opted in, a
per-item error while the rest of the batch runs); nothing already accepted is lost."""

from __future__ import annotations

import json

import pytest

from tests.api.conftest import Api, jsonl, prompts

NDJSON = {"content-type": "application/x-ndjson"}


def refused(api: Api, body: bytes, params: dict | None = None) -> dict:
    r = api.client.post("/batches", params=params or {}, content=body, headers=NDJSON)
    assert r.status_code == 400, r.text
    return r.json()["error"]


def openai_line(cid: str, **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/completions",
            "body": {"model": "gpt-neox-20b", "prompt": "hi", **body}}


@pytest.mark.parametrize(("line", "code", "param"), [
    (b'{"prompt": "ok"', "invalid_json_line", None),
    (b'{"prompt": "caf\xe9"}', "invalid_utf8", None),
    (b'["prompt"]', "invalid_json_line", None),
    (b'{"custom_id": "x"}', "missing_prompt", "prompt"),
    (b'{"prompt": "p", "temprature": 0.5}', "unknown_field", "temprature"),
    (b'{"prompt": "p", "temperature": -1}', "invalid_value", "temperature"),
    (b'{"prompt": "p", "max_tokens": "ten"}', "invalid_value", "max_tokens"),
    (b'{"prompt": "p", "top_p": 1.5}', "invalid_value", "top_p"),
    (b'{"prompt": "p", "temperature": NaN}', "invalid_json_line", None),
    (b'{"prompt": 42}', "invalid_value", "prompt"),
    (b'{"prompt": "p", "custom_id": "r0"}', "duplicate_custom_id", "custom_id"),
])
def test_bad_line_refuses_the_file_naming_line_and_field(sqlite_api: Api, line: bytes,
                                                          code: str, param: str | None) -> None:
    body = jsonl(prompts(2)) + line + b"\n"
    err = refused(sqlite_api, body)
    assert err["code"] == code and err["param"] == param
    assert err["errors"][0]["line"] == 3
    assert err["message"].startswith("The file was refused") and "line 3" in err["message"]
    assert sqlite_api.queued() == 0  # nothing runs
    b = sqlite_api.client.get(f"/batches/{err['batch_id']}").json()
    assert b["status"] == "failed" and b["errors"][0]["line"] == 3
    lines = sqlite_api.client.get(f"/batches/{err['batch_id']}/errors").text.splitlines()
    assert json.loads(lines[0])["code"] == code


def test_every_bad_line_is_listed(sqlite_api: Api) -> None:
    body = jsonl([{"prompt": "a"}, "nope", {"prompt": "b", "n": 0}, {"prompt": ""}])
    err = refused(sqlite_api, body)
    assert [(e["line"], e["param"]) for e in err["errors"]] == [
        (2, None), (3, "n"), (4, "prompt")]


@pytest.mark.parametrize("body", [b"", b"\n\n  \n"])
def test_empty_file(sqlite_api: Api, body: bytes) -> None:
    assert refused(sqlite_api, body)["code"] == "empty_file"


def test_too_many_lines(sqlite_api_factory) -> None:
    api = sqlite_api_factory(max_lines=5)
    err = refused(api, jsonl(prompts(6)))
    assert err["code"] == "too_many_tasks" and "at most 5" in err["message"]
    assert api.client.post("/batches", content=jsonl(prompts(5)), headers=NDJSON
                           ).status_code == 201


def test_file_over_the_size_limit_is_413(sqlite_api_factory) -> None:
    api = sqlite_api_factory(max_file_bytes=1000)
    body = jsonl(prompts(100))
    assert len(body) > 1000
    r = api.client.post("/batches", content=body, headers=NDJSON)
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
    # No Content-Length (chunked): stopped while streaming.
    r = api.client.post("/batches", content=iter([body[:600], body[600:]]), headers=NDJSON)
    assert r.status_code == 413
    r = api.client.post("/batches", files={"file": ("a.jsonl", body)})
    assert r.status_code == 413
    r = api.client.post("/v1/files", files={"file": ("a.jsonl", body)},
                        data={"purpose": "batch"})
    assert r.status_code == 413
    assert not list((api.settings.files_dir).glob("*"))  # partial uploads removed
    assert api.client.post("/batches", content=jsonl(prompts(3)), headers=NDJSON
                           ).status_code == 201


def test_a_line_too_long_is_refused_before_ingestion(sqlite_api: Api) -> None:
    body = jsonl(prompts(1)) + b'{"prompt": "' + b"x" * (5 << 20) + b'"}\n'
    err = refused(sqlite_api, body)
    assert err["code"] == "line_too_long" and err["line"] == 2


@pytest.mark.parametrize(("params", "param"), [
    ({"temperature": -1}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "abc"}, "max_tokens"),
    ({"temperature": "nan"}, "temperature"),
    ({"defaults": "{not json"}, "defaults"),
    ({"defaults": '{"bogus": 1}'}, "bogus"),
    ({"metadata": '["a"]'}, "metadata"),
    ({"metadata": json.dumps({"k": 1})}, "metadata.k"),
    ({"format": "xml"}, "format"),
    ({"on_invalid": "ignore"}, "on_invalid"),
])
def test_bad_parameters_are_400_before_the_upload_is_kept(sqlite_api: Api, params: dict,
                                                          param: str) -> None:
    r = sqlite_api.client.post("/batches", params=params, content=jsonl(prompts(2)),
                               headers=NDJSON)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert not sqlite_api.settings.files_dir.exists() or not list(
        sqlite_api.settings.files_dir.glob("*"))


def test_bad_multipart_forms(sqlite_api: Api) -> None:
    r = sqlite_api.client.post("/batches", data={"max_tokens": "3"},
                               files={"other": ("a.jsonl", b"x")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    r = sqlite_api.client.post("/batches", data={"colour": "red"},
                               files={"file": ("a.jsonl", jsonl(prompts(1)))})
    assert r.status_code == 400 and r.json()["error"]["param"] == "colour"
    r = sqlite_api.client.post("/batches", data={"max_tokens": "many"},
                               files={"file": ("a.jsonl", jsonl(prompts(1)))})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_record_mode_runs_good_lines_and_reports_bad_ones(sqlite_api: Api) -> None:
    body = jsonl([{"prompt": "a", "custom_id": "a"}, b"\xff\xfe", {"prompt": "b", "top_k": -5},
                  {"prompt": "c", "custom_id": "c"}])
    r = sqlite_api.client.post("/batches", params={"on_invalid": "record"}, content=body,
                               headers=NDJSON)
    assert r.status_code == 201, r.text
    b = r.json()
    assert b["status"] == "in_progress"
    assert b["counts"] == {"total": 4, "completed": 0, "failed": 2, "pending": 2}
    assert sqlite_api.queued() >= 1
    errors = [json.loads(x) for x in sqlite_api.client.get(f"/batches/{b['id']}/errors")
              .text.splitlines()]
    assert [(e["line"], e["code"], e["param"]) for e in errors] == [
        (2, "invalid_utf8", None), (3, "invalid_value", "top_k")]


def test_openai_file_and_batch_validation(sqlite_api: Api) -> None:
    c = sqlite_api.client

    def upload(rows: list, purpose: str = "batch") -> str:
        r = c.post("/v1/files", files={"file": ("in.jsonl", jsonl(rows))},
                   data={"purpose": purpose})
        assert r.status_code == 200, r.text
        return r.json()["id"]

    r = c.post("/v1/files", files={"file": ("in.jsonl", b"{}")}, data={"purpose": "assistants"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
    # fine-tune files are checked as training data: "{}" is no training example
    r = c.post("/v1/files", files={"file": ("in.jsonl", b"{}")}, data={"purpose": "fine-tune"})
    assert r.status_code == 400 and [e["line"] for e in r.json()["error"]["errors"]] == [1]
    good = upload([openai_line("a"), openai_line("b")])

    def create(**kw) -> dict:
        body = {"input_file_id": good, "endpoint": "/v1/completions",
                "completion_window": "24h", **kw}
        return c.post("/v1/batches", json=body).json()

    assert create(endpoint="/v1/embeddings")["error"]["param"] == "endpoint"
    # A batch's endpoint and its lines' urls must agree (line 1 names the mismatch).
    mismatched = create(endpoint="/v1/chat/completions")
    assert mismatched["status"] == "failed"
    assert mismatched["errors"]["data"][0]["code"] == "invalid_url"
    assert mismatched["errors"]["data"][0]["line"] == 1
    assert create(completion_window="1h")["error"]["param"] == "completion_window"
    assert create(input_file_id="file-nope")["error"]["code"] == "not_found"
    assert create(surprise=1)["error"]["param"] == "surprise"
    assert create(metadata={"k": "v" * 600})["error"]["param"] == "metadata.k"
    cases = {
        "duplicate_custom_id": [openai_line("a"), openai_line("a")],
        "invalid_url": [openai_line("a"), {**openai_line("b"), "url": "/v1/chat/completions"}],
        "invalid_json_line": [openai_line("a"), "{oops"],
        "unknown_field": [openai_line("a"), openai_line("b", temprature=1)],
        "missing_custom_id": [openai_line("a"), {k: v for k, v in openai_line("b").items()
                                                 if k != "custom_id"}],
        "empty_file": [""],
    }
    for code, rows in cases.items():
        b = create(input_file_id=upload(rows))
        assert b["status"] == "failed", (code, b)
        data = b["errors"]["data"]
        assert data[0]["code"] == code, (code, data)
        if code != "empty_file":
            assert data[0]["line"] == 2, (code, data)
    assert sqlite_api.queued() == 0
    ok = create()
    assert ok["status"] == "in_progress" and ok["request_counts"]["total"] == 2


def test_openai_too_many_tasks(sqlite_api_factory) -> None:
    api = sqlite_api_factory(max_lines=2)
    f = api.client.post("/v1/files", files={"file": ("in.jsonl", jsonl(
        [openai_line(str(i)) for i in range(3)]))}, data={"purpose": "batch"}).json()
    b = api.client.post("/v1/batches", json={"input_file_id": f["id"],
                                             "endpoint": "/v1/completions",
                                             "completion_window": "24h"}).json()
    assert b["status"] == "failed" and b["errors"]["data"][0]["code"] == "too_many_tasks"


def test_accepted_batches_survive_refused_ones(sqlite_api: Api) -> None:
    r = sqlite_api.client.post("/batches", content=jsonl(prompts(4)), headers=NDJSON)
    good = r.json()["id"]
    refused(sqlite_api, b"garbage\n")
    b = sqlite_api.client.get(f"/batches/{good}").json()
    assert b["status"] == "in_progress" and b["counts"]["total"] == 4


def test_nul_characters_in_a_line(api: Api) -> None:
    # PostgreSQL text cannot hold U+0000 (SQLite can): refused there with the line named.
    body = jsonl([{"prompt": "a"}, {"prompt": "b\u0000c", "custom_id": "x"}])
    r = api.client.post("/batches", content=body, headers=NDJSON)
    assert r.status_code in (201, 400), r.text
    if r.status_code == 400:
        err = r.json()["error"]
        assert (err["errors"][0]["line"], err["param"]) == (2, "prompt"), err
        assert api.client.get(f"/batches/{err['batch_id']}").json()["status"] == "failed"
    else:
        assert api.settings.database_url.startswith("sqlite")
