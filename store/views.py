"""What the API reads (and the few file-object writes it makes): keyword-only functions
``fn(*, session, ...)`` over the tables, always scoped to an owner.

Listings are newest first with an ``after`` cursor (an id), as OpenAI lists are; results
are read in input order in pages, so a million-line batch is streamed, never loaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from specs.status import CUT_SHORT
from store.queries import iter_results
from store.tables import Batch, File, FineTuningJob, Item, Result, new_id, now


def _page(session: Session, model: type, q, *, owner: str, after: str | None, limit: int,
          ascending: bool = False) -> tuple[list, bool]:
    """Newest-first (or oldest-first) page of ``q`` after the row with id ``after``."""
    if after:
        cursor = session.get(model, after)
        if cursor is None or cursor.owner != owner:
            return [], False
        if ascending:
            q = q.where(or_(model.created_at > cursor.created_at,
                            and_(model.created_at == cursor.created_at, model.id > after)))
        else:
            q = q.where(or_(model.created_at < cursor.created_at,
                            and_(model.created_at == cursor.created_at, model.id < after)))
    order = (model.created_at.asc(), model.id.asc()) if ascending else (
        model.created_at.desc(), model.id.desc())
    rows = list(session.scalars(q.order_by(*order).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


# -------------------------------------------------------------------------------- batches


def list_batches(*, session: Session, owner: str, after: str | None = None,
                 limit: int = 20) -> tuple[list[Batch], bool]:
    """An owner's batches, newest first; returns ``(page, has_more)``."""
    q = select(Batch).where(Batch.owner == owner)
    return _page(session, Batch, q, owner=owner, after=after, limit=limit)


def iter_batch_results(*, session: Session, batch_id: str, failed: bool | None = None,
                       page: int = 500) -> Iterator[tuple[Item, Result]]:
    """(item, result) pairs in input order, read ``page`` rows at a time; ``failed``
    True gives only errors, False only successes, None both (as
    :func:`store.queries.iter_results`, in smaller pages)."""
    return iter_results(session=session, batch_id=batch_id, failed=failed, page=page)


def iter_unrun_items(*, session: Session, batch_id: str, page: int = 500) -> Iterator[Item]:
    """Items without a result (cancelled or expired before they ran), in input order."""
    last = -1
    done = select(Result.item_id).where(Result.batch_id == batch_id)
    while True:
        rows = list(session.scalars(
            select(Item).where(Item.batch_id == batch_id, Item.index > last,
                               Item.id.not_in(done))
            .order_by(Item.index).limit(page)))
        yield from rows
        if len(rows) < page:
            return
        last = rows[-1].index


def count_unrun(*, session: Session, batch_id: str) -> int:
    """How many items of a batch have no result."""
    done = select(Result.item_id).where(Result.batch_id == batch_id)
    return session.scalar(select(func.count()).select_from(Item).where(
        Item.batch_id == batch_id, Item.id.not_in(done))) or 0


def ensure_result_files(*, session: Session, batch: Batch) -> Batch:
    """Give a cancelled or expired batch the virtual output/error files a completed one
    gets at finalization (OpenAI's cancelled batches have them too). Idempotent: the
    conditional UPDATE keeps the first id if two requests race."""
    if batch.status not in CUT_SHORT:
        return batch
    wants = {"output": batch.request_completed > 0 and not batch.output_file_id,
             "error": not batch.error_file_id and (
                 batch.request_failed > 0 or batch.request_total > batch.request_completed)}
    for kind, want in wants.items():
        if not want:
            continue
        column = Batch.output_file_id if kind == "output" else Batch.error_file_id
        f = create_file(session=session, owner=batch.owner, filename=f"{batch.id}_{kind}.jsonl",
                        purpose=f"batch_{kind}", size=0, path=None, batch_id=batch.id)
        res = session.execute(update(Batch).where(Batch.id == batch.id, column.is_(None))
                              .values({column: f.id})
                              .execution_options(synchronize_session=False))
        if res.rowcount != 1:
            session.delete(f)
    session.flush()
    return session.get(Batch, batch.id, populate_existing=True) or batch


# ---------------------------------------------------------------------------------- files


def create_file(*, session: Session, owner: str, filename: str, purpose: str, size: int,
                path: str | None, batch_id: str | None = None, file_id: str | None = None
                ) -> File:
    """Insert a file object (content at ``path``, or virtual when ``path`` is None)."""
    f = File(id=file_id or new_id("file-"), owner=owner, filename=filename, purpose=purpose,
             bytes=size, status="processed", created_at=now(), path=path, batch_id=batch_id)
    session.add(f)
    session.flush()
    return f


def get_file(*, session: Session, file_id: str, owner: str) -> File | None:
    """A file object by id, only if ``owner`` owns it."""
    f = session.get(File, file_id)
    return f if f is not None and f.owner == owner else None


def list_files(*, session: Session, owner: str, purpose: str | None = None,
               after: str | None = None, limit: int = 20, ascending: bool = False
               ) -> tuple[list[File], bool]:
    """An owner's files, newest first (or oldest first); returns ``(page, has_more)``."""
    q = select(File).where(File.owner == owner)
    if purpose:
        q = q.where(File.purpose == purpose)
    return _page(session, File, q, owner=owner, after=after, limit=limit, ascending=ascending)


def delete_file(*, session: Session, file_id: str, owner: str) -> bool:
    """Delete a file object and its stored content; True if it existed."""
    f = get_file(session=session, file_id=file_id, owner=owner)
    if f is None:
        return False
    if f.path:
        Path(f.path).unlink(missing_ok=True)
    session.delete(f)
    session.flush()
    return True


# ------------------------------------------------------------------------ fine-tuning


def list_jobs(*, session: Session, owner: str, after: str | None = None,
              limit: int = 20) -> tuple[list[FineTuningJob], bool]:
    """An owner's fine-tuning jobs, newest first; returns ``(page, has_more)``."""
    q = select(FineTuningJob).where(FineTuningJob.owner == owner)
    return _page(session, FineTuningJob, q, owner=owner, after=after, limit=limit)
