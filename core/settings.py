"""One settings class for every neoxq process, read from ``NEOXQ_*`` environment variables.

Validated when first read (``get_settings()``), so a bad value stops a process at start-up
rather than at the first request. The API, the worker and the CLI all read the same class.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Configuration of neoxq; each field is ``NEOXQ_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="NEOXQ_", extra="ignore")

    environment: Literal["development", "production"] = "development"
    # Where uploaded files and the embedded SQLite database live.
    data_dir: Path = Path(".neoxq")
    # SQLAlchemy URL; empty means the embedded SQLite file ``<data_dir>/neoxq.db``.
    database_url: str = ""
    # SQLite waits this long for a competing writer instead of failing at once ("database is
    # locked"): the API and the worker's result writer share one file.
    sqlite_busy_timeout_ms: int = Field(default=30_000, ge=0)

    # Celery broker. Redis, not RabbitMQ: it is one process to run and it is already here.
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Every key the broker writes (queues, the unacked hash) carries this prefix, so several
    # deployments (or test runs) can share one Redis database without restoring each
    # other's unacknowledged messages.
    redis_key_prefix: str = ""
    # The one explicit queue workers consume and producers publish chunks to.
    queue: str = "neoxq"

    # Items per chunk message, at most. A chunk should take minutes, not hours: long enough
    # that per-message overhead vanishes, short enough that a redelivered chunk (after a
    # crash) repeats little and several workers share a batch evenly. A chunk also closes
    # once its items may generate ``chunk_max_tokens`` tokens in total: at ~1,000-2,000
    # output tok/s for the 20B on one H200 with four chunks in flight, 256 items x 128
    # tokens is 1-2 minutes of work.
    chunk_items: int = Field(default=256, ge=1)
    chunk_max_tokens: int = Field(default=65_536, ge=1)
    # Redis has no real acknowledgements: a delivered message sits in an "unacked" hash and
    # is put back on the queue once it is older than this. A chunk running longer than the
    # visibility timeout would be delivered twice, so it must sit well above the longest
    # chunk (minutes); the worker also refreshes the timestamp of messages it is working on
    # (see worker/runtime.py), so a live worker's chunks are never restored. A SIGKILLed
    # worker's chunks come back after this long.
    visibility_timeout: int = Field(default=3600, ge=1)
    # How many chunks one worker holds at once (Celery threads pool size). Several chunks in
    # flight keep the engine full across chunk boundaries: while one chunk's last sequences
    # finish, the next chunk's are already running.
    worker_concurrency: int = Field(default=4, ge=1)
    # Items one worker claims into its engine at once; 0 = a quarter more than the engine
    # runs at once (max_num_seqs). The rest of its chunks stays queued in the store, where
    # an idle worker can take it: a batch's tail is shared instead of drained by one worker.
    worker_max_in_flight: int = Field(default=0, ge=0)
    # Whether an idle worker (room in its engine, nothing in the queue) claims queued items
    # of chunks that other workers hold. Off: each chunk runs wholly on its holder.
    worker_share_tail: bool = True
    # Whether a worker warms its engine up (decode graphs, kernels, a prefill and decodes at
    # each batch-size bucket) before it consumes its first chunk, so that the first batch
    # it serves runs at steady speed. Off: those costs fall inside the first batch.
    worker_warmup: bool = True
    # Attempts per chunk before its remaining items are recorded as failed.
    max_attempts: int = Field(default=3, ge=1)
    # Seconds between worker heartbeats in the store, and how often the engine loop polls
    # the store for cancelled batches (the issue asks for cancellation within 5 s).
    heartbeat_interval: float = Field(default=5.0, gt=0)
    cancel_poll_interval: float = Field(default=0.5, gt=0)
    # A worker that has not refreshed a chunk message it holds for this long is dead: any
    # other worker puts that message back on the queue (worker/broker.py). Six missed
    # 5-second heartbeats: a GC pause or a slow database never looks like death, and a
    # killed GPU worker stalls its chunks for well under a minute, not an hour.
    dead_worker_after: float = Field(default=30.0, gt=0)
    # Seconds between sweeps that re-enqueue items no chunk message covers any more (a
    # message lost between Redis's BRPOP and its unacked hash; see worker/reconcile.py).
    reconcile_interval: float = Field(default=300.0, gt=0)
    # Seconds between the API's sweeps (api/sweeper.py): batches past ``expires_at``
    # become ``expired``, and uploads a crash left behind are finished or removed.
    sweep_interval: float = Field(default=60.0, gt=0)
    # An upload under its temporary name untouched for this long belongs to a request
    # that died (uploads are written continuously and ingested in seconds).
    stale_upload_after: float = Field(default=900.0, gt=0)
    # On SIGTERM a worker stops taking chunks and lets in-flight sequences finish for at
    # most this long; what is left then is aborted and handed back to the queue.
    shutdown_grace: float = Field(default=30.0, ge=0)

    # Synchronous requests (/v1/completions, /v1/chat/completions) travel on a Redis list
    # of their own that every worker drains ahead of batch work. One no worker takes within
    # this many seconds is answered 503 (every worker down or still loading a model).
    interactive_timeout: float = Field(default=30.0, gt=0)
    # Synchronous requests one worker runs at once, on top of its batch items.
    interactive_per_worker: int = Field(default=64, ge=1)

    # File limits (OpenAI's Batch API: 200 MB, 50,000 requests per file).
    max_file_bytes: int = Field(default=200 * 1024 * 1024, ge=1)
    max_lines: int = Field(default=50_000, ge=1)
    # The model name batches report when their lines name none.
    model_name: str = "gpt-neox-20b"

    # Observability. ``json`` writes one JSON object per log line (for log shippers);
    # ``text`` is for people at a terminal.
    log_format: Literal["text", "json"] = "text"
    # Port of the worker's Prometheus endpoint; 0 = off (the default, so that several
    # workers on one host do not fight over a port; the compose file sets 9100).
    worker_metrics_port: int = Field(default=0, ge=0, le=65535)

    @field_validator("queue")
    @classmethod
    def _queue_name(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value):
            raise ValueError("queue: a non-empty name without spaces expected")
        return value

    @model_validator(mode="after")
    def _production_is_explicit(self) -> Settings:
        # The embedded SQLite default is for one machine; a deployment names its database.
        if self.environment == "production" and not self.database_url:
            raise ValueError("database_url: required when environment=production")
        return self

    @property
    def files_dir(self) -> Path:
        """Where uploaded input files are stored."""
        return self.data_dir / "files"

    @property
    def db_url(self) -> str:
        """The database URL, defaulting to the embedded SQLite file."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'neoxq.db').resolve()}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
