"""The FastAPI app: ``create_app(settings)``.

The API validates, stores and enqueues; workers compute. It never imports torch, models
or worker (an import-linter contract in pyproject.toml holds it to that).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy import Engine

from api import completions, dashboard, fine_tuning, health, metrics, native, openai_routes
from api.errors import RejectNulInUrl, install_handlers
from api.sweeper import Sweeper
from api.uploads import InFlight
from core.payloads import ChunkPayload
from core.settings import Settings, get_settings
from store.db import make_engine


def default_enqueue(settings: Settings) -> Callable[[ChunkPayload], None]:
    """Publish chunk messages on the Redis queue of their batch's model."""
    from core.celery_app import enqueue_chunk, make_celery

    app = make_celery(settings)

    def enqueue(payload: ChunkPayload) -> None:
        enqueue_chunk(payload, app=app, settings=settings)

    return enqueue


def default_push_job(settings: Settings) -> Callable[[str], None]:
    """Announce a queued fine-tuning job on the training queue (a Redis list)."""
    import redis

    from core.training_queue import push_job

    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2,
                                  socket_timeout=5)

    def push(job_id: str) -> None:
        push_job(client, settings, job_id)

    return push


def create_app(settings: Settings | None = None, *, db: Engine | None = None,
               enqueue: Callable[[ChunkPayload], None] | None = None) -> FastAPI:
    """Build the app for ``settings`` (default: the environment's). ``db`` and ``enqueue``
    replace the database engine and the chunk publisher (tests, embedding)."""
    s = settings or get_settings()
    engine = db or make_engine(s.db_url)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        sweeper = Sweeper(engine, s, busy=app.state.in_flight)
        sweeper.start()
        yield
        sweeper.stop()
        sweeper.join(timeout=10)
        if getattr(app.state, "redis", None) is not None:  # the interactive lane's client
            await app.state.redis.aclose()
        if db is None:
            engine.dispose()

    app = FastAPI(
        title="neoxq",
        version="0.1.0",
        summary="Batch text generation for GPT-NeoX-20B: native and OpenAI Batch APIs, "
                "and synchronous OpenAI completions ahead of batch work.",
        lifespan=lifespan,
    )
    app.state.settings = s
    app.state.db = engine
    app.state.enqueue = enqueue or default_enqueue(s)
    app.state.push_job = default_push_job(s)
    app.state.keys_required = False
    app.state.in_flight = InFlight()
    install_handlers(app)
    app.add_middleware(RejectNulInUrl)
    app.include_router(health.router)
    app.include_router(native.router)
    app.include_router(openai_routes.router)
    app.include_router(fine_tuning.router)  # fine-tuning jobs (run by `neoxq trainer`)
    app.include_router(completions.router)  # synchronous completions (interactive lane)
    app.include_router(dashboard.router)  # issue 8: the web dashboard
    metrics.install(app)  # issue 8: GET /metrics + request latency histograms
    return app
