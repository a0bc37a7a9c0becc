"""The SQL tables: API keys, files, batches, items, results, workers, models, and
fine-tuning jobs with their events and checkpoints.

The store is the source of truth; Redis only carries chunk descriptors that point here.
Conventions:

- Every timestamp is a float of Unix seconds (``time.time()``): the engine reports its
  timings that way, OpenAI objects want integer seconds, and a float means the same on
  SQLite and PostgreSQL (no time-zone handling in either).
- Ids are strings with OpenAI-style prefixes (``batch_…``, ``file-…``, ``key_…``);
  items use an integer key because there are millions of them.
- ``results`` has one row per item (its primary key is ``item_id``), which is what makes
  result writes idempotent: a redelivered chunk inserts nothing twice.

These are tables, not API schemas: the API keeps its own pydantic models.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from specs.status import BatchStatus, ItemStatus, JobStatus, WorkerStatus

# Deterministic constraint names, so that migrations name them the same on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


# SQLite would accept a bare Integer; PostgreSQL needs BIGINT for millions of items per
# day over years. On SQLite only "INTEGER PRIMARY KEY" is the auto-incrementing rowid.
ItemId = BigInteger().with_variant(Integer(), "sqlite")
# Nullable JSON columns store Python None as SQL NULL (not the JSON text 'null'), so
# that "error IS NULL" means what it says.
NullableJSON = JSON(none_as_null=True)


def now() -> float:
    """The current time as stored: Unix seconds."""
    return time.time()


def new_id(prefix: str) -> str:
    """A random id with an OpenAI-style prefix, e.g. ``new_id("batch_")``."""
    return f"{prefix}{secrets.token_hex(12)}"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class ApiKey(Base):
    """A bearer key. Only its SHA-256 is stored; ``prefix`` is shown in listings."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # key_…
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex
    prefix: Mapped[str] = mapped_column(String(16))  # first 8 characters of the key
    created_at: Mapped[float] = mapped_column(Float, default=now)
    revoked_at: Mapped[float | None] = mapped_column(Float)


class File(Base):
    """An uploaded file (content on disk at ``path``) or a batch's virtual output/error file
    (``path`` null, rendered from ``results`` on download)."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_owner_created", "owner", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # file-…
    owner: Mapped[str] = mapped_column(String(64))  # api key id, or "local" without keys
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))  # batch | batch_output | batch_error
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    status: Mapped[str] = mapped_column(String(32), default="processed")
    created_at: Mapped[float] = mapped_column(Float, default=now)
    path: Mapped[str | None] = mapped_column(String(1024))
    batch_id: Mapped[str | None] = mapped_column(String(64))


class Batch(Base):
    """A batch of requests; statuses and timestamps follow OpenAI's Batch object."""

    __tablename__ = "batches"
    __table_args__ = (
        Index("ix_batches_owner_created", "owner", "created_at"),
        Index("ix_batches_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # batch_…
    owner: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default=BatchStatus.VALIDATING.value)
    endpoint: Mapped[str] = mapped_column(String(64), default="/v1/completions")  # or native
    input_file_id: Mapped[str | None] = mapped_column(String(64))
    output_file_id: Mapped[str | None] = mapped_column(String(64))
    error_file_id: Mapped[str | None] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16), default="24h")
    model: Mapped[str | None] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(16), default="native")  # native | openai
    created_at: Mapped[float] = mapped_column(Float, default=now)
    in_progress_at: Mapped[float | None] = mapped_column(Float)
    finalizing_at: Mapped[float | None] = mapped_column(Float)
    completed_at: Mapped[float | None] = mapped_column(Float)
    failed_at: Mapped[float | None] = mapped_column(Float)
    cancelling_at: Mapped[float | None] = mapped_column(Float)
    cancelled_at: Mapped[float | None] = mapped_column(Float)
    expired_at: Mapped[float | None] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float)
    # Aggregates, maintained in the same transaction as the result rows they count, so
    # that progress, tokens and tokens/s are one row read.
    request_total: Mapped[int] = mapped_column(Integer, default=0)
    request_completed: Mapped[int] = mapped_column(Integer, default=0)
    request_failed: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    # Batch-level sampling defaults, applied to fields a line leaves out.
    defaults: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # "metadata" is reserved on declarative classes, hence the attribute name.
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    # File-level validation errors: [{"line", "field", "code", "message"}].
    errors: Mapped[list[Any] | None] = mapped_column(NullableJSON)


