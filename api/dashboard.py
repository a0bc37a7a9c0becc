"""The web dashboard: ``GET /dashboard`` (a static page, plain JS, no CDN) and the read-only
JSON it polls — batches with progress, tokens/s over time, workers with their devices and
health, one batch's timing distribution, and fine-tuning jobs with their loss curves.

The page itself needs no key; its JSON routes are scoped to the caller like every other
route (without API keys: loopback clients only; with keys, the page asks for one and
sends it as a bearer token).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, RedirectResponse

from api import render, service
from api.auth import OwnerDep, SessionDep, SettingsDep
from api.errors import ApiError
from specs.status import WorkerStatus
from store.jobs import metrics_series
from store.queries import list_workers
from store.stats import batch_timings, throughput_series
from store.views import list_batches, list_jobs

router = APIRouter(tags=["dashboard"])
STATIC = Path(__file__).resolve().parent / "static"
# The files the page consists of (anything else under /dashboard/static is a 404).
ASSETS = {"dashboard.html": "text/html; charset=utf-8",
          "dashboard.js": "text/javascript; charset=utf-8",
          "dashboard.css": "text/css; charset=utf-8"}


@router.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    """The server's front page is the dashboard."""
    return RedirectResponse("/dashboard")


@router.get("/dashboard", include_in_schema=False)
def dashboard_page() -> FileResponse:
    """The dashboard page (HTML; it loads its script and polls the JSON routes below)."""
    return _asset("dashboard.html")


@router.get("/dashboard/static/{name}", include_in_schema=False)
def dashboard_asset(name: str) -> FileResponse:
    """The page's script and stylesheet."""
    return _asset(name)


def _asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise ApiError(404, f"No such file: {name}", code="not_found")
    # no-cache: a redeployed server's page must not run against a stale script
    return FileResponse(STATIC / name, media_type=ASSETS[name],
                        headers={"Cache-Control": "no-cache"})


def _health(w: Any, live_window: float, t: float) -> str:
    if w.status == WorkerStatus.STOPPED:
        return "stopped"
    return "healthy" if t - w.last_seen <= live_window else "stale"


@router.get("/dashboard/api/overview")
def overview(
    session: SessionDep, owner: OwnerDep, settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    window: Annotated[float, Query(ge=10, le=86400, description="seconds of history")] = 600,
    step: Annotated[float, Query(ge=1, le=3600, description="seconds per point")] = 5,
) -> dict[str, Any]:
    """Everything the dashboard's front view shows: your newest batches with progress,
    tokens/s over the last ``window`` seconds, and workers with devices and health."""
    if window / step > 2000:
        raise ApiError(400, "window/step: at most 2000 points", code="invalid_value",
                       param="step")
    t = time.time()
    rows, more = list_batches(session=session, owner=owner, limit=limit)
    live_rates = service.live_generation(session, settings)
    batches = [render.native_batch(b, **service.status_of(b, live_rates)).model_dump()
               for b in rows]
    live_window = settings.dead_worker_after
    workers = [{
        "id": w.id, "host": w.host, "pid": w.pid, "model": w.model,
        "devices": list(w.devices or []), "pipeline_parallel": w.pipeline_parallel,
        "status": w.status, "health": _health(w, live_window, t),
        "last_seen_s": round(max(0.0, t - w.last_seen), 1), "started_at": w.started_at,
        "tokens_per_s": w.tokens_per_s, "items_done": w.items_done,
        "tokens_done": w.tokens_done, "prefix_cache_hit_rate": w.prefix_cache_hit_rate,
    } for w in list_workers(session=session, seen_within=3600)]
    series = throughput_series(session=session, owner=owner, window=window, step=step)
    live = sum(w["tokens_per_s"] for w in workers if w["health"] == "healthy")
    return {"now": t, "batches": batches, "has_more": more, "workers": workers,
            "series": series, "step": step, "tokens_per_s": live}


@router.get("/dashboard/api/batches/{batch_id}")
def batch_detail(
    batch_id: str, session: SessionDep, owner: OwnerDep, settings: SettingsDep,
    bins: Annotated[int, Query(ge=1, le=200)] = 20,
) -> dict[str, Any]:
    """One batch: its status and the distribution of its items' timings (queue wait,
    first token, generation time, tokens/s, completion length) with percentiles."""
    batch = service.owned_batch(session, batch_id, owner)
    live = service.live_generation(session, settings)
    return {"batch": render.native_batch(batch, **service.status_of(batch, live)).model_dump(),
            "timings": batch_timings(session=session, batch_id=batch.id, bins=bins)}


# Points per loss curve: a long job logs a step at a time; the page draws a small plot.
CURVE_POINTS = 200


def _curve(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """(step, train_loss, valid_loss) points, thinned evenly to :data:`CURVE_POINTS`
    (validation points and the last point always kept)."""
    rows = [{"step": p.get("step"), "train_loss": p.get("train_loss"),
             "valid_loss": p.get("valid_loss")} for p in points]
    if len(rows) <= CURVE_POINTS:
        return rows
    every = len(rows) / CURVE_POINTS
    keep = {int(i * every) for i in range(CURVE_POINTS)} | {len(rows) - 1}
    return [r for i, r in enumerate(rows) if i in keep or r["valid_loss"] is not None]


@router.get("/dashboard/api/jobs")
def jobs(
    session: SessionDep, owner: OwnerDep,
    limit: Annotated[int, Query(ge=1, le=50)] = 10,
) -> dict[str, Any]:
    """Your newest fine-tuning jobs, each with its loss curve (train and validation loss
    by step, from its ``metrics`` events)."""
    rows, more = list_jobs(session=session, owner=owner, limit=limit)
    series = metrics_series(session=session, job_ids=[j.id for j in rows])
    out = []
    for j in rows:
        curve = _curve(series[j.id])
        last = curve[-1] if curve else None
        valid = [p for p in curve if p["valid_loss"] is not None]
        out.append({**render.fine_tuning_job(j).model_dump(),
                    "step": last["step"] if last else None,
                    "train_loss": last["train_loss"] if last else None,
                    "valid_loss": valid[-1]["valid_loss"] if valid else None,
                    "curve": curve})
    return {"jobs": out, "has_more": more}
