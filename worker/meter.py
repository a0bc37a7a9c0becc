"""Generated tokens per second, counted by the worker as its engine generates them.

This is the one definition of "tokens/s" that every figure neoxq shows is built from (a
batch's status and the CLI's progress bar, the dashboard, ``/metrics``): tokens that
sequences generated, in-flight ones included, over the last :data:`RATE_WINDOW` seconds.
Synchronous (interactive) requests count in the worker's figure; they belong to no batch.
Counting results when they are stored instead makes the figure lag, spike when many
items finish together, and read near zero while long items are still generating.

Pure Python (no torch, no database): the engine loop feeds it what the engine reports,
the heartbeat reads it and stores the figures with the worker's row.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

# Seconds of generation a rate covers: long enough to smooth over engine steps and
# heartbeats (5 s apart), short enough that the figure follows a batch's tail.
RATE_WINDOW = 10.0
# Tokens are added up in buckets of this many seconds (the window's resolution).
BUCKET = 0.25


@dataclass(frozen=True)
class BatchFigures:
    """One batch's share of a worker's generation."""

    tokens_per_s: float  # generated tokens/s over the window
    inflight_tokens: int  # tokens generated so far by its unfinished requests
    inflight_items: int = 0  # its unfinished requests
    inflight_budget: int = 0  # the most tokens those may generate (max_tokens x n)


@dataclass(frozen=True)
class MeterSnapshot:
    tokens_per_s: float  # all of this worker's generation
    tokens_generated: int  # since the worker started
    batches: dict[str, BatchFigures] = field(default_factory=dict)

    def batch_rates(self) -> dict[str, dict[str, float]]:
        """The JSON the worker's heartbeat stores: ``{batch_id: {"tokens_per_s",
        "inflight_tokens"}}``."""
        return {b: {"tokens_per_s": round(f.tokens_per_s, 3),
                    "inflight_tokens": f.inflight_tokens, "inflight_items": f.inflight_items,
                    "inflight_budget": f.inflight_budget} for b, f in self.batches.items()}


class GenerationMeter:
    """Cumulative generated tokens, per batch and in all, and their rates over a window.

    ``track`` a request when it enters the engine, ``observe`` the engine's
    ``generated_tokens()`` now and then, ``finish`` a request with its final count (or
    ``forget`` it); :meth:`snapshot` gives the rates. Thread-safe: the engine loop feeds
    it, the heartbeat thread reads it.

    A rate is the tokens counted in the last ``window`` seconds over the time they span:
    the window, or less when the generation (of the worker, of the batch) began within
    it — so a batch that started 2 s ago shows its real pace, not a fifth of it, and a
    worker that stopped generating decays to 0 within one window.
    """

    def __init__(self, window: float = RATE_WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._batch_of: dict[str, str | None] = {}  # request id -> batch id (None: none)
        self._seen: dict[str, int] = {}  # request id -> tokens counted so far
        self._budget: dict[str, int] = {}  # request id -> the most tokens it may generate
        self._total = 0
        # (start time, tokens, {batch id: tokens}) per BUCKET seconds with tokens, oldest first
        self._buckets: deque[tuple[float, list[int], dict[str, int]]] = deque()

    def track(self, request_id: str, batch_id: str | None, budget: int = 0) -> None:
        """A request of ``batch_id`` entered the engine; it may generate ``budget`` tokens
        at most (its max_tokens times its samples). ``None``: a request of no batch (a
        synchronous one), counted in the worker's figures only."""
        with self._lock:
            self._batch_of[request_id] = batch_id
            self._seen.setdefault(request_id, 0)
            self._budget[request_id] = budget

    def observe(self, generated: Mapping[str, int]) -> None:
        """The engine's tokens-so-far of its unfinished requests (untracked ones ignored)."""
        with self._lock:
            for rid, n in generated.items():
                if rid in self._batch_of:
                    self._add(rid, n)

    def finish(self, request_id: str, total: int) -> None:
        """A request ended having generated ``total`` tokens (aborted ones too: the work
        was done)."""
        with self._lock:
            if request_id in self._batch_of:
                self._add(request_id, total)
            self._drop(request_id)

    def forget(self, request_id: str) -> None:
        """A request left without a final count (its tokens so far stay counted)."""
        with self._lock:
            self._drop(request_id)

    def snapshot(self) -> MeterSnapshot:
        """The rates now, and each batch's tokens in flight."""
        with self._lock:
            now = self._clock()
            self._prune(now)
            total, per, first = 0, {}, {}
            for start, tokens, by_batch in self._buckets:
                total += tokens[0]
                for b, n in by_batch.items():
                    per[b] = per.get(b, 0) + n
                    first.setdefault(b, start)
            inflight: dict[str, list[int]] = {}  # batch -> [tokens, items, budget]
            for rid, n in self._seen.items():
                of = self._batch_of[rid]
                if of is None:
                    continue
                acc = inflight.setdefault(of, [0, 0, 0])
                acc[0] += n
                acc[1] += 1
                acc[2] += self._budget.get(rid, 0)

            def rate(tokens: int, since: float | None) -> float:
                if not tokens or since is None:
                    return 0.0
                return tokens / max(now - since, BUCKET)

            since_all = self._buckets[0][0] if self._buckets else None
            batches = {b: BatchFigures(rate(per.get(b, 0), first.get(b)),
                                       *inflight.get(b, (0, 0, 0)))
                       for b in set(per) | set(inflight)}
            return MeterSnapshot(rate(total, since_all), self._total, batches)

    # -- internals (the lock is held) ---------------------------------------------------

    def _add(self, rid: str, n: int) -> None:
        delta = n - self._seen.get(rid, 0)
        if delta <= 0:
            return
        self._seen[rid] = n
        self._total += delta
        now = self._clock()
        if not self._buckets or now - self._buckets[-1][0] >= BUCKET:
            self._buckets.append((now, [0], {}))
            self._prune(now)
        _, tokens, by_batch = self._buckets[-1]
        tokens[0] += delta
        b = self._batch_of[rid]
        if b is not None:
            by_batch[b] = by_batch.get(b, 0) + delta

    def _drop(self, rid: str) -> None:
        self._seen.pop(rid, None)
        self._budget.pop(rid, None)
        self._batch_of.pop(rid, None)

    def _prune(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] < now - self.window:
            self._buckets.popleft()
