"""Real worker subprocesses (``neoxq worker --model preset:tiny --device cpu``) on a real
Redis and a real database, each test isolated by its own queue and Redis key prefix."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, func, select

from core.celery_app import make_celery
from core.settings import Settings
from store.db import create_all, make_engine, session_scope
from store.ingest import IngestReport, submit_batch
from store.tables import Batch, Result

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Cluster:
    """One test's queue, database and worker processes."""

    env: dict[str, str]
    settings: Settings
    db: Engine
    logs: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def start_worker(self, name: str, *extra: str, **env: Any) -> subprocess.Popen:
        """Start ``neoxq worker`` as a subprocess; its log goes to ``logs/<name>.log``."""
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "worker", "--model", "preset:tiny",
             "--device", "cpu", "--worker-id", name, *extra],
            cwd=ROOT, env={**self.env, **{k: str(v) for k, v in env.items()}},
            stdout=log, stderr=subprocess.STDOUT,
        )
        proc.log_path = self.logs / f"{name}.log"  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def log(self, proc: subprocess.Popen) -> str:
        return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]

    def submit(self, lines: list[dict[str, Any]], drop: Callable[[Any], bool] | None = None,
               **kw: Any) -> IngestReport:
        """Submit ``lines`` as a batch; ``drop(chunk)`` True loses that chunk's message."""
        from core.celery_app import enqueue_chunk

        data = "\n".join(json.dumps(x) for x in lines).encode()
        app = make_celery(self.settings)

        def enqueue(p: Any) -> None:
            if not (drop and drop(p)):
                enqueue_chunk(p, app=app, settings=self.settings)

        return submit_batch(engine=self.db, source=io.BytesIO(data), settings=self.settings,
                            enqueue=enqueue, **kw)

    def batch(self, batch_id: str) -> Batch:
        with session_scope(self.db) as s:
            return s.get(Batch, batch_id)

    def n_results(self, batch_id: str) -> int:
        with session_scope(self.db) as s:
            return s.scalar(select(func.count()).select_from(Result)
                            .where(Result.batch_id == batch_id)) or 0

    def results(self, batch_id: str) -> list[Result]:
        with session_scope(self.db) as s:
            return list(s.scalars(select(Result).where(Result.batch_id == batch_id)
                                  .order_by(Result.index)))

    def wait_for(self, cond: Callable[[], Any], timeout: float, what: str,
                 every: float = 0.1) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = cond()
            if value:
                return value
            for p in self.procs:
                if p.poll() is not None and p.returncode not in (0, -signal.SIGKILL):
                    raise AssertionError(f"worker exited {p.returncode}:\n{self.log(p)[-3000:]}")
            time.sleep(every)
        logs = "\n".join(self.log(p)[-2000:] for p in self.procs)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n"
                             f"{self.broker_state()}\n{logs}")

    def broker_state(self) -> str:
        """Queue length and unacknowledged messages, for failure messages."""
        r = redis.Redis.from_url(self.settings.redis_url)
        p, q = self.settings.redis_key_prefix, self.settings.queue
        try:
            return (f"queue={r.llen(p + q)} unacked={r.hlen(p + 'unacked')} "
                    f"index={r.zrange(p + 'unacked_index', 0, -1, withscores=True)} "
                    f"mutex={r.get(p + 'unacked_mutex')} now={time.time():.1f}")
        finally:
            r.close()

    def wait_done(self, batch_id: str, timeout: float = 90) -> Batch:
        return self.wait_for(
            lambda: (b := self.batch(batch_id)).status in ("completed", "failed", "cancelled")
            and b, timeout, f"batch {batch_id} to finish")


def make_cluster(database_url: str, redis_url: str, unique: str, tmp_path: Path,
                 **settings: Any) -> Iterator[Cluster]:
    values = {
        "database_url": database_url, "redis_url": redis_url, "queue": f"neoxq_t_{unique}",
        "redis_key_prefix": f"neoxq_t_{unique}:", "chunk_items": 25,
        "worker_concurrency": 3, "cancel_poll_interval": 0.2, "heartbeat_interval": 0.5,
        "visibility_timeout": 60, "shutdown_grace": 30, "reconcile_interval": 2,
    }
    values.update(settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEOXQ_")}
    env.update({f"NEOXQ_{k.upper()}": str(v) for k, v in values.items()})
    env["PYTHONUNBUFFERED"] = "1"
    db = make_engine(database_url)
    create_all(db)
    logs = tmp_path / "logs"
    logs.mkdir()
    cluster = Cluster(env=env, settings=Settings(**values), db=db, logs=logs)
    try:
        yield cluster
    finally:
        for p in cluster.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
        db.dispose()
        r = redis.Redis.from_url(redis_url)
        keys = list(r.scan_iter(match=f"neoxq_t_{unique}:*", count=1000))
        if keys:
            r.delete(*keys)
        r.close()


@pytest.fixture
def sqlite_cluster(sqlite_url: str, redis_url: str, unique: str,
                   tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """A factory: ``sqlite_cluster(**settings)`` (one per test)."""
    gens: list[Iterator[Cluster]] = []

    def factory(**settings: Any) -> Cluster:
        gen = make_cluster(sqlite_url, redis_url, unique, tmp_path, **settings)
        gens.append(gen)
        return next(gen)

    yield factory
    for g in gens:
        next(g, None)


@pytest.fixture
def pg_cluster(postgres_url: str, redis_url: str, unique: str,
               tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """As ``sqlite_cluster``, on a fresh PostgreSQL database."""
    gens: list[Iterator[Cluster]] = []

    def factory(**settings: Any) -> Cluster:
        gen = make_cluster(postgres_url, redis_url, unique, tmp_path, **settings)
        gens.append(gen)
        return next(gen)

    yield factory
    for g in gens:
        next(g, None)


@pytest.fixture(params=["sqlite", "postgresql"])
def cluster(request: pytest.FixtureRequest) -> Callable[..., Cluster]:
    """As ``sqlite_cluster``, once on SQLite and once on PostgreSQL."""
    return request.getfixturevalue(
        "sqlite_cluster" if request.param == "sqlite" else "pg_cluster")


def greedy_lines(n: int, max_tokens: int = 12, **extra: Any) -> list[dict[str, Any]]:
    """Short greedy requests with varied prompts (deterministic outputs)."""
    return [{"custom_id": f"r{i}", "prompt": f"Request number {i}: " + "ab" * (i % 7),
             "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **extra}
            for i in range(n)]


@pytest.fixture(scope="session")
def direct_engine() -> Any:
    """The same model as the workers (preset:tiny, seed 0), called directly."""
    from models.runtime import build_engine

    return build_engine("preset:tiny", device="cpu")


def direct_texts(engine: Any, lines: list[dict[str, Any]]) -> list[str]:
    from models.sampling import SamplingParams

    params = SamplingParams.from_dict(
        {k: v for k, v in lines[0].items() if k not in ("prompt", "custom_id")})
    outs = engine.generate([x["prompt"] for x in lines], params)
    return [o.samples[0].text for o in outs]