class Item(Base):
    """One request: a line of the input file."""

    __tablename__ = "items"
    __table_args__ = (
        UniqueConstraint("batch_id", "index"),
        # Idle workers look for a running batch's unclaimed items (status "queued"), from
        # the end of the batch backwards (store/claims.py).
        Index("ix_items_batch_status_index", "batch_id", "status", "index"),
        # ... the costliest first (store/claims.py).
        Index("ix_items_batch_status_cost", "batch_id", "status", "cost"),
    )

    id: Mapped[int] = mapped_column(ItemId, primary_key=True, autoincrement=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)  # 0-based position among the batch's items
    line_number: Mapped[int] = mapped_column(Integer)  # 1-based line in the input file
    custom_id: Mapped[str | None] = mapped_column(String(512))
    prompt: Mapped[str] = mapped_column(Text)
    # Sampling parameters as given on the line (defaults are applied by the worker).
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default=ItemStatus.QUEUED.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # The worker running the item (its claim, store/claims.py): set with status "running",
    # cleared when the claim is released. A claim by a worker whose heartbeat stopped is
    # taken over by the worker holding the item's chunk.
    worker_id: Mapped[str | None] = mapped_column(String(200))
    queued_at: Mapped[float] = mapped_column(Float, default=now)
    # Tokens the item may hold in a KV cache: its prompt's (estimated at ingestion, where
    # there is no tokenizer) plus the most it may generate (max_tokens x n). Claims take
    # the costliest items first, and a worker claims about what its cache holds
    # (store/claims.py, worker/runtime.py).
    cost: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # A per-item validation error (when bad lines are run as item errors): {code, message}.
    error: Mapped[dict[str, Any] | None] = mapped_column(NullableJSON)


class Result(Base):
    """The outcome of one item: completions and timings, or an error."""

    __tablename__ = "results"
    __table_args__ = (Index("ix_results_batch_index", "batch_id", "index"),)

    item_id: Mapped[int] = mapped_column(
        ItemId, ForeignKey("items.id", ondelete="CASCADE"), primary_key=True, autoincrement=False
    )
    batch_id: Mapped[str] = mapped_column(String(64))
    index: Mapped[int] = mapped_column(Integer)
    # [{index, text, finish_reason, logprobs}] - one per sample (n > 1).
    choices: Mapped[list[Any]] = mapped_column(JSON, default=list)
    text: Mapped[str | None] = mapped_column(Text)  # the first choice's text
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    logprobs: Mapped[list[Any] | None] = mapped_column(NullableJSON)
    # {code, message} when the item failed
    error: Mapped[dict[str, Any] | None] = mapped_column(NullableJSON)
    queued_at: Mapped[float | None] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float)
    first_token_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    tokens_per_s: Mapped[float | None] = mapped_column(Float)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    attempt: Mapped[int] = mapped_column(Integer, default=1)


