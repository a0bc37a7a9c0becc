"""``GET /metrics``: Prometheus figures of the whole system, as the API sees it.

Read at scrape time from the two sources of truth — Redis for the queue (``LLEN`` of the
chunk queue) and the store for items, tokens and workers — so any API replica reports
the same numbers and nothing is lost when one restarts. Request latencies are this
process's own (a histogram per route template, observed by a middleware).

Workers serve their own per-item latency histograms (``worker/metrics.py``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select

from api.auth import OwnerDep
from core.settings import Settings
from specs.status import (
    ACTIVE,
    UNFINISHED_ITEMS,
    BatchStatus,
    ItemStatus,
    JobStatus,
    WorkerStatus,
)
from store.db import make_sessionmaker
from store.jobs import count_jobs_by_status
from store.tables import Batch, Item, Worker

router = APIRouter(tags=["monitoring"])

# Seconds: most routes answer in milliseconds; uploads of 200 MB take tens of seconds.
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                   30, 60, 120)


class StoreCollector(Collector):
    """Queue depth, items, tokens and workers, read when Prometheus scrapes."""

    def __init__(self, db: Engine, settings: Settings) -> None:
        self.db, self.settings = db, settings
        self._app: Any = None

    def _queue_depth(self) -> float:
        from core.celery_app import make_celery, queue_depth

        if self._app is None:
            self._app = make_celery(self.settings)
            self._app.conf.broker_connection_timeout = 2
        return float(queue_depth(self._app, self.settings.queue))

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("neoxq_up", "1 if the source answered this scrape",
                               labels=["source"])
        try:
            depth = self._queue_depth()
            yield GaugeMetricFamily("neoxq_queue_depth",
                                    "Chunk messages waiting in the Redis queue",
                                    value=depth, labels=None)
            up.add_metric(["redis"], 1.0)
        except Exception:  # noqa: BLE001 - a scrape reports the outage, it does not fail
            up.add_metric(["redis"], 0.0)
        try:
            yield from self._store()
            up.add_metric(["database"], 1.0)
        except Exception:  # noqa: BLE001
            up.add_metric(["database"], 0.0)
        yield up

    def _store(self) -> list[Any]:
        out: list[Any] = []
        live_window = self.settings.dead_worker_after
        with make_sessionmaker(self.db)() as s:
            active_items = (select(Item.status, func.count()).join(Batch, Batch.id == Item.batch_id)
                            .where(Batch.status.in_(ACTIVE), Item.status.in_(UNFINISHED_ITEMS))
                            .group_by(Item.status))
            by_item = dict(s.execute(active_items).tuples().all())
            by_batch = dict(s.execute(select(Batch.status, func.count())
                                      .group_by(Batch.status)).tuples().all())
            totals = s.execute(select(
                func.coalesce(func.sum(Batch.request_completed), 0),
                func.coalesce(func.sum(Batch.request_failed), 0),
                func.coalesce(func.sum(Batch.completion_tokens), 0),
                func.coalesce(func.sum(Batch.prompt_tokens), 0))).one()
            since = time.time() - live_window
            workers = list(s.execute(select(Worker.id, Worker.status, Worker.tokens_per_s)
                                     .where(Worker.last_seen >= since)).tuples().all())
            by_job = count_jobs_by_status(session=s)
        out.append(GaugeMetricFamily("neoxq_items_in_flight",
                                     "Items a worker is generating right now",
                                     value=float(by_item.get(ItemStatus.RUNNING, 0))))
        out.append(GaugeMetricFamily("neoxq_items_queued",
                                     "Items of active batches waiting for a worker",
                                     value=float(by_item.get(ItemStatus.QUEUED, 0))))
        batches = GaugeMetricFamily("neoxq_batches", "Batches by status", labels=["status"])
        for status in BatchStatus:
            batches.add_metric([status], float(by_batch.get(status, 0)))
        out.append(batches)
        jobs = GaugeMetricFamily("neoxq_fine_tuning_jobs", "Fine-tuning jobs by status",
                                 labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status], float(by_job.get(status, 0)))
        out.append(jobs)
        items = CounterMetricFamily("neoxq_items", "Items finished, by outcome",
                                    labels=["outcome"])
        items.add_metric(["completed"], float(totals[0]))
        items.add_metric(["failed"], float(totals[1]))
        out.append(items)
        out.append(CounterMetricFamily("neoxq_completion_tokens", "Tokens generated",
                                       value=float(totals[2])))
        out.append(CounterMetricFamily("neoxq_prompt_tokens", "Prompt tokens processed",
                                       value=float(totals[3])))
        live = [w for w in workers if w[1] not in (WorkerStatus.STOPPED, WorkerStatus.LOST)]
        out.append(GaugeMetricFamily("neoxq_tokens_per_second",
                                     "Generated tokens per second, summed over live workers",
                                     value=float(sum(w[2] or 0.0 for w in live))))
        by_status = GaugeMetricFamily("neoxq_workers", "Workers with a recent heartbeat",
                                      labels=["status"])
        counts: dict[str, int] = {}
        for w in workers:
            counts[w[1]] = counts.get(w[1], 0) + 1
        for status, n in sorted(counts.items()):
            by_status.add_metric([status], float(n))
        out.append(by_status)
        return out


def install(app: FastAPI) -> None:
    """Add ``/metrics`` and the request-latency middleware to ``app``."""
    registry = CollectorRegistry()
    registry.register(StoreCollector(app.state.db, app.state.settings))
    latency = Histogram("neoxq_http_request_duration_seconds",
                        "API request latency by route template", ["method", "route", "status"],
                        buckets=REQUEST_BUCKETS, registry=registry)
    app.state.metrics_registry = registry

    @app.middleware("http")
    async def observe(request: Request,
                      call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            # The route template (/batches/{batch_id}), never the raw path: one series per
            # route, not one per batch id.
            route = getattr(request.scope.get("route"), "path", None) or "unmatched"
            latency.labels(request.method, route, str(status)).observe(
                time.perf_counter() - start)

    app.include_router(router)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(request: Request, _owner: OwnerDep) -> Response:
    """Prometheus exposition: queue depth, items in flight and queued, batches and
    fine-tuning jobs by status,
    items and tokens so far, tokens/s over live workers, request latency histograms.
    Needs an API key once keys exist (Prometheus: ``authorization: {credentials: KEY}``).

    Fleet-wide, not per key: every key sees the figures of every owner's batches (counts
    and rates only, never ids, prompts or results). It is an operator's endpoint; scope
    it at the proxy if keys belong to mutually untrusted tenants."""
    body = generate_latest(request.app.state.metrics_registry)
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)
