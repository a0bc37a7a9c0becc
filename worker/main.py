"""``neoxq worker``: load the model once, then run Celery on the chunk queue.

Pool choice: Celery's *threads* pool. The engine is one object in this process's memory
(weights and KV cache on the GPU); prefork would need a copy per child and solo would
hold a single chunk at a time, letting the engine drain at every chunk boundary. With
threads, ``concurrency`` chunk tasks wait side by side while one engine-loop thread
batches all their sequences together.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("neoxq.worker")


@dataclass
class WorkerOptions:
    """What ``neoxq worker`` was asked for; None means "from the settings"."""

    model: str
    name: str | None = None  # the model name served; None: the registry's or model_name
    device: str | None = None
    dtype: str | None = None
    quantization: str | None = None  # "fp8": FP8 linear weights (models.dtypes)
    pipeline_parallel: int = 1
    tokenizer: str | None = None
    chat_template: str | None = None  # a Jinja2 file; None: the checkpoint's, else default
    queue: str | None = None
    concurrency: int | None = None
    worker_id: str | None = None
    database_url: str | None = None
    redis_url: str | None = None
    loglevel: str = "INFO"
    warm_up: bool | None = None  # None: NEOXQ_WORKER_WARMUP
    engine_kwargs: dict[str, Any] = field(default_factory=dict)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_model(opts: WorkerOptions, settings: Any, db: Any) -> tuple[str, str]:
    """``(served name, checkpoint)`` for ``opts``: a registry name (a fine-tuned result)
    loads the checkpoint the registry records and serves under its own name; anything
    else is a checkpoint, served as ``--name`` or the deployment's default model name."""
    from store.db import session_scope
    from store.registry import get_model, is_fine_tuned_name

    with session_scope(db) as session:
        entry = get_model(session=session, name=opts.model)
        checkpoint = entry.checkpoint if entry is not None else None
    if checkpoint and (is_fine_tuned_name(opts.model) or not _looks_like_checkpoint(opts.model)):
        if opts.name and opts.name != opts.model:
            raise SystemExit(f"--name {opts.name}: a registry model serves under its own "
                             f"name ({opts.model})")
        return opts.model, checkpoint
    if is_fine_tuned_name(opts.model):
        raise SystemExit(f"--model {opts.model}: no such model in the store's registry "
                         "(a fine-tuned model is registered when its job succeeds)")
    return opts.name or settings.model_name, opts.model


def _looks_like_checkpoint(spec: str) -> bool:
    from pathlib import Path

    return spec.startswith("preset:") or Path(spec).exists()


def run_worker(opts: WorkerOptions) -> int:
    """Build the engine, register the worker, consume until SIGTERM/SIGINT; exit code."""
    from celery import signals

    from core.celery_app import make_celery, model_queue
    from core.settings import get_settings
    from models.chat import load_chat_template
    from models.dtypes import (
        canonical_kv_cache_dtype,
        canonical_quantization,
        parse_dtype,
        precision_label,
    )
    from models.runtime import build_engine
    from store.db import make_engine
    from worker.broker import TRANSPORT
    from worker.runtime import WorkerRuntime
    from worker.tasks import register_tasks

    logging.basicConfig(level=opts.loglevel.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {k: v for k, v in {
        "database_url": opts.database_url, "redis_url": opts.redis_url, "queue": opts.queue,
        "worker_concurrency": opts.concurrency,
    }.items() if v}
    settings = get_settings().model_copy(update=overrides)
    db = make_engine(settings.db_url)
    served, checkpoint = resolve_model(opts, settings, db)
    # This worker consumes its model's queue only; the broker helpers, the tail sharing
    # and the reconcile sweep read settings.queue, so they all stay within that model.
    settings = settings.model_copy(update={"queue": model_queue(settings, served)})
    device = opts.device or _default_device()
    try:
        dtype = parse_dtype(opts.dtype, device)
        quantization = canonical_quantization(opts.quantization)
        kv_cache_dtype = canonical_kv_cache_dtype(opts.engine_kwargs.get("kv_cache_dtype"))
    except ValueError as exc:
        raise SystemExit(f"--{exc}") from None

    try:  # before the model: a bad template should not cost a 20B load
        chat = load_chat_template(checkpoint, template_file=opts.chat_template,
                                  tokenizer=opts.tokenizer)
    except (ValueError, OSError) as exc:
        raise SystemExit(f"--chat-template: {exc}") from None
    log.info("chat template: %s", chat.source)
    # The model is loaded once, before anything is consumed: a chunk never waits for it.
    # What the store shows for this worker: the dtype plus any FP8 (e.g. bfloat16:w8kv8).
    dtype_name = precision_label(str(dtype).removeprefix("torch."), kv_cache_dtype,
                                 quantization)
    log.info("loading %s (serving %r) on %s (%s, pipeline_parallel=%d)", checkpoint, served,
             device, dtype_name, opts.pipeline_parallel)
    engine = build_engine(checkpoint, device=device, dtype=dtype,
                          pipeline_parallel=opts.pipeline_parallel, tokenizer=opts.tokenizer,
                          quantization=quantization, **opts.engine_kwargs)
    devices = [device] if opts.pipeline_parallel == 1 else [
        f"{device}:{i}" for i in range(opts.pipeline_parallel)]
    worker_id = opts.worker_id or f"{socket.gethostname()}:{os.getpid()}"
    runtime = WorkerRuntime(engine, db, settings, worker_id=worker_id, model=served,
                            devices=devices, pipeline_parallel=opts.pipeline_parallel,
                            exit_on_fatal=True, chat_template=chat, checkpoint=checkpoint,
                            dtype=dtype_name,
                            warm_up=settings.worker_warmup if opts.warm_up is None
                            else opts.warm_up)
    # Registers the worker and warms its engine up: Celery below consumes only after.
    runtime.start()
    from worker.metrics import start_metrics  # Prometheus (issue 8); off when port is 0

    start_metrics(runtime, settings.worker_metrics_port)

    app = make_celery(settings)
    # Same Redis transport, but a garbage list entry is dropped instead of killing the
    # worker (worker/broker.py). Producers keep the stock transport.
    app.conf.broker_transport = TRANSPORT
    register_tasks(app, runtime)

    @signals.worker_shutting_down.connect(weak=False)
    def _drain(**_: Any) -> None:
        # SIGTERM/SIGINT: Celery stops consuming and waits for running tasks; our tasks
        # finish within shutdown_grace or hand their chunk back (requeue).
        runtime.begin_drain()

    worker = app.Worker(
        pool="threads",
        concurrency=settings.worker_concurrency,
        queues=[settings.queue],
        hostname=f"{worker_id}@{socket.gethostname()}",
        loglevel=opts.loglevel.upper(),
        # No gossip/mingle/heartbeat broadcasts: workers coordinate only through Redis
        # queues and the store, and these would add fanout traffic on a shared Redis.
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
        optimization="fair",
    )
    log.info("worker %s consuming queue %r with %d chunks in flight", worker_id,
             settings.queue, settings.worker_concurrency)
    try:
        worker.start()
    finally:
        runtime.stop()
    return int(worker.exitcode or 0)
