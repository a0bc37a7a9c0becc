"""Streaming ingestion: a JSONL byte stream becomes a batch's items and chunk messages.

Called by the API (uploads) and the CLI. The file is read line by line and never held
whole: each line is validated (core/jsonl.py), valid lines are inserted in blocks with
one executemany per block, and chunk boundaries are planned on the way. Only when the
whole file has been read is anything enqueued, because in the default mode one bad line
refuses the whole file (as OpenAI does) and nothing may run.

Modes (``on_invalid``):

- ``"refuse"`` (default): any bad line fails the batch; ``batches.errors`` lists every
  bad line (up to ``max_errors``) with its line number, field and what was expected.
- ``"record"``: bad lines become items with an error (a failed result, counted in
  ``request_failed``) and the good lines run. File-level problems (empty file, too many
  lines) still refuse the file.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Literal

from sqlalchemy import Engine, delete, insert, select, update

from core.jsonl import SAMPLING_DEFAULTS, LineError, LineValidator, check_defaults
from core.payloads import ChunkPayload
from core.settings import Settings, get_settings
from store.db import session_scope
from store.queries import (
    PROMPT_TOKEN_IDS,
    create_batch,
    finalize_if_done,
    insert_results,
    set_batch_status,
)
from store.tables import Batch, Item, now

OnInvalid = Literal["refuse", "record"]
Enqueue = Callable[[ChunkPayload], None]


@dataclass
class IngestReport:
    """What ingestion did: the batch, its state, counts, errors, chunks and time taken."""

    batch_id: str
    status: str
    total: int = 0
    invalid: int = 0
    errors: list[LineError] = field(default_factory=list)
    chunks: list[tuple[int, int]] = field(default_factory=list)
    format: str = "native"
    model: str | None = None
    seconds: float = 0.0


def iter_lines(source: IO[bytes] | Iterable[bytes]) -> Iterator[bytes]:
    """Lines of a byte stream or of an iterator of arbitrary byte chunks (an upload),
    without their line endings. Memory is bounded by the longest line."""
    if hasattr(source, "readline"):
        for line in source:  # binary file objects already split on b"\n"
            yield line.rstrip(b"\r\n")
        return
    pending = b""
    for chunk in source:
        if not chunk:
            continue
        pending += chunk
        if b"\n" not in chunk:
            continue
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r")
    if pending:
        yield pending.rstrip(b"\r")


class _ChunkPlanner:
    """Cuts the item sequence into chunks of at most ``max_items`` items and about
    ``max_tokens`` tokens of generation (max_tokens x n per item)."""

    def __init__(self, max_items: int, max_tokens: int, defaults: dict[str, Any]) -> None:
        self.max_items, self.max_tokens = max_items, max_tokens
        self.default_tokens = int(defaults.get("max_tokens") or SAMPLING_DEFAULTS["max_tokens"])
        self.default_n = int(defaults.get("n") or 1)
        self.chunks: list[tuple[int, int]] = []
        self.start, self.cost = 0, 0

    def add(self, index: int, params: dict[str, Any]) -> None:
        self.cost += int(params.get("max_tokens") or self.default_tokens) * int(
            params.get("n") or self.default_n)
        if index + 1 - self.start >= self.max_items or self.cost >= self.max_tokens:
            self.chunks.append((self.start, index + 1))
            self.start, self.cost = index + 1, 0

    def finish(self, total: int) -> list[tuple[int, int]]:
        if total > self.start:
            self.chunks.append((self.start, total))
        return self.chunks


def ingest(
    *,
    engine: Engine,
    batch_id: str,
    source: IO[bytes] | Iterable[bytes],
    fmt: Literal["native", "openai", "auto"] = "auto",
    defaults: dict[str, Any] | None = None,
    on_invalid: OnInvalid = "refuse",
    settings: Settings | None = None,
    block: int = 2000,
    max_errors: int = 1000,
) -> IngestReport:
    """Validate ``source`` line by line and store the batch's items (not enqueued yet).

    On return the batch is still ``validating`` with ``request_total`` set, or ``failed``
    with ``errors`` if the file was refused.
    """
    s = settings or get_settings()
    t0 = time.perf_counter()
    defaults = dict(defaults or {})
    report = IngestReport(batch_id=batch_id, status="validating")
    validator = LineValidator(fmt, defaults=defaults, max_lines=s.max_lines)
    planner = _ChunkPlanner(s.chunk_items, s.chunk_max_tokens, defaults)
    refused = False
    rows: list[dict[str, Any]] = []
    index = 0
    t_queued = now()

    def flush() -> None:
        if rows:
            with session_scope(engine) as session:
                session.execute(insert(Item), rows)
            rows.clear()

    for raw in iter_lines(source):
        if validator.too_many:
            validator.line += 1  # past the limit: only count, the file is refused anyway
            validator.requests += bool(raw.strip())
            continue
        parsed = validator.feed(raw)
        if parsed is None:
            continue
        if validator.too_many:
            refused = True
            continue
        if not parsed.ok:
            report.invalid += 1
            if len(report.errors) < max_errors:
                report.errors.extend(parsed.errors[: max_errors - len(report.errors)])
            if on_invalid == "refuse":
                refused = True
        if refused:
            continue  # keep validating to list every bad line; store nothing more
        params = dict(parsed.params)
        prompt = parsed.prompt
        if isinstance(prompt, list):
            params[PROMPT_TOKEN_IDS] = prompt
            prompt = ""
        error = None
        if not parsed.ok:
            first = parsed.errors[0]
            error = {"code": first.code, "message": "; ".join(map(str, parsed.errors)),
                     "line": parsed.line, "param": first.field}
        rows.append({
            "batch_id": batch_id, "index": index, "line_number": parsed.line,
            "custom_id": parsed.custom_id, "prompt": prompt, "params": params,
            "status": "failed" if error else "queued", "attempts": 0,
            "queued_at": t_queued, "error": error,
        })
        planner.add(index, params)
        index += 1
        if len(rows) >= block:
            flush()

    file_errors = validator.finish()
    report.errors = file_errors + report.errors
    report.format = validator.fmt if validator.fmt != "auto" else "native"
    report.model = validator.first_model
    if file_errors or refused:
        rows.clear()
        with session_scope(engine) as session:
            session.execute(delete(Item).where(Item.batch_id == batch_id))
            set_batch_status(session=session, batch_id=batch_id, to="failed",
                             from_=("validating",),
                             errors=[e.as_dict() for e in report.errors],
                             request_total=0, format=report.format)
        report.status = "failed"
        report.total = validator.requests
        report.seconds = time.perf_counter() - t0
        return report

    flush()
    report.total = index
    report.chunks = planner.finish(index)
    with session_scope(engine) as session:
        values: dict[str, Any] = {"request_total": index, "format": report.format}
        if report.model:
            values["model"] = report.model
        session.execute(update(Batch).where(Batch.id == batch_id).values(**values))
        if report.invalid:
            # Bad lines run as item errors: their results are written now, counted failed.
            bad = session.execute(
                select(Item.id, Item.index, Item.error, Item.queued_at)
                .where(Item.batch_id == batch_id, Item.error.is_not(None))
            ).tuples().all()
            t = now()
            insert_results(session=session, rows=[
                {"item_id": iid, "batch_id": batch_id, "index": idx, "choices": [],
                 "error": err, "queued_at": qa, "finished_at": t, "attempt": 0,
                 "prompt_tokens": 0, "completion_tokens": 0}
                for iid, idx, err, qa in bad
            ])
    report.seconds = time.perf_counter() - t0
    return report


def submit_batch(
    *,
    engine: Engine,
    source: IO[bytes] | Iterable[bytes],
    owner: str = "local",
    fmt: Literal["native", "openai", "auto"] = "auto",
    endpoint: str | None = None,
    defaults: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    input_file_id: str | None = None,
    completion_window: str = "24h",
    on_invalid: OnInvalid = "refuse",
    enqueue: Enqueue | None = None,
    settings: Settings | None = None,
    batch_id: str | None = None,
) -> IngestReport:
    """Create a batch, ingest ``source`` into it and enqueue its chunks.

    The one entry point the API and the CLI call. Returns the report; the batch is
    ``in_progress`` (chunks enqueued), ``completed``/``failed`` (nothing to run), or
    ``failed`` with ``errors`` (refused). Bad ``defaults`` raise ``ValueError``.
    """
    s = settings or get_settings()
    problems = check_defaults(defaults or {})
    if problems:
        raise ValueError("; ".join(problems))
    if enqueue is None:
        from core.celery_app import enqueue_chunk, make_celery

        app = make_celery(s)

        def enqueue(p: ChunkPayload) -> None:
            enqueue_chunk(p, app=app, queue=s.queue)

    with session_scope(engine) as session:
        batch = create_batch(
            session=session, owner=owner, fmt=fmt if fmt != "auto" else "native",
            endpoint=endpoint or ("/v1/completions" if fmt == "openai" else "native"),
            input_file_id=input_file_id, completion_window=completion_window,
            defaults=defaults, metadata=metadata, batch_id=batch_id,
            model=s.model_name,
        )
        batch_id = batch.id
    report = ingest(engine=engine, batch_id=batch_id, source=source, fmt=fmt,
                    defaults=defaults, on_invalid=on_invalid, settings=s)
    if report.status == "failed":
        return report
    with session_scope(engine) as session:
        moved = set_batch_status(session=session, batch_id=batch_id, to="in_progress",
                                 from_=("validating",))
        final = finalize_if_done(session=session, batch_id=batch_id) if moved else None
    report.status = final or ("in_progress" if moved else report.status)
    if not moved or final:
        return report
    try:
        for start, end in report.chunks:
            enqueue(ChunkPayload(batch_id=batch_id, start=start, end=end))
    except Exception as exc:
        # The broker is down: fail the batch rather than leave it in_progress forever.
        # Chunks already sent find a failed batch and do nothing.
        with session_scope(engine) as session:
            set_batch_status(session=session, batch_id=batch_id, to="failed",
                             from_=("in_progress",),
                             errors=[{"line": None, "param": None, "code": "queue_unavailable",
                                      "message": f"could not enqueue: {exc}"}])
        report.status = "failed"
        raise
    return report


def enqueue_chunks(*, batch_id: str, chunks: Iterable[tuple[int, int]], enqueue: Enqueue) -> int:
    """Send chunk messages for ``chunks`` (re-enqueueing a batch by hand); returns the count."""
    n = 0
    for start, end in chunks:
        enqueue(ChunkPayload(batch_id=batch_id, start=start, end=end))
        n += 1
    return n
