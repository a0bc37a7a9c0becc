"""Read-only figures for the dashboard: tokens/s over time and a batch's timing
distribution. Keyword-only functions ``fn(*, session, ...)``, scoped to an owner.

Both read only recent or one batch's result rows through the ``(batch_id, index)`` index,
never the whole results table: a dashboard polling every second must stay cheap on a
store holding millions of results.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from specs.status import ACTIVE
from store.tables import Batch, Result, now


def throughput_series(*, session: Session, owner: str, window: float = 600.0,
                      step: float = 5.0) -> list[dict[str, float]]:
    """Generated tokens/s and finished items/s of ``owner``'s batches in ``step``-second
    buckets over the last ``window`` seconds (oldest first; empty buckets included, as
    zeros).

    Each result's tokens are spread over the time they were generated (first token to
    finish), not piled on the moment it was stored: many items finishing together make no
    spike, and the curve means what the live figure means (worker/meter.py). Items still
    generating join the curve when they finish."""
    t_now = now()
    since = t_now - window
    batch_ids = list(session.scalars(
        select(Batch.id).where(Batch.owner == owner, or_(
            Batch.status.in_(ACTIVE), Batch.completed_at >= since, Batch.failed_at >= since,
            Batch.cancelled_at >= since))))
    n = max(1, int(math.ceil(window / step)))
    start = t_now - n * step
    tokens = [0.0] * n
    items = [0.0] * n

    def bucket(t: float) -> int:
        return min(n - 1, max(0, int((t - start) // step)))

    for i in range(0, len(batch_ids), 500):  # bounded IN lists
        rows = session.execute(
            select(Result.first_token_at, Result.started_at, Result.finished_at,
                   Result.completion_tokens)
            .where(Result.batch_id.in_(batch_ids[i:i + 500]), Result.finished_at >= start)
        ).tuples()
        for first, started, finished, count in rows:
            items[bucket(finished)] += 1
            if not count:
                continue
            begin = max(first or started or finished, start)
            span = finished - begin
            if span <= 0:
                tokens[bucket(finished)] += count
                continue
            # The share of [begin, finished] each bucket it crosses holds (begin is clipped
            # to the window, so a long item counts only its part inside).
            full = finished - (first or started or finished)
            rate = count / full if full > 0 else 0.0
            b = bucket(begin)
            while b < n:
                lo = max(begin, start + b * step)
                hi = min(finished, start + (b + 1) * step)
                if hi > lo:
                    tokens[b] += rate * (hi - lo)
                if start + (b + 1) * step >= finished:
                    break
                b += 1
    return [{"t": start + (b + 1) * step, "tokens_per_s": tokens[b] / step,
             "items_per_s": items[b] / step} for b in range(n)]


def _histogram(values: list[float], bins: int = 20) -> dict[str, Any]:
    """Equal-width bins over [min, max] plus percentiles; empty input gives empty bins."""
    if not values:
        return {"count": 0, "edges": [], "counts": [], "p50": None, "p90": None, "p99": None,
                "mean": None, "min": None, "max": None}
    values = sorted(values)
    lo, hi = values[0], values[-1]
    width = (hi - lo) / bins if hi > lo else 1.0
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - lo) / width))] += 1

    def pct(q: float) -> float:
        return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))]

    return {"count": len(values), "edges": [lo + i * width for i in range(bins + 1)],
            "counts": counts, "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
            "mean": sum(values) / len(values), "min": lo, "max": hi}


def batch_timings(*, session: Session, batch_id: str, limit: int = 20_000,
                  bins: int = 20) -> dict[str, Any]:
    """Distributions over a batch's results (up to the ``limit`` most recent in input
    order): queue wait, time to first token, generation time, per-item tokens/s and
    completion length. Seconds, except tokens/s and tokens."""
    rows = session.execute(
        select(Result.queued_at, Result.started_at, Result.first_token_at, Result.finished_at,
               Result.tokens_per_s, Result.completion_tokens, Result.error,
               Result.worker_id)
        .where(Result.batch_id == batch_id).order_by(Result.index.desc()).limit(limit)
    ).tuples().all()
    wait: list[float] = []
    first: list[float] = []
    duration: list[float] = []
    rate: list[float] = []
    length: list[float] = []
    workers: dict[str, int] = {}
    for queued, started, first_tok, finished, tps, completion, error, worker in rows:
        if error:
            continue
        if queued and started:
            wait.append(max(0.0, started - queued))
        if started and first_tok:
            first.append(max(0.0, first_tok - started))
        if started and finished:
            duration.append(max(0.0, finished - started))
        if tps:
            rate.append(float(tps))
        length.append(float(completion or 0))
        if worker:
            workers[worker] = workers.get(worker, 0) + 1
    return {"sampled": len(rows), "limit": limit, "workers": workers,
            "queue_wait_s": _histogram(wait, bins), "first_token_s": _histogram(first, bins),
            "duration_s": _histogram(duration, bins), "tokens_per_s": _histogram(rate, bins),
            "completion_tokens": _histogram(length, bins)}
