"""Two models served at once: each batch runs only on the workers holding its model, one
of them a fine-tuned name loaded through the store's registry (``--model ft:...``).
Real worker subprocesses, Redis and PostgreSQL."""

from __future__ import annotations

import collections

from store.db import session_scope
from store.registry import fine_tuned_name, register_fine_tuned
from store.tables import Worker
from tests.worker.conftest import greedy_lines
from tests.worker.test_scale import wait_registered
from tests.worker.test_worker import assert_exactly_once


def test_batches_run_only_on_workers_of_their_model(pg_cluster) -> None:
    c = pg_cluster(chunk_items=10, worker_concurrency=2)
    ft = fine_tuned_name(base=c.settings.model_name, suffix="demo", job_id="ftjob-routing")
    with session_scope(c.db) as s:
        # The registry says where the result's files are; preset:tiny stands in for them.
        register_fine_tuned(session=s, name=ft, base=c.settings.model_name,
                            checkpoint="preset:tiny", job_id="ftjob-routing", owner="local")
    c.start_worker("base-1", OMP_NUM_THREADS=1)
    c.start_worker("other-1", "--name", "other", OMP_NUM_THREADS=1)
    # --model names the registry entry: the worker loads its checkpoint, serves its name
    proc = c.start_worker("ft-1", "--model", ft, OMP_NUM_THREADS=1)
    wait_registered(c, 3)
    with session_scope(c.db) as s:
        served = {w.id: (w.model, w.checkpoint) for w in s.query(Worker)}
    assert served == {"base-1": (c.settings.model_name, "preset:tiny"),
                      "other-1": ("other", "preset:tiny"), "ft-1": (ft, "preset:tiny")}
    assert f"serving {ft!r}" in c.log(proc)
    reports = {name: c.submit(greedy_lines(40, max_tokens=4), model=name)
               for name in (c.settings.model_name, "other", ft)}
    expect = {c.settings.model_name: {"base-1"}, "other": {"other-1"}, ft: {"ft-1"}}
    for name, report in reports.items():
        assert c.batch(report.batch_id).model == name
        results = assert_exactly_once(c, report, 40)
        assert set(collections.Counter(r.worker_id for r in results)) == expect[name], name


def test_unknown_fine_tuned_name_stops_the_worker(sqlite_cluster) -> None:
    c = sqlite_cluster()
    proc = c.start_worker("w", "--model", "ft:gpt-neox-20b:x:ftjob-none")
    assert proc.wait(timeout=120) != 0
    assert "no such model in the store's registry" in c.log(proc)
