"""Recovery with the settings a deployment gets by default (no test-sized timeouts):
a SIGKILLed worker's chunks come back within a minute because its heartbeats stop, not
after the hour-long visibility timeout; graceful restarts never use up an item's
attempts. Real worker subprocesses, real Redis, SQLite and PostgreSQL."""

from __future__ import annotations

import signal
import time

import pytest
from sqlalchemy import func, select, update

from core.settings import Settings
from store.db import session_scope
from store.tables import Item, Worker
from tests.worker.conftest import Cluster, greedy_lines
from tests.worker.test_worker import assert_exactly_once, running

# The recovery-relevant settings exactly as shipped.
DEFAULTS = {name: Settings.model_fields[name].default for name in (
    "heartbeat_interval", "visibility_timeout", "dead_worker_after", "reconcile_interval",
    "cancel_poll_interval", "shutdown_grace", "max_attempts")}


def _sigkill_then_replace(c: Cluster) -> float:
    lines = greedy_lines(150, max_tokens=40)
    a = c.start_worker("wA")
    report = c.submit(lines)
    c.wait_for(lambda: c.n_results(report.batch_id) >= 10 and running(c) > 0, 120,
               "first results, with items in flight", every=0.02)
    a.send_signal(signal.SIGKILL)
    a.wait(timeout=10)
    t_kill = time.monotonic()
    done_at_kill = c.n_results(report.batch_id)
    assert done_at_kill < 150, "the batch finished before the kill"
    b = c.start_worker("wB")
    assert_exactly_once(c, report, 150)
    took = time.monotonic() - t_kill
    assert "restored" in c.log(b) and "dead worker" in c.log(b), c.log(b)[-2000:]
    results = c.results(report.batch_id)
    assert {r.worker_id for r in results} == {"wA", "wB"}
    with session_scope(c.db) as s:  # only the items in flight at the kill ran twice
        assert s.scalar(select(func.max(Item.attempts))) == 2
    return took


@pytest.mark.slow
def test_sigkilled_worker_recovers_in_minutes_with_defaults_sqlite(sqlite_cluster) -> None:
    took = _sigkill_then_replace(sqlite_cluster(chunk_items=20, **DEFAULTS))
    print(f"sqlite: batch complete {took:.0f}s after the SIGKILL")
    assert took < 120


@pytest.mark.slow
def test_sigkilled_worker_recovers_in_minutes_with_defaults_postgres(pg_cluster) -> None:
    took = _sigkill_then_replace(pg_cluster(chunk_items=20, **DEFAULTS))
    print(f"postgresql: batch complete {took:.0f}s after the SIGKILL")
    assert took < 120


@pytest.mark.slow
def test_rolling_restarts_do_not_use_up_attempts(cluster) -> None:
    # One attempt allowed: a hand-back that counted would fail every item it returned.
    c = cluster(chunk_items=10, shutdown_grace=0.5, max_attempts=1)
    total = 30  # 3 chunks, as many as a worker runs at once
    lines = greedy_lines(total, max_tokens=300)
    report = c.submit(lines)
    for n in range(2):  # two rolling deploys while the batch runs
        w = c.start_worker(f"w{n}")
        c.wait_for(lambda: running(c) > 0, 120, "items in flight", every=0.05)
        time.sleep(0.3)
        w.send_signal(signal.SIGTERM)
        assert w.wait(timeout=60) == 0, c.log(w)[-3000:]
        assert "handing chunk" in c.log(w)
        with session_scope(c.db) as s:
            assert s.scalar(select(func.max(Item.attempts))) <= 1
            assert s.scalar(select(func.count()).select_from(Item)
                            .where(Item.status == "running")) == 0
    c.start_worker("w_final")
    results = assert_exactly_once(c, report, total)
    assert all(r.error is None for r in results)


@pytest.mark.slow
def test_a_dead_workers_lost_message_is_found_at_once(sqlite_cluster) -> None:
    """A worker SIGKILLed between popping a chunk message and recording it as held loses
    that message for good (no broker time to go stale). Its stopped heartbeat in the
    store is what gives it away: the worker that marks it lost reconciles at once,
    instead of at the periodic sweep five minutes later."""
    from store.queries import register_worker

    # Tail sharing off: an idle worker would otherwise run the lost chunk's queued items
    # itself (they are anyone's to claim), and the reconciler is what this test is about.
    c = sqlite_cluster(chunk_items=20, worker_share_tail=False, **DEFAULTS)
    with session_scope(c.db) as s:  # the dead worker: registered, heartbeat long stopped
        register_worker(session=s, worker_id="ghost", host="h", pid=1, model="m",
                        devices=[], pipeline_parallel=1)
        s.execute(update(Worker).values(last_seen=time.time() - 120, status="busy"))
    report = c.submit(greedy_lines(60, max_tokens=8), drop=lambda chunk: chunk.start == 20)
    t0 = time.monotonic()
    w = c.start_worker("w")
    assert_exactly_once(c, report, 60)
    took = time.monotonic() - t0
    assert "taking back their work" in c.log(w) and "enqueued again" in c.log(w)
    with session_scope(c.db) as s:
        assert s.get(Worker, "ghost").status == "lost"
    assert took < 60, took  # worker start-up + one heartbeat + the 1 s double look