class Worker(Base):
    """A worker process, registered at start and refreshed by its heartbeat."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(512))
    devices: Mapped[list[Any]] = mapped_column(JSON, default=list)
    pipeline_parallel: Mapped[int] = mapped_column(Integer, default=1)
    # ``model`` is the name the worker serves (batches name it); these say what it loaded.
    checkpoint: Mapped[str | None] = mapped_column(String(1024))
    dtype: Mapped[str | None] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=WorkerStatus.STARTING.value)
    started_at: Mapped[float] = mapped_column(Float, default=now)
    last_seen: Mapped[float] = mapped_column(Float, default=now)
    tokens_per_s: Mapped[float] = mapped_column(Float, default=0.0)
    items_done: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_done: Mapped[int] = mapped_column(BigInteger, default=0)
    # Prompt tokens the engine found in its prefix cache / prompt tokens it looked up.
    prefix_cache_hit_rate: Mapped[float] = mapped_column(Float, default=0.0,
                                                         server_default="0")
    # {batch id: {"tokens_per_s", "inflight_tokens", ...}} as of the last heartbeat: this worker's
    # generation per batch, counted as tokens are generated (worker/meter.py).
    batch_rates: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=dict)
    # Seconds its engine's warm-up took before it consumed its first chunk (None: none).
    warmup_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)


class Model(Base):
    """The model registry: every name a batch may ask for (store/registry.py).

    A base model is recorded when a worker first announces it; a fine-tuned result
    (``ft:BASE:SUFFIX:JOBID``) when its job succeeds, with where its files are, so that
    ``neoxq worker --model ft:...`` can load it by name on any host that sees the path.
    """

    __tablename__ = "models"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), default="base")  # base | fine-tuned
    # What a worker loads for this name: preset:NAME, an HF dir, a NeoX YAML, a neoxq dir.
    checkpoint: Mapped[str | None] = mapped_column(String(1024))
    base: Mapped[str | None] = mapped_column(String(200))  # fine-tuned: the base's name
    job_id: Mapped[str | None] = mapped_column(String(64))
    owner: Mapped[str] = mapped_column(String(64), default="system")
    created_at: Mapped[float] = mapped_column(Float, default=now)


class FineTuningJob(Base):
    """A fine-tuning job (OpenAI's ``fine_tuning.job``), run by a ``neoxq trainer``.

    The trainer running it holds a lease: ``trainer_id`` and its ``heartbeat_at``. A
    lease whose heartbeat is older than ``dead_worker_after`` belongs to a dead trainer,
    and any other trainer may take the job over (store/jobs.py), resuming it from its
    last checkpoint under ``out_dir``.
    """

    __tablename__ = "fine_tuning_jobs"
    __table_args__ = (
        Index("ix_fine_tuning_jobs_owner_created", "owner", "created_at"),
        Index("ix_fine_tuning_jobs_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # ftjob-…
    owner: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(200))  # the base model's registry name
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64))
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger, default=0)
    status: Mapped[str] = mapped_column(String(20), default=JobStatus.VALIDATING_FILES.value)
    # {n_epochs, batch_size, learning_rate_multiplier}, resolved (no "auto").
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # neoxq's own training options (method lora|full, lora_rank, max_length, ...).
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[dict[str, Any] | None] = mapped_column(NullableJSON)  # {code, message, param}
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    out_dir: Mapped[str | None] = mapped_column(String(1024))  # checkpoints and the result
    trainer_id: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # trainer runs started


class FineTuningEvent(Base):
    """A line of a job's event log: a status message, or a ``metrics`` line (one per
    logged training step, ``step`` set)."""

    __tablename__ = "fine_tuning_events"
    __table_args__ = (Index("ix_fine_tuning_events_job_seq", "job_id", "seq"),)

    # The public id is ``ftevent-<seq>``: the sequence orders a job's events.
    seq: Mapped[int] = mapped_column(ItemId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(
        ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"))
    created_at: Mapped[float] = mapped_column(Float, default=now)
    level: Mapped[str] = mapped_column(String(8), default="info")  # info | warn | error
    type: Mapped[str] = mapped_column(String(16), default="message")  # message | metrics
    message: Mapped[str] = mapped_column(Text)
    step: Mapped[int | None] = mapped_column(Integer)
    data: Mapped[dict[str, Any] | None] = mapped_column(NullableJSON)


class FineTuningCheckpoint(Base):
    """A checkpoint a job's training wrote: its step and losses there."""

    __tablename__ = "fine_tuning_checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # ftckpt-…
    job_id: Mapped[str] = mapped_column(
        ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    # {step, train_loss, valid_loss}: OpenAI's checkpoint metrics that training measures.
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    path: Mapped[str | None] = mapped_column(String(1024))  # may be pruned later
