"""Streaming ingestion: a JSONL byte stream becomes a batch's items and chunk messages.

Called by the API (uploads) and the CLI. The file is read line by line and never held
whole: each line is validated (core/jsonl.py), valid lines are inserted in blocks with
one executemany per block, and chunk boundaries are planned on the way. Everything is
one transaction, committed when the whole file has been read: a batch exists completely
or not at all (an API killed mid-upload leaves no rows), and a refused file is a
rollback, not thousands of deletes. Only after the commit is anything enqueued.

On SQLite that transaction holds the write lock while the file is read (seconds for a
50,000-line file); other writers wait (``busy_timeout``) rather than fail. PostgreSQL
lets them go on.

Modes (``on_invalid``):

- ``"refuse"`` (default): any bad line fails the batch; ``batches.errors`` lists every
  bad line (up to ``max_errors``) with its line number, field and what was expected.
  A line whose only problems are in its request's content that OpenAI reports per
  request (an invalid ``response_format`` schema, a bad ``regex``) does not refuse the
  file: it becomes a failed item, as in ``"record"``.
- ``"record"``: bad lines become items with an error (a failed result, counted in
  ``request_failed``) and the good lines run. File-level problems (empty file, too many
  lines) still refuse the file.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Literal

from sqlalchemy import Engine, insert, select
from sqlalchemy.orm import Session

from core.jsonl import SAMPLING_DEFAULTS, LineError, LineValidator, ParsedLine, check_defaults
from core.payloads import ChunkPayload
from core.settings import Settings, get_settings
from specs.status import BatchStatus, ItemStatus
from store.db import session_scope
from store.keys import LOCAL_OWNER
from store.queries import (
    CHAT_MESSAGES,
    PROMPT_TOKEN_IDS,
    create_batch,
    finalize_if_done,
    insert_results,
    live_workers,
    set_batch_status,
)
from store.records import ResultRow
from store.registry import known_models
from store.tables import Item, new_id, now

OnInvalid = Literal["refuse", "record"]
Enqueue = Callable[[ChunkPayload], None]

# Characters per token of English text under the GPT-NeoX tokenizer (about 4): ingestion
# has no tokenizer, and an item's cost needs only an estimate of its prompt's tokens.
CHARS_PER_TOKEN = 4


def prompt_tokens_estimate(prompt: str | list[int],
                           messages: list[dict[str, Any]] | None = None) -> int:
    """A prompt's tokens: exact for token ids, estimated for text and chats (a few
    tokens per message for the template around it)."""
    if isinstance(prompt, list):
        return len(prompt)
    chars = len(prompt)
    if messages:
        chars += sum(len(str(m.get("content") or "")) + 4 * CHARS_PER_TOKEN for m in messages)
    return -(-chars // CHARS_PER_TOKEN)


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
    endpoint: str | None = None  # the OpenAI lines' url
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


class ChunkPlanner:
    """Cuts the item sequence into chunks of at most ``max_items`` items and about
    ``max_tokens`` tokens of generation (max_tokens x n per item) - and, when the batch
    is small for the fleet, into enough chunks that every worker slot gets one.

    Why the last rule: each worker holds ``worker_concurrency`` chunks at once. A batch
    of 1,024 items in chunks of 256 is four chunks, and the first worker to ask takes all
    four while the others idle; cut into ``workers x concurrency`` chunks, it spreads over
    every worker from its first seconds. Chunks are never cut below ``min_items`` (per
    message overhead), and what is uneven after that - workers of different speeds, a
    long tail - is evened out by idle workers claiming queued items of chunks others
    hold (store/claims.py).
    """

    def __init__(self, max_items: int, max_tokens: int, defaults: dict[str, Any],
                 min_items: int = 8) -> None:
        self.max_items, self.max_tokens, self.min_items = max_items, max_tokens, min_items
        self.default_tokens = int(defaults.get("max_tokens") or SAMPLING_DEFAULTS["max_tokens"])
        self.default_n = int(defaults.get("n") or 1)
        self.costs = array("q")  # tokens each item may generate, in item order

    def add(self, index: int, params: dict[str, Any]) -> int:
        """Count item ``index``; returns the most tokens it may generate."""
        cost = int(params.get("max_tokens") or self.default_tokens) * int(
            params.get("n") or self.default_n)
        self.costs.append(cost)
        return cost

    def finish(self, total: int, slots: int = 1) -> list[tuple[int, int]]:
        """The chunks of ``total`` items for ``slots`` worker slots (live workers x chunks
        each holds)."""
        most, share = self.max_items, self.max_tokens
        if slots > 1:
            most = min(most, max(self.min_items, -(-total // slots)))
            # A slot's share of the tokens bounds a chunk the same way, so that a batch of
            # long generations spreads as a batch of short ones does (never below
            # min_items items; the configured token bound always applies).
            share = max(1, -(-sum(self.costs[:total]) // slots))
        least = min(self.min_items, most)
        chunks: list[tuple[int, int]] = []
        start, cost = 0, 0
        for index in range(total):
            cost += self.costs[index] if index < len(self.costs) else self.default_tokens
            size = index + 1 - start
            if size >= most or cost >= self.max_tokens or (cost >= share and size >= least):
                chunks.append((start, index + 1))
                start, cost = index + 1, 0
        if total > start:
            chunks.append((start, total))
        return chunks


def _ingest(
    session: Session | None, *, batch_id: str, source: IO[bytes] | Iterable[bytes],
    fmt: Literal["native", "openai", "auto"], defaults: dict[str, Any], on_invalid: OnInvalid,
    settings: Settings, block: int, max_errors: int, workers: int = 1,
    endpoint: str | None = None,
    known: set[str] | None = None,
) -> IngestReport:
    """Validate ``source`` line by line and insert the batch's items into ``session``'s
    transaction (the caller commits or rolls back). ``report.status`` says which:
    ``failed`` means refused (nothing of it may be kept). Without a session it only
    validates. ``workers``: the live workers the chunks are cut for (ChunkPlanner).
    ``known``: the model names lines may ask for (store/registry.py); a line naming
    another, or a model other than the file's first line's, is a bad line (a batch runs
    on one model's workers)."""
    t0 = time.perf_counter()
    report = IngestReport(batch_id=batch_id, status=BatchStatus.VALIDATING)
    validator = LineValidator(fmt, defaults=defaults, max_lines=settings.max_lines,
                              endpoint=endpoint)
    planner = ChunkPlanner(settings.chunk_items, settings.chunk_max_tokens, defaults)
    refused = False
    rows: list[dict[str, Any]] = []
    index = 0
    t_queued = now()

    def flush() -> None:
        if rows and session is not None:
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
        if parsed.model is not None and known is not None:
            _check_model(parsed, validator.first_model, known)
        if not parsed.ok:
            report.invalid += 1
            if len(report.errors) < max_errors:
                report.errors.extend(parsed.errors[: max_errors - len(report.errors)])
            if on_invalid == "refuse" and parsed.fatal:
                refused = True
        if refused:
            rows.clear()
            continue  # keep validating to list every bad line; store nothing more
        params = dict(parsed.params)
        prompt = parsed.prompt
        if isinstance(prompt, list):
            params[PROMPT_TOKEN_IDS] = prompt
            prompt = ""
        if parsed.messages is not None:
            params[CHAT_MESSAGES] = parsed.messages
        error = None
        if not parsed.ok:
            first = parsed.errors[0]
            error = {"code": first.code, "message": "; ".join(map(str, parsed.errors)),
                     "line": parsed.line, "param": first.field}
            params = {}  # never run; a bad line's values are not kept
        generated = planner.add(index, params)
        rows.append({
            "batch_id": batch_id, "index": index, "line_number": parsed.line,
            "custom_id": parsed.custom_id, "prompt": prompt, "params": params,
            "status": ItemStatus.FAILED if error else ItemStatus.QUEUED, "attempts": 0,
            "queued_at": t_queued, "error": error,
            "cost": 0 if error else generated + prompt_tokens_estimate(
                parsed.prompt if isinstance(parsed.prompt, list) else prompt,
                parsed.messages),
        })
        index += 1
        if len(rows) >= block:
            flush()

    file_errors = validator.finish()
    report.errors = file_errors + report.errors
    report.format = validator.fmt if validator.fmt != "auto" else "native"
    report.model = validator.first_model
    report.endpoint = validator.endpoint
    report.seconds = time.perf_counter() - t0
    if file_errors or refused:
        report.status = BatchStatus.FAILED
        report.total = validator.requests
        return report
    flush()
    report.total = index
    # One worker mixes all its chunks in one engine anyway: the cut matters from two on.
    report.chunks = planner.finish(
        index, slots=workers * settings.worker_concurrency if workers > 1 else 1)
    return report


def _check_model(parsed: ParsedLine, first: str | None, known: set[str]) -> None:
    if first is not None and parsed.model != first:
        parsed.errors.append(LineError(
            parsed.line, "body.model", "mismatched_model",
            f"every line of a batch names the same model: {first!r} (the first line's) "
            f"expected, got {parsed.model!r}"))
    elif parsed.model not in known:
        parsed.errors.append(LineError(
            parsed.line, "body.model", "model_not_found",
            f"unknown model {parsed.model!r}; known: {', '.join(sorted(known))}"))


def _record_bad_lines(session: Session, batch_id: str) -> None:
    """Bad lines run as item errors (``on_invalid=record``): their results are written
    with the items, counted failed."""
    bad = session.execute(
        select(Item.id, Item.index, Item.error, Item.queued_at)
        .where(Item.batch_id == batch_id, Item.error.is_not(None))
    ).tuples().all()
    t = now()
    insert_results(session=session, rows=[
        ResultRow(item_id=iid, batch_id=batch_id, index=idx, error=err, queued_at=qa,
                  finished_at=t, attempt=0)
        for iid, idx, err, qa in bad
    ])


def submit_batch(
    *,
    engine: Engine,
    source: IO[bytes] | Iterable[bytes],
    owner: str = LOCAL_OWNER,
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
    with_batch: Callable[[Session], None] | None = None,
    on_commit: Callable[[], None] | None = None,
    block: int = 2000,
    max_errors: int = 1000,
    model: str | None = None,
) -> IngestReport:
    """Create a batch, ingest ``source`` into it and enqueue its chunks.

    The one entry point the API and the CLI call. Atomic: the batch row, every item and
    the bad lines' results are one transaction, committed only once the whole file has
    been read, so a crash or an error midway leaves nothing behind (not even a batch
    stuck in ``validating``). ``with_batch(session)`` runs in that transaction just before
    the commit (the API stores the upload's file row with the batch), ``on_commit()``
    right after it, before anything is enqueued (the API gives the upload its final
    name). A refused file rolls back and leaves only a ``failed`` batch row naming every
    bad line; neither callback runs then, and a ``with_batch`` caller's
    ``input_file_id`` is dropped from that row (the file row it would have written is
    not there).

    ``model`` names the model for lines that name none (native lines; default the
    deployment's ``model_name``); OpenAI lines name theirs. A model unknown to the
    registry refuses the file; a known one no live worker serves is accepted and waits.

    Returns the report; the batch is ``in_progress`` (chunks enqueued),
    ``completed``/``failed`` (nothing to run), or ``failed`` with ``errors`` (refused).
    Bad ``defaults`` raise ``ValueError``.
    """
    s = settings or get_settings()
    defaults = dict(defaults or {})
    problems = check_defaults(defaults)
    if problems:
        raise ValueError("; ".join(problems))
    if enqueue is None:
        from core.celery_app import enqueue_chunk, make_celery

        app = make_celery(s)

        def enqueue(p: ChunkPayload) -> None:
            enqueue_chunk(p, app=app, settings=s)

    batch_values: dict[str, Any] = dict(
        owner=owner, endpoint=endpoint or ("/v1/completions" if fmt == "openai" else "native"),
        input_file_id=input_file_id, completion_window=completion_window,
        defaults=defaults, metadata=metadata, batch_id=batch_id or new_id("batch_"),
        model=model or s.model_name)
    final: str | None = None
    with session_scope(engine) as session:
        live = live_workers(session=session, within=s.dead_worker_after)
        known = known_models(session=session, default=s.model_name)
    # Chunks are cut for the workers that will run them: those serving this batch's model
    # (an OpenAI file names it on its lines, which only ingestion reads: all live ones then).
    serving = [w for w in live if w.model == batch_values["model"]] if fmt == "native" else live
    ingest_args: dict[str, Any] = dict(
        batch_id=batch_values["batch_id"], fmt=fmt, defaults=defaults, on_invalid=on_invalid,
        settings=s, block=block, max_errors=max_errors, workers=len(serving), known=known,
        endpoint=endpoint)
    if model is not None and model not in known:
        report = IngestReport(batch_id=batch_values["batch_id"], status=BatchStatus.FAILED,
                              errors=[LineError(0, "model", "model_not_found",
                                                f"unknown model {model!r}; known: "
                                                f"{', '.join(sorted(known))}")])
        if with_batch is not None:
            batch_values["input_file_id"] = None
        with session_scope(engine) as session:
            create_batch(session=session, fmt=fmt if fmt != "auto" else "native",
                         status=BatchStatus.FAILED,
                         errors=[e.as_dict() for e in report.errors], **batch_values)
        return report
    if on_invalid == "refuse" and hasattr(source, "seekable") and source.seekable():
        # A stored upload can be read twice: validate it all first, so that refusing a
        # file with a bad last line costs a read, not 50,000 inserts rolled back (~10 s
        # on PostgreSQL). An accepted file pays one extra read (~2 s per 50,000 lines).
        start = source.tell()
        probe = _ingest(None, source=source, **ingest_args)
        if probe.status == BatchStatus.FAILED:
            if with_batch is not None:
                batch_values["input_file_id"] = None
            with session_scope(engine) as session:
                create_batch(session=session, fmt=probe.format, status=BatchStatus.FAILED,
                             errors=[e.as_dict() for e in probe.errors], **batch_values)
            return probe
        source.seek(start)
    with session_scope(engine) as session:
        create_batch(session=session, fmt=fmt if fmt != "auto" else "native", **batch_values)
        report = _ingest(session, source=source, **ingest_args)
        if report.status == BatchStatus.FAILED:
            session.rollback()  # every item of the refused file goes; one row says why
            if with_batch is not None:
                batch_values["input_file_id"] = None
            create_batch(session=session, fmt=report.format, status=BatchStatus.FAILED,
                         errors=[e.as_dict() for e in report.errors], **batch_values)
            return report
        values: dict[str, Any] = {"request_total": report.total, "format": report.format}
        if report.model:
            values["model"] = report.model
        if endpoint is None and report.endpoint is not None:
            values["endpoint"] = report.endpoint  # the lines' url (a CLI file of chat lines)
        set_batch_status(session=session, batch_id=report.batch_id,
                         to=BatchStatus.IN_PROGRESS, from_=(BatchStatus.VALIDATING,),
                         **values)
        if report.invalid:
            _record_bad_lines(session, report.batch_id)
        final = finalize_if_done(session=session, batch_id=report.batch_id)
        if with_batch is not None:
            with_batch(session)
    if on_commit is not None:
        on_commit()
    report.status = final or BatchStatus.IN_PROGRESS
    if final:
        return report
    try:
        for start, end in report.chunks:
            enqueue(ChunkPayload(batch_id=report.batch_id, start=start, end=end,
                                 model=report.model or batch_values["model"]))
    except Exception as exc:
        # The broker is down: fail the batch rather than leave it in_progress forever.
        # Chunks already sent find a failed batch and do nothing.
        with session_scope(engine) as session:
            set_batch_status(session=session, batch_id=report.batch_id,
                             to=BatchStatus.FAILED, from_=(BatchStatus.IN_PROGRESS,),
                             errors=[{"line": None, "param": None, "code": "queue_unavailable",
                                      "message": f"could not enqueue: {exc}"}])
        report.status = BatchStatus.FAILED
        raise
    return report


def enqueue_chunks(*, batch_id: str, chunks: Iterable[tuple[int, int]], enqueue: Enqueue,
                   model: str | None = None) -> int:
    """Send chunk messages for ``chunks`` (re-enqueueing a batch by hand) to ``model``'s
    queue; returns the count."""
    n = 0
    for start, end in chunks:
        enqueue(ChunkPayload(batch_id=batch_id, start=start, end=end, model=model))
        n += 1
    return n
