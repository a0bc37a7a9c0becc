"""Prometheus metrics of one worker process, on its own HTTP port
(``NEOXQ_WORKER_METRICS_PORT``; 0 = off).

Two kinds of figures:

- per-item observations (counters and latency histograms), taken when the result writer
  has committed rows — so a redelivered chunk whose items were already stored is not
  counted twice;
- gauges read from the live runtime at scrape time (sequences in the engine, chunks held,
  current tokens/s), so a scrape never waits on the engine loop.

A registry of its own, not prometheus_client's global one: the figures are this
worker's, and tests run several runtimes in one process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from specs.status import ItemStatus
from store.records import ResultRow

log = logging.getLogger("neoxq.worker")

# Seconds; an item waits from milliseconds (idle worker) to hours (a deep queue).
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
# Seconds; the 20B's first token after admission is tens of ms to a few seconds.
FIRST_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Seconds from admission to the last token: up to minutes for long completions.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)


class WorkerMetrics:
    """The metrics of one :class:`worker.runtime.WorkerRuntime`."""

    def __init__(self, runtime: Any, registry: CollectorRegistry | None = None) -> None:
        self.runtime = runtime
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.items = Counter("neoxq_worker_items", "Items whose result this worker committed",
                             ["outcome"], registry=r)
        self.completion_tokens = Counter("neoxq_worker_completion_tokens",
                                         "Tokens generated (committed results)", registry=r)
        self.prompt_tokens = Counter("neoxq_worker_prompt_tokens",
                                     "Prompt tokens processed (committed results)", registry=r)
        self.queue_wait = Histogram("neoxq_worker_item_queue_seconds",
                                    "From submission to admission into the engine",
                                    buckets=WAIT_BUCKETS, registry=r)
        self.first_token = Histogram("neoxq_worker_item_first_token_seconds",
                                     "From admission to the first generated token",
                                     buckets=FIRST_TOKEN_BUCKETS, registry=r)
        self.duration = Histogram("neoxq_worker_item_duration_seconds",
                                  "From admission to the last token", buckets=DURATION_BUCKETS,
                                  registry=r)
        r.register(_RuntimeCollector(runtime))
        self.server: Any = None

    def observe(self, rows: list[ResultRow]) -> None:
        """Count newly committed result rows (the writer's ``on_written``)."""
        for row in rows:
            self.items.labels(ItemStatus.FAILED if row.failed else ItemStatus.COMPLETED).inc()
            self.completion_tokens.inc(row.completion_tokens or 0)
            self.prompt_tokens.inc(row.prompt_tokens or 0)
            queued, started = row.queued_at, row.started_at
            first, finished = row.first_token_at, row.finished_at
            if queued and started:
                self.queue_wait.observe(max(0.0, started - queued))
            if started and first:
                self.first_token.observe(max(0.0, first - started))
            if started and finished:
                self.duration.observe(max(0.0, finished - started))

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serve ``/metrics`` on ``port`` from a daemon thread."""
        self.server, _thread = start_http_server(port, addr=addr, registry=self.registry)


class _RuntimeCollector(Collector):
    """Gauges read from the runtime when Prometheus scrapes."""

    def __init__(self, runtime: Any) -> None:
        self.rt = runtime

    def collect(self) -> Iterator[Any]:
        rt = self.rt
        info = InfoMetricFamily("neoxq_worker", "This worker")
        info.add_metric([], {"worker_id": str(rt.worker_id), "model": str(rt.model),
                             "devices": ",".join(map(str, rt.devices)),
                             "pipeline_parallel": str(rt.pipeline_parallel)})
        yield info
        yield GaugeMetricFamily("neoxq_worker_tokens_per_second",
                                "Generated tokens per second (smoothed, as in the heartbeat)",
                                value=float(rt.tokens_per_s))
        yield GaugeMetricFamily("neoxq_worker_items_in_flight",
                                "Items submitted to the engine and not yet written",
                                value=float(len(getattr(rt.loop, "pending", {}) or {})))
        yield GaugeMetricFamily("neoxq_worker_chunks_in_flight", "Chunk messages held",
                                value=float(len(getattr(rt, "_held_tasks", ()) or ())))
        yield GaugeMetricFamily("neoxq_worker_draining", "1 while shutting down",
                                value=0.0 if rt.draining_since is None else 1.0)
        yield GaugeMetricFamily(
            "neoxq_worker_prefix_cache_hit_rate",
            "Prompt tokens found in the engine's prefix cache / prompt tokens looked up",
            value=float(rt.loop.engine_stats.get("prefix_cache_hit_rate", 0.0)))
        yield GaugeMetricFamily(
            "neoxq_worker_warmup_seconds",
            "Seconds the engine's warm-up took before the worker took work (0: none yet)",
            value=float(rt.warmup_seconds or 0.0))
        steps = CounterMetricFamily("neoxq_worker_engine_steps", "Engine steps taken")
        steps.add_metric([], float(getattr(rt.loop, "steps", 0)))
        yield steps
        busy = CounterMetricFamily("neoxq_worker_engine_step_seconds",
                                   "Seconds spent inside engine steps")
        busy.add_metric([], float(getattr(rt.loop, "step_seconds", 0.0)))
        yield busy


def start_metrics(runtime: Any, port: int) -> WorkerMetrics | None:
    """Observe ``runtime``'s committed results and, if ``port``, serve them over HTTP.

    Chains onto the result writer's ``on_written`` callback (the runtime's own counters
    keep working)."""
    if not port:
        return None
    metrics = WorkerMetrics(runtime)
    previous: Callable[[list[ResultRow]], None] | None = runtime.writer.on_written

    def on_written(rows: list[ResultRow]) -> None:
        if previous is not None:
            previous(rows)
        try:
            metrics.observe(rows)
        except Exception:  # noqa: BLE001 - metrics must never break result writing
            log.exception("metrics: observing results failed")

    runtime.writer.on_written = on_written
    metrics.serve(port)
    log.info("worker metrics on :%d/metrics", port)
    return metrics
