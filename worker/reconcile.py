"""Re-enqueue work whose message was lost: the store is the source of truth.

Redis's transport takes a message off the queue (BRPOP) and only then records it in the
"unacked" hash; a worker killed between the two loses that message for good (no
visibility timeout can bring back what was never recorded). The test that SIGKILLs a
worker hits that window whenever the kill lands as a chunk is being fetched.

So every worker, every ``reconcile_interval`` seconds (one at a time, under a Redis
lock), compares the store with the broker: item ranges of in-progress batches that still
need running (no result, queued or running) but that no chunk message covers - neither
waiting in the queue nor held unacknowledged by a worker - are enqueued again. A range
must be uncovered in two looks a second apart, so a message in flight between BRPOP and
the unacked hash (milliseconds) is not mistaken for a lost one. Re-enqueueing is safe
even when wrong: results are insert-if-absent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import ColumnElement, Engine, select

from core.payloads import ChunkPayload
from core.settings import Settings
from specs.status import UNFINISHED_ITEMS, BatchStatus
from store.db import session_scope
from store.registry import batches_for
from store.tables import Batch, Item, Result
from worker.broker import Range, broker_chunks

log = logging.getLogger("neoxq.worker")

def _runs(indexes: Iterable[int]) -> list[Range]:
    """Maximal runs of consecutive indexes as [start, end) ranges."""
    runs: list[Range] = []
    for i in indexes:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _outside(indexes: Iterable[int], ranges: list[Range]) -> list[int]:
    """The sorted ``indexes`` that no range covers (one pass over both, sorted)."""
    ranges = sorted(ranges)
    out, k, reach = [], 0, -1  # reach: end of the covered span seen so far
    for i in indexes:
        while k < len(ranges) and ranges[k][0] <= i:
            reach = max(reach, ranges[k][1])
            k += 1
        if i >= reach:
            out.append(i)
    return out


def uncovered(db: Engine, covered: dict[str, list[Range]],
              batches: ColumnElement[bool] | None = None) -> dict[str, list[Range]]:
    """Per in-progress batch (of those ``batches`` selects), the item ranges that need
    running and no message covers."""
    out: dict[str, list[Range]] = {}
    with session_scope(db) as session:
        q = select(Batch.id).where(Batch.status == BatchStatus.IN_PROGRESS)
        if batches is not None:
            q = q.where(batches)
        batch_ids = list(session.scalars(q))
        for batch_id in batch_ids:
            done = select(Result.item_id).where(Result.batch_id == batch_id)
            indexes = session.scalars(
                select(Item.index).where(Item.batch_id == batch_id,
                                         Item.status.in_(UNFINISHED_ITEMS),
                                         Item.id.not_in(done)).order_by(Item.index))
            missing = _outside(indexes, covered.get(batch_id, []))
            if missing:
                out[batch_id] = _runs(missing)
    return out


def reconcile(db: Engine, r: Any, settings: Settings,
              enqueue: Callable[[ChunkPayload], None], *, settle: float = 1.0,
              model: str | None = None) -> int:
    """One sweep; returns how many chunk messages were sent again. With ``model``, only
    that model's batches, whose messages live on ``settings.queue`` (a worker's settings
    name its model's queue); their messages are sent again with the model, so to that
    queue."""
    batches = batches_for(model, settings.model_name) if model else None
    first = uncovered(db, broker_chunks(r, settings), batches)
    if not first:
        return 0
    time.sleep(settle)
    second = uncovered(db, broker_chunks(r, settings), batches)
    sent = 0
    for batch_id, ranges in second.items():
        before = set(first.get(batch_id, []))
        for start, end in ranges:
            if (start, end) not in before:
                continue  # appeared since the first look: give it another sweep
            for s in range(start, end, settings.chunk_items):
                enqueue(ChunkPayload(batch_id=batch_id, start=s,
                                     end=min(end, s + settings.chunk_items), model=model))
                sent += 1
            log.warning("batch %s: items [%d, %d) had no message; enqueued again",
                        batch_id, start, end)
    return sent


def reconcile_locked(db: Engine, r: Any, settings: Settings,
                     enqueue: Callable[[ChunkPayload], None], *,
                     model: str | None = None) -> int:
    """:func:`reconcile` under a Redis lock, so workers take turns rather than all
    sweeping (and re-enqueueing) at once; one lock per queue, since each model's workers
    sweep their own model's batches."""
    key = f"{settings.redis_key_prefix}neoxq:reconcile:{settings.queue}"
    if not r.set(key, "1", nx=True, ex=max(5, int(settings.reconcile_interval))):
        return 0
    return reconcile(db, r, settings, enqueue, model=model)
