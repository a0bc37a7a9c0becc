"""Item claims: which worker runs which item, so that several workers can share one chunk.

A chunk message hands a *range* of items to one worker (the holder), but the holder
claims its items a few at a time, as its engine has room, instead of all at once. Items
not claimed yet stay ``queued``; an idle worker may claim them too (the tail of a batch
is shared instead of drained by one worker while the others idle). The holder acks its
message only when every item of the range has a result, whoever ran it.

A claim is ``status = 'running'`` plus ``worker_id``, set by one conditional UPDATE
whose WHERE clause is the guard: of two workers racing for an item, one gets it (the
returned rows say which). An item may be claimed when it is

- ``queued`` (nobody runs it), or
- ``running`` for nobody (a claim from before claims existed), or for a worker that is
  no longer live (its heartbeat is older than the live window, or it stopped): a
  SIGKILLed worker's items are taken over by whoever holds their chunk.

Both kinds of claim take the costliest items first (``items.cost``: prompt + max_tokens
tokens): long items start early, and what is left for the end of a batch - the part
that idle workers share - is made of short ones. A claim may also be bounded by a token
budget (``max_cost``: what the worker's KV cache has room for), so that a worker holds
little more than its engine can run and the rest stays ``queued`` for others.

Claims are only about *who works*, never about correctness: results are insert-if-absent
(store/queries.py), so an item that two workers run (a claim taken over from a worker
that was slow, not dead) is still stored and counted once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.orm import Session

from specs.status import NOT_READY, UNFINISHED_ITEMS, BatchStatus, ItemStatus, WorkerStatus
from store.tables import Batch, Item, Worker, now

# Columns of a claimed item: what a worker needs to run it, without a second query.
ClaimedItem = tuple[int, str, int, str, dict, float, int, int]  # id, batch, index,
#                                                 prompt, params, queued_at, attempts, cost
_CLAIMED_COLUMNS = (Item.id, Item.batch_id, Item.index, Item.prompt, Item.params,
                    Item.queued_at, Item.attempts, Item.cost)


def live_worker_ids(live_within: float) -> ColumnElement:
    """A subquery of the ids of workers seen within ``live_within`` seconds, not stopped."""
    return select(Worker.id).where(
        Worker.last_seen >= now() - live_within,
        Worker.status.not_in((WorkerStatus.STOPPED, WorkerStatus.LOST))).scalar_subquery()


def _claimable(live_within: float) -> ColumnElement[bool]:
    return or_(Item.status == ItemStatus.QUEUED,
               and_(Item.status == ItemStatus.RUNNING,
                    or_(Item.worker_id.is_(None),
                        Item.worker_id.not_in(live_worker_ids(live_within)))))


def _claim(session: Session, candidates: Any, worker_id: str, live_within: float,
           max_cost: int | None) -> list[ClaimedItem]:
    """Claim the ``candidates`` (a SELECT of item id and cost, in the order to take
    them) - only as many as fit in ``max_cost`` tokens, but at least one. Returns the
    claimed items in that order."""
    rows = session.execute(candidates).tuples().all()
    ids, total = [], 0
    for item_id, cost in rows:
        if max_cost is not None and ids and total + cost > max_cost:
            break
        ids.append(item_id)
        total += cost
    if not ids:
        return []
    # The WHERE is evaluated again on each row at UPDATE time (PostgreSQL re-checks rows
    # another transaction changed meanwhile; SQLite runs one writer at a time), so an
    # item that someone else claimed between the SELECT and the UPDATE is skipped.
    got = session.execute(
        update(Item).where(Item.id.in_(ids), _claimable(live_within))
        .values(status=ItemStatus.RUNNING, worker_id=worker_id, attempts=Item.attempts + 1)
        .returning(*_CLAIMED_COLUMNS)
        .execution_options(synchronize_session=False)
    ).tuples().all()
    order = {item_id: i for i, item_id in enumerate(ids)}
    return sorted((tuple(r) for r in got), key=lambda r: order[r[0]])  # type: ignore[misc]


def claim_range(*, session: Session, batch_id: str, start: int, end: int, worker_id: str,
                limit: int, live_within: float, max_cost: int | None = None,
                ) -> list[ClaimedItem]:
    """Claim up to ``limit`` claimable items of ``[start, end)`` (and no more than
    ``max_cost`` tokens of them, but at least one), costliest first, then lowest index."""
    candidates = (select(Item.id, Item.cost)
                  .where(Item.batch_id == batch_id, Item.index >= start, Item.index < end,
                         _claimable(live_within))
                  .order_by(Item.cost.desc(), Item.index).limit(limit))
    return _claim(session, candidates, worker_id, live_within, max_cost)


def claim_unstarted(*, session: Session, worker_id: str, limit: int,
                    live_within: float, batches: ColumnElement[bool] | None = None,
                    max_cost: int | None = None) -> list[ClaimedItem]:
    """For an idle worker: claim up to ``limit`` queued items (and no more than
    ``max_cost`` tokens of them, but at least one) of running batches, oldest batch first,
    costliest first, then from the end of the batch backwards - the items the holders
    of its chunks would reach last. Items of a dead worker are left to the holders of
    their chunks, which notice them when their own part is done. ``batches``: a
    condition on the batches it may take from (those of the model it serves,
    store/registry.py)."""
    q = select(Batch.id).where(Batch.status == BatchStatus.IN_PROGRESS)
    if batches is not None:
        q = q.where(batches)
    batch_ids = list(session.scalars(q.order_by(Batch.created_at)))
    got: list[ClaimedItem] = []
    for batch_id in batch_ids:
        candidates = (select(Item.id, Item.cost)
                      .where(Item.batch_id == batch_id, Item.status == ItemStatus.QUEUED)
                      .order_by(Item.cost.desc(), Item.index.desc())
                      .limit(limit - len(got)))
        left = None if max_cost is None else max_cost - sum(c[7] for c in got)
        if left is not None and left <= 0:
            break
        got += _claim(session, candidates, worker_id, live_within, left)
        if len(got) >= limit:
            break
    return got


def unfinished_in_range(*, session: Session, batch_id: str, start: int, end: int) -> int:
    """Items of ``[start, end)`` still without a result (queued or running anywhere)."""
    return session.scalar(select(func.count()).select_from(Item).where(
        Item.batch_id == batch_id, Item.index >= start, Item.index < end,
        Item.status.in_(UNFINISHED_ITEMS))) or 0


def fair_share(*, session: Session, batch_id: str | None, live_within: float,
               status: ItemStatus | None = None) -> int:
    """One live worker's share of a batch's unfinished items (all running batches' when
    ``batch_id`` is None; only items in ``status`` if given): the most it should hold at
    once, so that a batch smaller than one engine's capacity still spreads over every
    worker instead of filling the first one to claim."""
    # Workers still loading or warming up take no work yet: they get their share once
    # they are ready.
    live = session.scalar(select(func.count()).select_from(Worker).where(
        Worker.id.in_(live_worker_ids(live_within)),
        Worker.status.not_in(NOT_READY))) or 1
    q = select(func.count()).select_from(Item).where(
        Item.status.in_([status] if status else UNFINISHED_ITEMS))
    if batch_id is None:
        q = q.where(Item.batch_id.in_(select(Batch.id).where(
            Batch.status == BatchStatus.IN_PROGRESS)))
    else:
        q = q.where(Item.batch_id == batch_id)
    return -(-(session.scalar(q) or 0) // live)


def release_items(*, session: Session, item_ids: Sequence[int], worker_id: str,
                  uncount: bool = False) -> int:
    """Give claims back (the items go back to ``queued``) for items this worker claimed
    and did not finish. ``uncount``: the attempt did not fail (the worker handed the item
    back on shutdown), so it does not count against ``max_attempts``."""
    if not item_ids:
        return 0
    values: dict = {"status": ItemStatus.QUEUED, "worker_id": None}
    if uncount:
        values["attempts"] = Item.attempts - 1
    res = session.execute(
        update(Item).where(Item.id.in_(list(item_ids)), Item.worker_id == worker_id,
                           Item.status == ItemStatus.RUNNING)
        .values(**values).execution_options(synchronize_session=False))
    return res.rowcount or 0


def release_worker(*, session: Session, worker_id: str, uncount: bool = False) -> int:
    """Give back every claim ``worker_id`` holds on unfinished items: a worker stopping
    (``uncount``: it handed its work back) or starting again under the same id."""
    values: dict = {"status": ItemStatus.QUEUED, "worker_id": None}
    if uncount:
        values["attempts"] = Item.attempts - 1
    res = session.execute(
        update(Item).where(Item.worker_id == worker_id, Item.status == ItemStatus.RUNNING)
        .values(**values).execution_options(synchronize_session=False))
    return res.rowcount or 0


__all__ = ["ClaimedItem", "claim_range", "claim_unstarted", "fair_share", "live_worker_ids",
           "release_items", "release_worker", "unfinished_in_range"]
