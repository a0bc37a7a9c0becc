"""Prometheus scrapes of the API's ``/metrics`` and a worker's metrics port, parsed with
prometheus_client's own exposition parser: the names are there and the values move as a
batch goes from the queue through a real tiny-model worker."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import Api, jsonl, prompts
from tests.api.live import Live, free_port, start_stack

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """``{(sample name, sorted labels): value}`` of one scrape."""
    resp = httpx.get(url, timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of every series of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    stack = start_stack(tmp_path, worker=False)
    yield stack
    stack.stop()


def wait_for(cond: Callable[[], bool], timeout: float = 90, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_metrics_move_through_a_batch(live: Live) -> None:
    api = live.url + "/metrics"
    before = scrape(api)
    for name in ("neoxq_queue_depth", "neoxq_items_in_flight", "neoxq_items_queued",
                 "neoxq_tokens_per_second", "neoxq_completion_tokens_total",
                 "neoxq_prompt_tokens_total"):
        assert (name, ()) in before, name
    assert value(before, "neoxq_up", source="redis") == 1.0
    assert value(before, "neoxq_up", source="database") == 1.0
    assert value(before, "neoxq_queue_depth") == 0.0

    # 24 items in chunks of 8: three messages wait in Redis until a worker comes.
    body = jsonl(prompts(24))
    r = httpx.post(live.url + "/batches", content=body, params={"max_tokens": 12},
                   headers={"Content-Type": "application/x-ndjson"})
    assert r.status_code == 201, r.text
    batch_id = r.json()["id"]
    queued = scrape(api)
    assert value(queued, "neoxq_queue_depth") == 3.0
    assert value(queued, "neoxq_items_queued") == 24.0
    assert value(queued, "neoxq_batches", status="in_progress") == 1.0
    # the request-latency histogram saw the upload (route template, not the raw path)
    assert total(queued, "neoxq_http_request_duration_seconds_count", method="POST",
                 route="/batches", status="201") == 1.0

    port = free_port()
    live.env["NEOXQ_WORKER_METRICS_PORT"] = str(port)
    live.start("worker", "worker", "--model", "preset:tiny", "--device", "cpu",
               "--worker-id", "w-metrics", "--concurrency", "2")

    def done() -> bool:
        return httpx.get(f"{live.url}/batches/{batch_id}").json()["status"] == "completed"

    wait_for(done, what=f"the batch to complete\n{live.log('worker')}")
    after = scrape(api)
    assert value(after, "neoxq_queue_depth") == 0.0
    assert value(after, "neoxq_items_queued") == 0.0
    assert value(after, "neoxq_items_in_flight") == 0.0
    assert value(after, "neoxq_items_total", outcome="completed") == 24.0
    assert value(after, "neoxq_completion_tokens_total") == 24 * 12
    assert value(after, "neoxq_prompt_tokens_total") > 0
    assert value(after, "neoxq_batches", status="completed") == 1.0
    assert total(after, "neoxq_workers") >= 1.0
    assert total(after, "neoxq_http_request_duration_seconds_count", route="/metrics") >= 2

    # The worker's own endpoint: per-item histograms observed as results were committed.
    w = scrape(f"http://127.0.0.1:{port}/metrics")
    assert value(w, "neoxq_worker_items_total", outcome="completed") == 24.0
    assert value(w, "neoxq_worker_completion_tokens_total") == 24 * 12
    for hist in ("neoxq_worker_item_queue_seconds", "neoxq_worker_item_first_token_seconds",
                 "neoxq_worker_item_duration_seconds"):
        assert value(w, f"{hist}_count") == 24.0, hist
        assert value(w, f"{hist}_bucket", le="+Inf") == 24.0
        assert value(w, f"{hist}_sum") > 0
    assert value(w, "neoxq_worker_engine_steps_total") > 0
    assert value(w, "neoxq_worker_items_in_flight") == 0.0
    info = [lab for (n, lab) in w if n == "neoxq_worker_info"]
    assert info and ("worker_id", "w-metrics") in info[0]


def test_metrics_report_a_redis_outage(sqlite_api_factory: Callable[..., Api]) -> None:
    # Nothing listens on the port: the scrape still answers, with neoxq_up{redis} 0.
    api = sqlite_api_factory(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    resp = api.client.get("/metrics")
    assert resp.status_code == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert value(samples, "neoxq_up", source="redis") == 0.0
    assert value(samples, "neoxq_up", source="database") == 1.0
    assert ("neoxq_queue_depth", ()) not in samples


def test_metrics_need_a_key_once_keys_exist(sqlite_api: Api) -> None:
    key = sqlite_api.key()
    assert sqlite_api.client.get("/metrics").status_code == 401
    resp = sqlite_api.client.get("/metrics", headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 200 and "neoxq_queue_depth" in resp.text


def test_store_figures_on_both_databases(api_factory: Callable[..., Api]) -> None:
    from tests.api.conftest import write_results

    api = api_factory()

    def scrape_app() -> Samples:
        resp = api.client.get("/metrics")
        assert resp.status_code == 200
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(resp.text) for s in f.samples}

    r = api.client.post("/batches", content=jsonl(prompts(25)),
                        headers={"Content-Type": "application/x-ndjson"})
    assert r.status_code == 201, r.text
    first = scrape_app()
    assert value(first, "neoxq_queue_depth") == 3.0  # chunks of 10
    assert value(first, "neoxq_items_queued") == 25.0
    write_results(api.db, r.json()["id"], upto=10, fail={3})
    second = scrape_app()
    assert value(second, "neoxq_items_queued") == 15.0
    assert value(second, "neoxq_items_total", outcome="completed") == 9.0
    assert value(second, "neoxq_items_total", outcome="failed") == 1.0
    assert value(second, "neoxq_completion_tokens_total") == 45.0
    assert value(second, "neoxq_up", source="database") == 1.0
