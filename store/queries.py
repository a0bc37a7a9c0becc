"""Keyword-only query functions over the store: ``fn(*, session, ...)``.

Every state change that more than one process can race on is a conditional UPDATE
(``... WHERE status IN (...)``) whose row count says who won, and every result write is
an insert-if-absent whose returned ids say what was new; counters move only with rows
that were really inserted, in the same transaction. That is what turns Redis's
at-least-once delivery into exactly-once results.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from specs.status import (
    CANCELLABLE,
    EXPIRABLE,
    GONE_WORKERS,
    UNFINISHED_ITEMS,
    BatchStatus,
    ItemStatus,
    WorkerStatus,
)
from store.records import ResultRow
from store.tables import (
    Batch,
    File,
    Item,
    Result,
    Worker,
    new_id,
    now,
)

# Sampling parameters of an item travel in ``items.params``; a prompt given as token ids
# is kept there under this key (``items.prompt`` is then empty).
PROMPT_TOKEN_IDS = "prompt_token_ids"
# A chat line's messages are kept there under this key too: the worker renders them with
# its checkpoint's chat template (``items.prompt`` is then empty).
CHAT_MESSAGES = "messages"

# -------------------------------------------------------------------------------- batches


def create_batch(
    *,
    session: Session,
    owner: str,
    fmt: str = "native",
    endpoint: str = "native",
    input_file_id: str | None = None,
    completion_window: str = "24h",
    model: str | None = None,
    defaults: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    expires_in: float | None = 24 * 3600,
    batch_id: str | None = None,
    status: BatchStatus = BatchStatus.VALIDATING,
    errors: list[dict[str, Any]] | None = None,
) -> Batch:
    """Insert a batch in ``validating`` (or, refused at once, ``failed`` with ``errors``);
    not committed: the caller's transaction."""
    t = now()
    batch = Batch(
        id=batch_id or new_id("batch_"),
        owner=owner,
        status=status,
        errors=errors,
        failed_at=t if status == BatchStatus.FAILED else None,
        endpoint=endpoint,
        input_file_id=input_file_id,
        completion_window=completion_window,
        model=model,
        format=fmt,
        created_at=t,
        expires_at=t + expires_in if expires_in else None,
        defaults=dict(defaults or {}),
        metadata_=dict(metadata or {}),
        request_total=0,
        request_completed=0,
        request_failed=0,
        prompt_tokens=0,
        completion_tokens=0,
    )
    session.add(batch)
    session.flush()
    return batch


def get_batch(*, session: Session, batch_id: str, owner: str | None = None) -> Batch | None:
    """A batch by id; with ``owner``, only if it belongs to that owner."""
    batch = session.get(Batch, batch_id, populate_existing=True)
    if batch is None or (owner is not None and batch.owner != owner):
        return None
    return batch


def set_batch_status(
    *, session: Session, batch_id: str, to: BatchStatus, from_: Iterable[str],
    **values: Any
) -> bool:
    """Move a batch from one of ``from_`` to ``to`` (stamping ``<to>_at``); True if this
    call made the move. The WHERE clause is the guard: of two racing callers one wins."""
    stamp = {f"{to}_at": now()} if hasattr(Batch, f"{to}_at") else {}
    res = session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.status.in_(list(from_)))
        .values(status=to, **stamp, **values)
        .execution_options(synchronize_session=False)
    )
    return res.rowcount == 1


def request_cancel(*, session: Session, batch_id: str) -> bool:
    """Ask for a batch to be cancelled: ``validating|in_progress -> cancelling``.
    Workers see the flag within ``cancel_poll_interval`` seconds, abort the batch's
    sequences and finish the move to ``cancelled`` (:func:`finish_cancel`)."""
    return set_batch_status(session=session, batch_id=batch_id, to=BatchStatus.CANCELLING,
                            from_=CANCELLABLE)


def cancelling_batch_ids(*, session: Session) -> list[str]:
    """Batches waiting for workers to obey a cancel (an indexed lookup, polled ~1/s)."""
    return list(session.scalars(select(Batch.id).where(Batch.status == BatchStatus.CANCELLING)))


