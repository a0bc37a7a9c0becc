"""The model registry and model routing: which names a batch may ask for, who serves them.

A batch names a model; its chunks go to that model's queue (``core.celery_app.model_queue``)
and only workers announcing that name consume them, so one fleet can hold several models.
A name is *known* when a worker has ever announced it, a fine-tuning job registered it, or
it is the deployment's default (``NEOXQ_MODEL_NAME``, what batches naming no model get). A
known name nobody serves right now is accepted and waits (``waiting_reason`` says why); an
unknown one is refused, since no worker will ever take it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import ColumnElement, or_, select
from sqlalchemy.orm import Session

from store.queries import insert_if_absent, live_workers
from store.tables import Batch, Model, Worker

BASE, FINE_TUNED = "base", "fine-tuned"
FT_PREFIX = "ft:"


def fine_tuned_name(*, base: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's name for a fine-tuned result: ``ft:BASE:SUFFIX:JOBID`` (SUFFIX may be empty)."""
    return f"{FT_PREFIX}{base}:{suffix or ''}:{job_id}"


def is_fine_tuned_name(name: str) -> bool:
    """Whether ``name`` has the ``ft:`` form (it must then be found in the registry)."""
    return name.startswith(FT_PREFIX)


def announce_model(*, session: Session, name: str, checkpoint: str | None) -> None:
    """Record a base model name a worker serves (first announcement wins: a fine-tuned
    entry or an earlier checkpoint is never overwritten by a worker). Workers starting
    together announce the same name at once: the insert skips a name already there
    instead of failing on it."""
    if session.get(Model, name) is None:
        session.execute(insert_if_absent(session, Model, ["name"]).values(
            name=name, kind=BASE, checkpoint=checkpoint))


def register_fine_tuned(*, session: Session, name: str, base: str, checkpoint: str,
                        job_id: str, owner: str) -> Model:
    """Record a fine-tuned result and where its files are (idempotent per name)."""
    m = session.get(Model, name)
    if m is None:
        m = Model(name=name, kind=FINE_TUNED)
        session.add(m)
    m.checkpoint, m.base, m.job_id, m.owner = checkpoint, base, job_id, owner
    session.flush()
    return m


def get_model(*, session: Session, name: str) -> Model | None:
    """The registry entry for ``name``, or None."""
    return session.get(Model, name)


def known_models(*, session: Session, default: str) -> set[str]:
    """Every name a batch may ask for: registered names and the deployment's default."""
    return {default, *session.scalars(select(Model.name))}


@dataclass(frozen=True)
class ServedModel:
    """A model name and the live workers serving it."""

    name: str
    kind: str
    checkpoint: str | None
    base: str | None
    owner: str
    created_at: float
    workers: list[Worker]


def served_models(*, session: Session, within: float, default: str,
                  include_idle: bool = False) -> list[ServedModel]:
    """Models with at least one live worker (or every known one with ``include_idle``),
    by name. ``within``: the live window (``dead_worker_after``)."""
    by_name: dict[str, list[Worker]] = {}
    for w in live_workers(session=session, within=within):
        by_name.setdefault(w.model, []).append(w)
    entries = {m.name: m for m in session.scalars(select(Model))}
    names: Iterable[str] = (set(entries) | set(by_name) | {default}) if include_idle \
        else set(by_name)
    out = []
    for name in sorted(names):
        m = entries.get(name)
        out.append(ServedModel(
            name=name, kind=m.kind if m else BASE, checkpoint=m.checkpoint if m else None,
            base=m.base if m else None, owner=m.owner if m else "system",
            created_at=m.created_at if m else 0.0, workers=by_name.get(name, [])))
    return out


def batches_for(model: str, default: str) -> ColumnElement[bool]:
    """The batches whose chunks ``model``'s workers run (a batch with no model recorded
    belongs to the default model)."""
    if model == default:
        return or_(Batch.model == model, Batch.model.is_(None))
    return Batch.model == model


def live_model_names(*, session: Session, within: float) -> set[str]:
    """Names at least one live worker serves now (read once, then :func:`waiting_reason`)."""
    return {w.model for w in live_workers(session=session, within=within)}


def waiting_reason(model: str | None, live: set[str]) -> str | None:
    """Why an unfinished batch for ``model`` makes no progress, or None when a live
    worker serves it."""
    if model is None or model in live:
        return None
    return f"waiting for a worker serving model {model!r} (none is live)"


__all__ = ["BASE", "FINE_TUNED", "ServedModel", "announce_model", "batches_for",
           "fine_tuned_name",
           "get_model", "is_fine_tuned_name", "known_models", "live_model_names",
           "register_fine_tuned", "served_models", "waiting_reason"]
