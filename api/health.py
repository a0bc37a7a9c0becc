"""Liveness and readiness: ``/healthz`` (the process answers) and ``/readyz`` (the
database and Redis answer too)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from api.schemas import Health, Readiness
from store.db import make_sessionmaker
from store.queries import live_workers

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is up."""
    return Health(status="ok")


def _check(request: Request) -> Readiness:
    settings = request.app.state.settings
    db_state, redis_state, workers = "ok", "ok", 0
    try:
        with make_sessionmaker(request.app.state.db)() as session:
            session.execute(text("SELECT 1"))
            workers = len(live_workers(session=session, within=settings.dead_worker_after))
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready", said why
        db_state = f"unavailable: {type(exc).__name__}: {str(exc)[:200]}"
    try:
        import redis

        client = redis.Redis.from_url(settings.redis_url, socket_timeout=2,
                                      socket_connect_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001
        redis_state = f"unavailable: {type(exc).__name__}: {str(exc)[:200]}"
    ok = db_state == "ok" and redis_state == "ok"
    return Readiness(status="ok" if ok else "unavailable", database=db_state,
                     redis=redis_state, workers=workers)


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(request: Request) -> JSONResponse:
    """Ready to take batches: the database and Redis are reachable (503 otherwise)."""
    state = await run_in_threadpool(_check, request)
    return JSONResponse(state.model_dump(), status_code=200 if state.status == "ok" else 503)