def finish_cancel(*, session: Session, batch_id: str) -> bool:
    """Mark unfinished items cancelled and move ``cancelling -> cancelled``; True if this
    call made the move. Finished results stay."""
    done = select(Result.item_id).where(Result.batch_id == batch_id)
    session.execute(
        update(Item)
        .where(Item.batch_id == batch_id, Item.status.in_(UNFINISHED_ITEMS),
               Item.id.not_in(done))
        .values(status=ItemStatus.CANCELLED)
        .execution_options(synchronize_session=False)
    )
    return set_batch_status(session=session, batch_id=batch_id, to=BatchStatus.CANCELLED,
                            from_=(BatchStatus.CANCELLING,))


def finalize_if_done(*, session: Session, batch_id: str) -> str | None:
    """If every item of an in-progress batch has a result, move it to ``finalizing`` and
    then ``completed`` (or ``failed`` when no item succeeded), exactly once: the
    conditional UPDATE lets only one of several racing workers through. Returns the final
    status if this call finalized the batch."""
    batch = session.get(Batch, batch_id, populate_existing=True)
    if batch is None or batch.status != BatchStatus.IN_PROGRESS:
        return None
    if batch.request_completed + batch.request_failed < batch.request_total:
        return None
    if not set_batch_status(session=session, batch_id=batch_id, to=BatchStatus.FINALIZING,
                            from_=(BatchStatus.IN_PROGRESS,)):
        return None
    # The output and error files are virtual (rendered from results on download); they
    # get file rows so OpenAI clients can fetch them by id.
    values: dict[str, Any] = {}
    if batch.request_completed:
        values["output_file_id"] = _virtual_file(session, batch, "output")
    if batch.request_failed:
        values["error_file_id"] = _virtual_file(session, batch, "error")
    final = BatchStatus.COMPLETED if batch.request_completed or not batch.request_total \
        else BatchStatus.FAILED
    set_batch_status(session=session, batch_id=batch_id, to=final,
                     from_=(BatchStatus.FINALIZING,),
                     **values)
    return final


def _virtual_file(session: Session, batch: Batch, kind: str) -> str:
    f = File(id=new_id("file-"), owner=batch.owner, filename=f"{batch.id}_{kind}.jsonl",
             purpose=f"batch_{kind}", bytes=0, status="processed", created_at=now(),
             path=None, batch_id=batch.id)
    session.add(f)
    session.flush()
    return f.id


# ---------------------------------------------------------------------------------- items


def chunk_items(*, session: Session, batch_id: str, start: int, end: int) -> list[Item]:
    """Items ``[start, end)`` of a batch that still need running (no result, not
    cancelled), in index order."""
    done = select(Result.item_id).where(Result.batch_id == batch_id,
                                        Result.index >= start, Result.index < end)
    return list(session.scalars(
        select(Item)
        .where(Item.batch_id == batch_id, Item.index >= start, Item.index < end,
               Item.status != ItemStatus.CANCELLED, Item.id.not_in(done))
        .order_by(Item.index)
    ))


def expire_batches(*, session: Session, at: float | None = None) -> list[str]:
    """Move batches past their ``expires_at`` (OpenAI's 24 h completion window) that no
    one finished to ``expired``; returns their ids. Workers stop their sequences (as for a
    cancel); finished results stay, unrun items are reported as ``batch_expired``."""
    t = now() if at is None else at
    due = list(session.scalars(select(Batch.id).where(
        Batch.status.in_(EXPIRABLE), Batch.expires_at.is_not(None), Batch.expires_at < t)))
    return [b for b in due if set_batch_status(session=session, batch_id=b,
                                               to=BatchStatus.EXPIRED, from_=EXPIRABLE)]


def fail_stale_validating(*, session: Session, older_than: float) -> list[str]:
    """Fail batches still ``validating`` after ``older_than`` seconds: ingestion is one
    transaction and never commits that state, so such a row is a leftover of an older
    version or a hand-made one, and nothing will ever move it on. Returns their ids."""
    stale = list(session.scalars(select(Batch.id).where(
        Batch.status == BatchStatus.VALIDATING, Batch.created_at < now() - older_than)))
    error = {"line": None, "param": None, "code": "ingest_interrupted",
             "message": "validation of the file never finished (the server stopped)"}
    return [b for b in stale if set_batch_status(
        session=session, batch_id=b, to=BatchStatus.FAILED,
        from_=(BatchStatus.VALIDATING,), errors=[error])]


