"""Streaming ingestion and the race-safe store operations, on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import json

import pytest
from sqlalchemy import Engine, func, select

from core.payloads import ChunkPayload
from core.settings import Settings
from store.db import session_scope
from store.ingest import iter_lines, submit_batch
from store.queries import (
    PROMPT_TOKEN_IDS,
    create_batch,
    finalize_if_done,
    finish_cancel,
    insert_results,
    iter_results,
    request_cancel,
    set_batch_status,
)
from store.records import ResultRow
from store.tables import Batch, File, Item, Result


def jsonl(n: int, **fields) -> bytes:
    return "\n".join(json.dumps({"prompt": f"p{i}", "custom_id": f"c{i}", **fields})
                     for i in range(n)).encode() + b"\n"


def settings(**kw) -> Settings:
    return Settings(**{"chunk_items": 4, "max_lines": 100, **kw})


def test_iter_lines_splits_arbitrary_chunks() -> None:
    data = b'{"a": 1}\r\n{"b": 2}\n\n{"c": 3}'
    pieces = [data[i:i + 3] for i in range(0, len(data), 3)]
    assert list(iter_lines(iter(pieces))) == [b'{"a": 1}', b'{"b": 2}', b"", b'{"c": 3}']
    assert list(iter_lines(io.BytesIO(data))) == [b'{"a": 1}', b'{"b": 2}', b"", b'{"c": 3}']


def test_submit_stores_items_and_enqueues_chunks(db: Engine) -> None:
    sent: list[ChunkPayload] = []
    src = (jsonl(10, max_tokens=3) + b'{"prompt": [5, 6, 7]}\n')
    chunks = [src[i:i + 7] for i in range(0, len(src), 7)]  # an upload's arbitrary pieces
    r = submit_batch(engine=db, source=iter(chunks), enqueue=sent.append, settings=settings(),
                     defaults={"temperature": 0}, metadata={"job": "t"})
    assert r.status == "in_progress" and r.total == 11 and r.errors == []
    assert [(c.start, c.end) for c in sent] == [(0, 4), (4, 8), (8, 11)]
    with session_scope(db) as s:
        b = s.get(Batch, r.batch_id)
        assert (b.status, b.request_total, b.defaults, b.metadata_) == (
            "in_progress", 11, {"temperature": 0}, {"job": "t"})
        assert b.in_progress_at is not None
        items = s.scalars(select(Item).order_by(Item.index)).all()
        assert [i.line_number for i in items] == list(range(1, 12))
        assert items[0].params == {"max_tokens": 3} and items[0].custom_id == "c0"
        assert items[10].params == {PROMPT_TOKEN_IDS: [5, 6, 7]} and items[10].prompt == ""


def test_chunks_close_on_token_budget(db: Engine) -> None:
    sent: list[ChunkPayload] = []
    submit_batch(engine=db, source=io.BytesIO(jsonl(6, max_tokens=100)), enqueue=sent.append,
                 settings=settings(chunk_items=100, chunk_max_tokens=250))
    assert [(c.start, c.end) for c in sent] == [(0, 3), (3, 6)]


def test_refuse_lists_every_bad_line_and_stores_nothing(db: Engine) -> None:
    sent: list[ChunkPayload] = []
    src = jsonl(3) + b'{"prompt": 1}\nnope\n' + jsonl(2).replace(b"c0", b"c9")
    r = submit_batch(engine=db, source=io.BytesIO(src), enqueue=sent.append, settings=settings())
    assert r.status == "failed" and sent == []
    assert [(e.line, e.code) for e in r.errors] == [
        (4, "invalid_value"), (5, "invalid_json_line"), (7, "duplicate_custom_id")]
    with session_scope(db) as s:
        b = s.get(Batch, r.batch_id)
        assert b.status == "failed" and b.failed_at and len(b.errors) == 3
        assert b.errors[0]["line"] == 4 and b.errors[0]["param"] == "prompt"
        assert s.scalar(select(func.count()).select_from(Item)) == 0


def test_record_mode_runs_good_lines_and_fails_bad_ones(db: Engine) -> None:
    sent: list[ChunkPayload] = []
    src = jsonl(2) + b'{"prompt": "x", "temperature": -1}\n'
    r = submit_batch(engine=db, source=io.BytesIO(src), enqueue=sent.append,
                     settings=settings(), on_invalid="record")
    assert r.status == "in_progress" and r.total == 3 and r.invalid == 1 and len(sent) == 1
    with session_scope(db) as s:
        b = s.get(Batch, r.batch_id)
        assert (b.request_total, b.request_failed) == (3, 1)
        res = s.scalars(select(Result)).one()
        assert res.index == 2 and res.error["code"] == "invalid_value"
        assert "temperature" in res.error["message"] and res.error["line"] == 3


def test_file_level_errors_refuse_even_in_record_mode(db: Engine) -> None:
    r = submit_batch(engine=db, source=io.BytesIO(b"\n\n"), enqueue=lambda c: None,
                     settings=settings(), on_invalid="record")
    assert r.status == "failed" and r.errors[0].code == "empty_file"
    r = submit_batch(engine=db, source=io.BytesIO(jsonl(5)), enqueue=lambda c: None,
                     settings=settings(max_lines=3), on_invalid="record")
    assert r.status == "failed" and r.errors[0].code == "too_many_tasks" and r.total == 5


def test_bad_defaults_raise(db: Engine) -> None:
    with pytest.raises(ValueError, match="temperature: must be >= 0"):
        submit_batch(engine=db, source=io.BytesIO(jsonl(1)), enqueue=lambda c: None,
                     defaults={"temperature": -2}, settings=settings())


def _result(item: Item, **kw) -> ResultRow:
    row = {"item_id": item.id, "batch_id": item.batch_id, "index": item.index,
           "choices": [{"index": 0, "text": "t", "finish_reason": "length", "logprobs": None}],
           "text": "t", "finish_reason": "length", "prompt_tokens": 2, "completion_tokens": 3,
           "logprobs": None, "error": None, "queued_at": 1.0, "started_at": 2.0,
           "first_token_at": 2.5, "finished_at": 3.0, "tokens_per_s": 3.0,
           "worker_id": "w", "attempt": 1}
    row.update(kw)
    return ResultRow(**row)


def test_results_are_written_and_counted_once_and_finalize_once(db: Engine) -> None:
    r = submit_batch(engine=db, source=io.BytesIO(jsonl(3)), enqueue=lambda c: None,
                     settings=settings())
    with session_scope(db) as s:
        items = s.scalars(select(Item).order_by(Item.index)).all()
    with session_scope(db) as s:
        assert insert_results(session=s, rows=[_result(items[0]), _result(items[1])]) == [
            items[0].id, items[1].id]
    with session_scope(db) as s:  # a redelivered chunk writes the same items again
        new = insert_results(session=s, rows=[
            _result(items[0], text="dup"), _result(items[2], error={"code": "x", "message": "y"},
                                                   completion_tokens=0)])
        assert new == [items[2].id]
    with session_scope(db) as s:
        b = s.get(Batch, r.batch_id)
        assert (b.request_completed, b.request_failed, b.completion_tokens) == (2, 1, 6)
        assert s.get(Result, items[0].id).text == "t"
        assert [i.status for i in s.scalars(select(Item).order_by(Item.index))] == [
            "completed", "completed", "failed"]
        assert [res.index for _, res in iter_results(session=s, batch_id=b.id, page=2)] == [
            0, 1, 2]
        assert [res.index for _, res in iter_results(session=s, batch_id=b.id, failed=True)] \
            == [2]
    with session_scope(db) as s:
        assert finalize_if_done(session=s, batch_id=r.batch_id) == "completed"
    with session_scope(db) as s:
        assert finalize_if_done(session=s, batch_id=r.batch_id) is None
        b = s.get(Batch, r.batch_id)
        assert b.status == "completed" and b.finalizing_at and b.completed_at
        assert s.get(File, b.output_file_id).purpose == "batch_output"
        assert s.get(File, b.error_file_id).purpose == "batch_error"


def test_cancel_moves_once_and_keeps_results(db: Engine) -> None:
    r = submit_batch(engine=db, source=io.BytesIO(jsonl(3)), enqueue=lambda c: None,
                     settings=settings())
    with session_scope(db) as s:
        first = s.scalars(select(Item).where(Item.index == 0)).one()
        insert_results(session=s, rows=[_result(first)])
    with session_scope(db) as s:
        assert request_cancel(session=s, batch_id=r.batch_id)
        assert not request_cancel(session=s, batch_id=r.batch_id)
    with session_scope(db) as s:
        assert finish_cancel(session=s, batch_id=r.batch_id)
        assert not finish_cancel(session=s, batch_id=r.batch_id)
    with session_scope(db) as s:
        b = s.get(Batch, r.batch_id)
        assert b.status == "cancelled" and b.cancelling_at and b.cancelled_at
        assert [i.status for i in s.scalars(select(Item).order_by(Item.index))] == [
            "completed", "cancelled", "cancelled"]


def test_conditional_status_update_has_one_winner(db: Engine) -> None:
    with session_scope(db) as s:
        bid = create_batch(session=s, owner="local").id
    wins = 0
    for _ in range(3):
        with session_scope(db) as s:
            wins += set_batch_status(session=s, batch_id=bid, to="in_progress",
                                     from_=("validating",))
    assert wins == 1


def test_results_with_nul_characters_are_stored(db: Engine) -> None:
    """A model can generate U+0000; PostgreSQL text cannot hold it, SQLite can."""
    r = submit_batch(engine=db, source=io.BytesIO(jsonl(1)), enqueue=lambda c: None,
                     settings=settings())
    with session_scope(db) as s:
        item = s.scalars(select(Item)).one()
        text = "a\x00b"
        row = _result(item, text=text, choices=[{"index": 0, "text": text,
                                                 "finish_reason": "length", "logprobs": None}])
        assert insert_results(session=s, rows=[row]) == [item.id]
    with session_scope(db) as s:
        stored = s.get(Result, item.id)
        expected = "a\ufffdb" if db.dialect.name == "postgresql" else text
        assert stored.text == expected and stored.choices[0]["text"] == expected
        assert s.get(Batch, r.batch_id).request_completed == 1


def test_chat_lines_and_bad_schemas_as_item_errors(db: Engine) -> None:
    """A chat file keeps its messages for the worker and takes the lines' url as its
    endpoint; a bad response_format schema fails its own line only, with its line
    number; a malformed line still refuses the file."""
    def chat(cid: str, **body) -> dict:
        return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "gpt-neox-20b", "messages": [{"role": "user", "content": "hi"}],
                         **body}}

    bad_schema = {"type": "json_schema", "json_schema": {"name": "x",
                                                         "schema": {"type": "nope"}}}
    rows = [chat("a"), chat("b", response_format=bad_schema), chat("c")]
    src = b"\n".join(json.dumps(r).encode() for r in rows) + b"\n"
    sent: list[ChunkPayload] = []
    r = submit_batch(engine=db, source=io.BytesIO(src), enqueue=sent.append,
                     settings=settings())
    assert r.status == "in_progress" and r.total == 3 and r.invalid == 1
    with session_scope(db) as s:
        batch = s.get(Batch, r.batch_id)
        assert batch.endpoint == "/v1/chat/completions" and batch.request_failed == 1
        items = s.scalars(select(Item).where(Item.batch_id == r.batch_id)
                          .order_by(Item.index)).all()
        assert items[0].params == {"messages": [{"role": "user", "content": "hi"}]}
        assert items[0].prompt == ""
        assert items[1].status == "failed" and items[1].error["line"] == 2
        assert items[1].error["param"] == "body.response_format.json_schema.schema"
    # A line the file format itself breaks still refuses the whole file.
    rows.append({**chat("d"), "url": "/v1/completions"})
    src = b"\n".join(json.dumps(r).encode() for r in rows) + b"\n"
    r = submit_batch(engine=db, source=io.BytesIO(src), enqueue=sent.append,
                     settings=settings())
    assert r.status == "failed"
    assert [(e.line, e.code) for e in r.errors][:2] == [(2, "invalid_value"),
                                                        (4, "invalid_url")]
