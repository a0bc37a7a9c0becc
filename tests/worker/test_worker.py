"""The queue end to end with real worker subprocesses: exactly-once results through
SIGKILL, several workers, cancellation, SIGTERM, malformed messages, database restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psycopg2
import pytest
import redis
from sqlalchemy import func, select, update
from sqlalchemy.engine import make_url

from core.celery_app import RUN_CHUNK, make_celery
from store.db import session_scope
from store.queries import request_cancel
from store.tables import File, Item, Result, Worker
from tests.worker.conftest import direct_texts, greedy_lines
from worker.runtime import FATAL_EXIT_CODE


def assert_exactly_once(cluster, report, n: int) -> list[Result]:
    b = cluster.wait_done(report.batch_id)
    results = cluster.results(report.batch_id)
    assert b.status == "completed", b.status
    assert [r.index for r in results] == list(range(n))  # one row per item (primary key)
    assert (b.request_completed, b.request_failed, b.request_total) == (n, 0, n)
    assert b.completion_tokens == sum(r.completion_tokens for r in results)
    with session_scope(cluster.db) as s:
        assert s.scalar(select(func.count()).select_from(File)
                        .where(File.batch_id == report.batch_id)) == 1  # finalized once
    return results


def items_done(cluster) -> int:
    with session_scope(cluster.db) as s:
        return s.scalar(select(func.sum(Worker.items_done))) or 0


def running(cluster) -> int:
    with session_scope(cluster.db) as s:
        return s.scalar(select(func.count()).select_from(Item).where(Item.status == "running"))


@pytest.mark.slow
def test_sigkill_mid_batch_then_restart_is_exactly_once(sqlite_cluster, direct_engine) -> None:
    # A short visibility timeout so the killed worker's chunks come back within the test;
    # the live worker keeps its own messages fresh (touch), so they are not redelivered.
    c = sqlite_cluster(visibility_timeout=4, chunk_items=20)
    lines = greedy_lines(200, max_tokens=40)
    a = c.start_worker("wA")
    report = c.submit(lines)
    c.wait_for(lambda: c.n_results(report.batch_id) >= 10 and running(c) > 0, 60,
               "first results, with items in flight", every=0.02)
    a.send_signal(signal.SIGKILL)
    a.wait(timeout=10)
    assert c.n_results(report.batch_id) < 200, "the batch finished before the kill"
    c.start_worker("wB")
    results = assert_exactly_once(c, report, 200)
    assert {r.worker_id for r in results} == {"wA", "wB"}
    assert [r.text for r in results] == direct_texts(direct_engine, lines)
    r0 = results[0]
    assert r0.queued_at <= r0.started_at <= r0.first_token_at <= r0.finished_at
    assert r0.prompt_tokens > 0 and r0.completion_tokens == 40 and r0.tokens_per_s > 0
    with session_scope(c.db) as s:  # items that were in flight at the kill ran twice
        assert s.scalar(select(func.max(Item.attempts))) == 2
        assert max(r.attempt for r in results) == 2


@pytest.mark.slow
def test_two_workers_share_one_batch(pg_cluster) -> None:
    c = pg_cluster(chunk_items=10)
    c.start_worker("w1")
    c.start_worker("w2")
    report = c.submit(greedy_lines(200, max_tokens=16))
    results = assert_exactly_once(c, report, 200)
    per_worker = {w: sum(r.worker_id == w for r in results) for w in ("w1", "w2")}
    assert all(n > 0 for n in per_worker.values()), per_worker
    with session_scope(c.db) as s:
        workers = {w.id: w for w in s.scalars(select(Worker))}
    assert set(workers) == {"w1", "w2"}
    # model: the name served (the default here); checkpoint: what it loaded
    assert all((w.model, w.checkpoint, w.devices) == (c.settings.model_name, "preset:tiny", ["cpu"])
               for w in workers.values())
    assert all(time.time() - w.last_seen < 10 for w in workers.values())
    c.wait_for(lambda: items_done(c) >= 200, 10, "heartbeats with the final counts")


@pytest.mark.slow
def test_cancel_is_obeyed_within_5s(sqlite_cluster) -> None:
    c = sqlite_cluster(chunk_items=20)
    c.start_worker("w")
    # Long generations: the batch would run for minutes.
    report = c.submit(greedy_lines(400, max_tokens=400))
    c.wait_for(lambda: c.n_results(report.batch_id) >= 1, 90, "first results")
    with session_scope(c.db) as s:
        assert request_cancel(session=s, batch_id=report.batch_id)
    t0 = time.monotonic()
    b = c.wait_for(lambda: (b := c.batch(report.batch_id)).status == "cancelled" and b, 5,
                   "cancelled", every=0.05)
    assert time.monotonic() - t0 < 5
    kept = c.n_results(report.batch_id)
    assert kept >= 1 and b.request_completed == kept
    time.sleep(1.5)  # nothing of the cancelled batch runs on: no new results
    assert c.n_results(report.batch_id) == kept
    with session_scope(c.db) as s:
        statuses = {st: n for st, n in s.execute(
            select(Item.status, func.count(Item.id)).group_by(Item.status)).all()}
    assert statuses.get("running", 0) == 0 and statuses["cancelled"] == 400 - kept


@pytest.mark.slow
def test_sigterm_hands_back_in_flight_work_and_exits(sqlite_cluster, direct_engine) -> None:
    c = sqlite_cluster(chunk_items=10, shutdown_grace=0.5)
    # Long enough generations that in-flight chunks cannot finish inside the grace period
    # (a fast engine would otherwise complete them and hand nothing back); 3 chunks, as
    # many as the worker runs at once.
    n = 30
    lines = greedy_lines(n, max_tokens=300)
    a = c.start_worker("wA")
    report = c.submit(lines)

    def running() -> int:
        with session_scope(c.db) as s:
            return s.scalar(select(func.count(Item.id)).where(
                Item.batch_id == report.batch_id, Item.status == "running")) or 0

    c.wait_for(running, 90, "items in flight", every=0.05)
    time.sleep(0.3)
    a.send_signal(signal.SIGTERM)
    assert a.wait(timeout=30) == 0, c.log(a)[-3000:]
    assert "handing chunk" in c.log(a)
    with session_scope(c.db) as s:
        assert s.get(Worker, "wA").status == "stopped"
    assert c.n_results(report.batch_id) < n
    c.start_worker("wB")
    results = assert_exactly_once(c, report, n)
    assert [r.text for r in results] == direct_texts(direct_engine, lines)


def test_malformed_messages_lost_chunks_and_bad_items(sqlite_cluster) -> None:
    """Garbage on the queue is dropped, a chunk whose message was lost is re-enqueued from
    the store, bad items become item errors; the batch completes."""
    # Tail sharing off: an idle worker would otherwise run the lost chunk's items itself
    # (queued items are anyone's to claim), and the reconciler is what this test is about.
    c = sqlite_cluster(worker_share_tail=False)
    app = make_celery(c.settings)
    q = c.settings.queue
    app.send_task(RUN_CHUNK, kwargs={"chunk": {"batch_id": "b", "start": 5, "end": 1}}, queue=q)
    app.send_task(RUN_CHUNK, kwargs={"chunk": "garbage"}, queue=q)
    app.send_task(RUN_CHUNK, args=[1, 2, 3], queue=q)
    app.send_task(RUN_CHUNK, kwargs={"chunk": {"batch_id": "batch_nope", "start": 0, "end": 3}},
                  queue=q)
    app.send_task("neoxq.no_such_task", queue=q)
    r = redis.Redis.from_url(c.settings.redis_url)
    r.lpush(f"{c.settings.redis_key_prefix}{q}", b"\x00 not a message", b'{"json": "but no"}')
    c.start_worker("w")
    lines = greedy_lines(30)
    lines[3]["prompt"] = "x" * 600  # longer than the tiny model's 512-token context
    lines[7]["max_tokens"] = 600  # prompt + max_tokens past the context
    # the chunk holding item 25 is lost (whatever the cut: chunks follow the live fleet)
    report = c.submit(lines, drop=lambda chunk: chunk.start <= 25 < chunk.end)
    with session_scope(c.db) as s:  # item 11 already failed max_attempts times (crashes)
        s.execute(update(Item).where(Item.index == 11).values(attempts=c.settings.max_attempts))
    b = c.wait_done(report.batch_id, timeout=60)
    assert (b.status, b.request_completed, b.request_failed) == ("completed", 27, 3)
    assert "had no message; enqueued again" in c.log(c.procs[0])
    errors = {x.index: x.error for x in c.results(report.batch_id) if x.error}
    assert set(errors) == {3, 7, 11}
    assert errors[11]["code"] == "max_attempts"
    assert errors[3]["code"] == "invalid_request" and "prompt" in errors[3]["message"]
    assert "max_tokens" in errors[7]["message"]
    assert r.llen(f"{c.settings.redis_key_prefix}{q}") == 0
    r.close()


def test_database_connections_killed_while_running(pg_cluster) -> None:
    c = pg_cluster(chunk_items=20)
    c.start_worker("w")
    report = c.submit(greedy_lines(200, max_tokens=24))
    c.wait_for(lambda: c.n_results(report.batch_id) >= 20, 60, "first results")
    dbname = make_url(c.settings.database_url).database
    admin = psycopg2.connect("postgresql://postgres@127.0.0.1:5432/test")
    admin.autocommit = True
    killed = 0
    for _ in range(3):  # a "restart" seen from the worker: every connection dropped, twice
        with admin.cursor() as cur:
            cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,))
            killed += cur.fetchone()[0]
        time.sleep(0.7)
    admin.close()
    assert killed > 0
    assert_exactly_once(c, report, 200)


def test_live_worker_keeps_long_chunks_from_being_redelivered(sqlite_cluster) -> None:
    """Chunks that run longer than the visibility timeout are not delivered twice: the
    worker refreshes the timestamps of the messages it holds."""
    c = sqlite_cluster(visibility_timeout=2, chunk_items=10)
    w = c.start_worker("w")
    report = c.submit(greedy_lines(30, max_tokens=300))
    b = c.wait_done(report.batch_id, timeout=120)
    assert b.status == "completed"
    spans = [r.finished_at - r.queued_at for r in c.results(report.batch_id)]
    assert max(spans) > 3, "chunks were too quick to outlive the visibility timeout"
    assert c.log(w).count("received") == 3
    with session_scope(c.db) as s:
        assert s.scalar(select(func.max(Item.attempts))) == 1


def test_dead_pipeline_stage_ends_the_worker(sqlite_cluster) -> None:
    """`neoxq worker --pipeline-parallel 2`: SIGKILL of the stage process makes the worker
    exit non-zero within seconds, naming the stage (never a worker that hangs on)."""
    c = sqlite_cluster()
    proc = c.start_worker("pp", "--pipeline-parallel", "2")
    def registered() -> bool:  # the engine is up and the worker is taking work
        with session_scope(c.db) as s:
            return s.get(Worker, "pp") is not None

    c.wait_for(registered, 120, "the worker to register")
    stages = _children(proc.pid)
    assert stages, "no stage process found"
    os.kill(stages[0], signal.SIGKILL)
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"worker still running:\n{c.log(proc)[-3000:]}") from None
    c.procs.remove(proc)
    assert code == FATAL_EXIT_CODE, c.log(proc)[-3000:]
    assert "pipeline stage 1" in c.log(proc)


def _children(pid: int) -> list[int]:
    """Child processes of ``pid`` that are pipeline stages (spawned python processes)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    kids = []
    for k in out.split():
        try:
            cmd = Path(f"/proc/{k}/cmdline").read_bytes()
        except OSError:
            continue
        if b"multiprocessing" in cmd and b"resource_tracker" not in cmd:
            kids.append(int(k))
    return kids


def test_worker_reports_its_prefix_cache_hit_rate(sqlite_cluster) -> None:
    """Questions about one long document: the worker's engine computes the document's
    KV once and its heartbeat reports the hit rate (the results are those of an engine
    with the cache off)."""
    c = sqlite_cluster(chunk_items=8)
    c.start_worker("wp")
    doc = "One long document that every question in this batch is about. " * 6
    lines = [{"custom_id": f"q{i}", "prompt": f"{doc}Question {i}: why?", "max_tokens": 6,
              "temperature": 0, "ignore_eos": True} for i in range(24)]
    report = c.submit(lines)
    results = assert_exactly_once(c, report, 24)

    def hit_rate() -> float:
        with session_scope(c.db) as s:
            w = s.get(Worker, "wp")
            return w.prefix_cache_hit_rate if w is not None else 0.0

    c.wait_for(lambda: hit_rate() > 0.5, 10, "a heartbeat with the prefix-cache hit rate")
    from models.runtime import build_engine

    off = build_engine("preset:tiny", device="cpu", enable_prefix_caching=False)
    assert [r.text for r in results] == direct_texts(off, lines)