# -------------------------------------------------------------------------------- results


def insert_if_absent(session: Session, table: Any, key: list[str]) -> Any:
    """An INSERT into ``table`` that skips rows whose ``key`` columns are already there
    (ON CONFLICT DO NOTHING): atomic where a read-then-insert races another writer."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=key)
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=key)
    raise NotImplementedError(f"insert-if-absent for {dialect}")


def _without_nul(value: Any) -> Any:
    """PostgreSQL text cannot hold U+0000, which a model can generate (byte 0 of a
    byte-level vocabulary, or a raw control token). Replace it with U+FFFD rather than
    failing the write forever; SQLite keeps the text exactly."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, dict):
        return {k: _without_nul(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_without_nul(v) for v in value]
    return value


def insert_results(*, session: Session, rows: Sequence[ResultRow]) -> list[int]:
    """Insert result rows whose item has none yet; return the item ids really inserted.

    In the same transaction: the inserted items' status (completed/failed) and their
    batches' counters and token sums, counted from the inserted rows only - so a result
    written twice (a redelivered chunk, two workers) is neither stored nor counted twice.
    """
    if not rows:
        return []
    values = [row.as_row() for row in rows]
    if session.get_bind().dialect.name == "postgresql":
        values = [_without_nul(v) for v in values]
    stmt = insert_if_absent(session, Result, ["item_id"]).returning(Result.item_id)
    inserted = set(session.scalars(stmt, values).all())
    if not inserted:
        return []
    per_batch: dict[str, list[int]] = {}
    ok_ids, failed_ids = [], []
    for row in rows:
        if row.item_id not in inserted:
            continue
        agg = per_batch.setdefault(row.batch_id, [0, 0, 0, 0])
        agg[1 if row.failed else 0] += 1
        agg[2] += row.prompt_tokens or 0
        agg[3] += row.completion_tokens or 0
        (failed_ids if row.failed else ok_ids).append(row.item_id)
    for status, ids in ((ItemStatus.COMPLETED, ok_ids), (ItemStatus.FAILED, failed_ids)):
        if ids:
            session.execute(update(Item).where(Item.id.in_(ids)).values(status=status)
                            .execution_options(synchronize_session=False))
    for batch_id, (ok, bad, ptok, ctok) in per_batch.items():
        session.execute(
            update(Batch).where(Batch.id == batch_id)
            .values(request_completed=Batch.request_completed + ok,
                    request_failed=Batch.request_failed + bad,
                    prompt_tokens=Batch.prompt_tokens + ptok,
                    completion_tokens=Batch.completion_tokens + ctok)
            .execution_options(synchronize_session=False)
        )
    return sorted(inserted)


def iter_results(
    *, session: Session, batch_id: str, after_index: int = -1, page: int = 1000,
    failed: bool | None = None,
) -> Iterator[tuple[Item, Result]]:
    """(item, result) pairs of a batch in input order, read in pages (a million-line
    batch is never loaded whole). ``failed`` filters on whether the result is an error."""
    last = after_index
    while True:
        q = (select(Item, Result).join(Result, Result.item_id == Item.id)
             .where(Item.batch_id == batch_id, Item.index > last)
             .order_by(Item.index).limit(page))
        if failed is True:
            q = q.where(Result.error.is_not(None))
        elif failed is False:
            q = q.where(Result.error.is_(None))
        rows = session.execute(q).tuples().all()
        yield from rows
        if len(rows) < page:
            return
        last = rows[-1][0].index


def count_items(*, session: Session, batch_id: str) -> dict[str, int]:
    """Items of a batch per status."""
    q = select(Item.status, func.count()).where(Item.batch_id == batch_id).group_by(Item.status)
    return {status: n for status, n in session.execute(q).tuples()}


# -------------------------------------------------------------------------------- workers


def register_worker(*, session: Session, worker_id: str, host: str, pid: int, model: str,
                    devices: Iterable[str], pipeline_parallel: int,
                    checkpoint: str | None = None, dtype: str | None = None) -> None:
    """Insert or refresh a worker's row at start-up: ``model`` is the name it serves,
    ``checkpoint`` and ``dtype`` what it loaded."""
    t = now()
    w = session.get(Worker, worker_id)
    if w is None:
        w = Worker(id=worker_id)
        session.add(w)
    w.host, w.pid, w.model, w.devices = host, pid, model, list(devices)
    w.pipeline_parallel, w.status = pipeline_parallel, WorkerStatus.STARTING
    w.checkpoint, w.dtype = checkpoint, dtype
    w.started_at, w.last_seen = t, t
    w.tokens_per_s, w.items_done, w.tokens_done, w.batch_rates = 0.0, 0, 0, {}


def heartbeat(*, session: Session, worker_id: str, status: str, tokens_per_s: float,
              items_done: int, tokens_done: int, prefix_cache_hit_rate: float = 0.0,
              batch_rates: dict[str, dict[str, float]] | None = None,
              warmup_seconds: float | None = None) -> None:
    """Refresh a worker's liveness, throughput (``tokens_per_s``: generated tokens/s;
    ``batch_rates``: the same per batch, with the tokens, items and token budget each has
    in flight), its engine's prefix-cache hit rate and how long its warm-up took."""
    session.execute(
        update(Worker).where(Worker.id == worker_id)
        .values(status=status, last_seen=now(), tokens_per_s=tokens_per_s,
                items_done=items_done, tokens_done=tokens_done,
                prefix_cache_hit_rate=prefix_cache_hit_rate, batch_rates=batch_rates or {},
                warmup_seconds=warmup_seconds)
        .execution_options(synchronize_session=False)
    )


# What workers report per batch (worker/meter.py), summed over workers by batch_generation.
GENERATION_FIGURES = ("tokens_per_s", "inflight_tokens", "inflight_items", "inflight_budget")


def batch_generation(*, session: Session, within: float) -> dict[str, dict[str, float]]:
    """``{batch id: {tokens_per_s, inflight_tokens, inflight_items, inflight_budget}}``
    summed over the workers alive now (heartbeat within ``within`` seconds): generated
    tokens/s, and the tokens, items and token budget in flight. Every live tokens/s
    figure reads this."""
    out: dict[str, dict[str, float]] = {}
    for w in live_workers(session=session, within=within):
        for batch_id, figures in (w.batch_rates or {}).items():
            acc = out.setdefault(batch_id, dict.fromkeys(GENERATION_FIGURES, 0.0))
            for key in GENERATION_FIGURES:
                acc[key] += float(figures.get(key) or 0.0)
    return out


def mark_lost_workers(*, session: Session, older_than: float) -> list[str]:
    """Mark ``lost`` the workers whose heartbeat stopped ``older_than`` seconds ago
    without a clean stop; returns the ids this call marked. A conditional UPDATE per
    worker: of several workers noticing the same death, one wins and acts on it."""
    cutoff = now() - older_than
    candidates = list(session.scalars(select(Worker.id).where(
        Worker.last_seen < cutoff, Worker.status.not_in(GONE_WORKERS))))
    won = []
    for wid in candidates:
        res = session.execute(
            update(Worker).where(Worker.id == wid, Worker.last_seen < cutoff,
                                 Worker.status.not_in(GONE_WORKERS))
            .values(status=WorkerStatus.LOST).execution_options(synchronize_session=False))
        if res.rowcount == 1:
            won.append(wid)
    return won


def live_workers(*, session: Session, within: float) -> list[Worker]:
    """Workers alive now: heartbeat within ``within`` seconds (``dead_worker_after``,
    the same limit after which their chunks are taken back) and not shut down."""
    return [w for w in list_workers(session=session, seen_within=within)
            if w.status not in GONE_WORKERS]


def list_workers(*, session: Session, seen_within: float | None = None) -> list[Worker]:
    """Workers, most recently seen first; optionally only those seen recently."""
    q = select(Worker).order_by(Worker.last_seen.desc())
    if seen_within is not None:
        q = q.where(Worker.last_seen >= now() - seen_within)
    return list(session.scalars(q))


__all__ = [
    "CHAT_MESSAGES", "PROMPT_TOKEN_IDS", "cancelling_batch_ids", "expire_batches",
    "fail_stale_validating",
    "chunk_items", "count_items", "create_batch", "finalize_if_done", "finish_cancel",
    "get_batch", "heartbeat", "insert_results", "iter_results",
    "list_workers", "live_workers", "mark_lost_workers", "register_worker",
    "request_cancel", "set_batch_status",
]
