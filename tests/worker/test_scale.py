"""Several workers on one batch: an even spread from the start (chunks cut for the live
fleet) and a shared tail (idle workers claim queued items of chunks others hold), with
every item stored exactly once. Real worker subprocesses, Redis and PostgreSQL."""

from __future__ import annotations

import collections

import pytest
from sqlalchemy import func, select

from store.db import session_scope
from store.tables import Item, Worker
from tests.worker.conftest import greedy_lines
from tests.worker.test_worker import assert_exactly_once


def wait_registered(c, n: int) -> None:
    def ready() -> bool:
        with session_scope(c.db) as s:
            return (s.scalar(select(func.count()).select_from(Worker)
                             .where(Worker.status.in_(("running", "idle", "busy")))) or 0) >= n
    c.wait_for(ready, 180, f"{n} workers to register", every=0.2)


@pytest.mark.slow
def test_four_workers_share_one_batch_evenly(pg_cluster) -> None:
    # 4 workers x 3 chunks each: the batch is cut into 12 chunks, not the 2 that
    # chunk_items alone would give; a small in-flight window leaves queued items for
    # whichever worker frees up first.
    c = pg_cluster(chunk_items=200, worker_concurrency=3, worker_max_in_flight=6)
    for i in range(4):
        # One thread each: four workers share this machine's cores evenly only if none
        # starts more threads than its share.
        c.start_worker(f"w{i}", OMP_NUM_THREADS=1)
    wait_registered(c, 4)
    report = c.submit(greedy_lines(240, max_tokens=16))
    assert len(report.chunks) == 12
    results = assert_exactly_once(c, report, 240)
    share = collections.Counter(r.worker_id for r in results)
    assert set(share) == {"w0", "w1", "w2", "w3"}, share
    even = 240 / 4
    assert all(0.75 * even <= n <= 1.25 * even for n in share.values()), share
    print(f"items per worker: {dict(share)}")


@pytest.mark.slow
def test_idle_worker_joins_a_running_batch_tail(pg_cluster) -> None:
    # One worker takes the whole batch (two chunks, both held at once); a second worker
    # that starts while it runs finds the queue empty and claims queued items of those
    # chunks instead of idling.
    # (4 sequences at a time: slow enough that the batch is far from done when the second
    # worker has loaded its model on a busy machine)
    c = pg_cluster(chunk_items=100, worker_concurrency=2, worker_max_in_flight=4)
    c.start_worker("first", OMP_NUM_THREADS=1)
    wait_registered(c, 1)
    report = c.submit(greedy_lines(200, max_tokens=32))
    assert len(report.chunks) == 2
    c.wait_for(lambda: c.n_results(report.batch_id) >= 4, 90, "the first results")
    late = c.start_worker("late", OMP_NUM_THREADS=1)
    wait_registered(c, 2)
    left = 200 - c.n_results(report.batch_id)
    assert left >= 40, "the batch was nearly done before the second worker came up"
    results = assert_exactly_once(c, report, 200)
    share = collections.Counter(r.worker_id for r in results)
    # Two workers of the same speed: it should run about half of what was left.
    assert share["late"] >= 0.3 * left, (share, left)
    print(f"late worker: {share['late']} of the {left} items left when it came up")
    assert "sharing the tail" in c.log(late)
    with session_scope(c.db) as s:  # every claim ended with a result
        assert s.scalar(select(func.count()).select_from(Item)
                        .where(Item.status != "completed")) == 0


def test_the_longest_items_start_first(pg_cluster) -> None:
    # One worker running 4 sequences at a time claims a few items of its chunk at a time:
    # each claim takes the costliest left (prompt + max_tokens), so items start in that
    # order and the batch ends with its shortest ones.
    c = pg_cluster(worker_concurrency=1, chunk_items=100)
    c.start_worker("w", "--max-num-seqs", "4", OMP_NUM_THREADS=1)
    wait_registered(c, 1)
    lines = [{"custom_id": f"r{i}", "prompt": "The same prompt for each", "temperature": 0,
              "max_tokens": 4 + (i * 17) % 40, "ignore_eos": True} for i in range(32)]
    report = c.submit(lines)
    assert len(report.chunks) == 1
    results = assert_exactly_once(c, report, 32)
    with session_scope(c.db) as s:
        cost = dict(s.execute(select(Item.index, Item.cost)
                              .where(Item.batch_id == report.batch_id)).tuples().all())
    assert len(set(cost.values())) > 20
    order = sorted(results, key=lambda r: (-cost[r.index], r.index))
    started = [r.started_at for r in order]
    assert all(a <= b for a, b in zip(started, started[1:], strict=False)), [
        (r.index, cost[r.index], round(r.started_at - started[0], 2)) for r in order]
