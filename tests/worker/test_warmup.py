"""A worker warms its engine up before it consumes anything, heartbeating meanwhile, and
the warm-up changes no result (real worker subprocesses, real Redis and SQLite)."""

from __future__ import annotations

import time

import redis
from sqlalchemy import func, select

from store.db import session_scope
from store.tables import Item, Worker
from tests.worker.conftest import direct_texts, greedy_lines

READY = ("running", "idle", "busy")


def _observe(c, wid: str, timeout: float = 120) -> list[tuple[str, int, int]]:
    """(status, messages still queued, items claimed) samples from the worker's first
    heartbeat until it is ready."""
    r = redis.Redis.from_url(c.settings.redis_url)
    key = c.settings.redis_key_prefix + c.settings.queue
    samples: list[tuple[str, int, int]] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with session_scope(c.db) as s:
                w = s.get(Worker, wid)
                status = w.status if w is not None else None
                claimed = s.scalar(select(func.count()).select_from(Item)
                                   .where(Item.worker_id.is_not(None))) or 0
            if status is not None:
                samples.append((status, r.llen(key), claimed))
                if status in READY:
                    return samples
            time.sleep(0.005)
    finally:
        r.close()
    raise AssertionError(f"worker {wid} not ready after {timeout}s: {samples[-5:]}")


def test_warm_up_before_the_first_chunk(sqlite_cluster, direct_engine) -> None:
    # A short heartbeat so the warm-up spans a few: a warming worker must stay alive.
    c = sqlite_cluster(chunk_items=10, heartbeat_interval=0.05)
    # Sampled (seeded) and greedy lines: the results equal a cold engine's.
    greedy = greedy_lines(20, max_tokens=10)
    sampled = [{**x, "custom_id": f"s{i}", "temperature": 0.9, "seed": 100 + i}
               for i, x in enumerate(greedy_lines(10, max_tokens=10))]
    report = c.submit(greedy + sampled)  # queued before any worker exists
    n_chunks = len(report.chunks)
    proc = c.start_worker("wW", "--max-num-seqs", "64")
    samples = _observe(c, "wW")
    statuses = [s for s, _, _ in samples]
    assert "warming" in statuses, statuses
    # Nothing consumed or claimed until the warm-up ended.
    for status, queued, claimed in samples:
        if status in ("starting", "warming"):
            assert (queued, claimed) == (n_chunks, 0), samples
    b = c.wait_done(report.batch_id)
    assert b.status == "completed"
    texts = [r.text for r in c.results(report.batch_id)]
    assert texts[:20] == direct_texts(direct_engine, greedy)
    from models.sampling import SamplingParams

    expect = direct_engine.generate(
        [x["prompt"] for x in sampled],
        [SamplingParams(temperature=0.9, max_tokens=10, ignore_eos=True, seed=x["seed"])
         for x in sampled])
    assert texts[20:] == [o.samples[0].text for o in expect]
    with session_scope(c.db) as s:
        w = s.get(Worker, "wW")
        assert w.warmup_seconds is not None and w.warmup_seconds > 0
    log = c.log(proc)
    warm_at = log.index("warm-up ")
    assert warm_at < log.index("received"), log[-3000:]  # Celery took its first message after
    assert log.index("warming up the engine") < warm_at

