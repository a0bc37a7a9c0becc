"""The API against a real database (SQLite and PostgreSQL) and a real Redis queue.

Each test gets its own database, data directory, queue name and Redis key prefix; the
messages the API enqueues are deleted afterwards (nothing else on the server is touched).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from api.app import create_app
from core.settings import Settings
from store.db import create_all, make_engine, session_scope
from store.keys import create_key


@dataclass
class Api:
    """One test's server: the app's client, settings, database and Redis queue."""

    client: TestClient
    settings: Settings
    db: Engine

    def key(self, name: str = "k") -> str:
        """Create an API key; returns the plain key."""
        with session_scope(self.db) as s:
            _, plain = create_key(session=s, name=name)
        return plain

    def queued(self) -> int:
        """Chunk messages waiting on this test's queue."""
        r = redis.Redis.from_url(self.settings.redis_url)
        try:
            return r.llen(self.settings.redis_key_prefix + self.settings.queue)
        finally:
            r.close()


def make_settings(database_url: str, redis_url: str, unique: str, tmp_path: Path,
                  **kw: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url, "redis_url": redis_url,
        "queue": f"neoxq_api_{unique}",
        "redis_key_prefix": f"neoxq_api_{unique}:", "data_dir": tmp_path / "data",
        "chunk_items": 10,
    }
    values.update(kw)
    return Settings(**values)


def drop_redis_keys(redis_url: str, prefix: str) -> None:
    r = redis.Redis.from_url(redis_url)
    try:
        keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            r.delete(*keys)
    finally:
        r.close()


def _factory(url: str, redis_url: str, unique: str, tmp_path: Path
             ) -> Iterator[Callable[..., Api]]:
    made: list[Api] = []

    def factory(**kw: Any) -> Api:
        settings = make_settings(url, kw.pop("redis_url", redis_url), unique, tmp_path, **kw)
        db = make_engine(url)
        create_all(db)
        client = TestClient(create_app(settings, db=db), client=("127.0.0.1", 50000))
        client.__enter__()
        api = Api(client=client, settings=settings, db=db)
        made.append(api)
        return api

    yield factory
    for api in made:
        api.client.__exit__(None, None, None)
        api.db.dispose()
    drop_redis_keys(redis_url, f"neoxq_api_{unique}:")


@pytest.fixture
def api_factory(database_url: str, redis_url: str, unique: str,
                tmp_path: Path) -> Iterator[Callable[..., Api]]:
    """``api_factory(**settings)`` -> an :class:`Api`, on SQLite and on PostgreSQL."""
    yield from _factory(database_url, redis_url, unique, tmp_path)


@pytest.fixture
def sqlite_api_factory(sqlite_url: str, redis_url: str, unique: str,
                       tmp_path: Path) -> Iterator[Callable[..., Api]]:
    """As ``api_factory``, on SQLite only (input checks that touch no SQL dialect code)."""
    yield from _factory(sqlite_url, redis_url, unique, tmp_path)


@pytest.fixture
def api(api_factory: Callable[..., Api]) -> Api:
    return api_factory()


@pytest.fixture
def sqlite_api(sqlite_api_factory: Callable[..., Api]) -> Api:
    return sqlite_api_factory()


def jsonl(rows: list[Any]) -> bytes:
    """Lines of JSON (dicts are dumped, bytes/str kept as given)."""
    out = []
    for r in rows:
        if isinstance(r, bytes):
            out.append(r)
        elif isinstance(r, str):
            out.append(r.encode())
        else:
            out.append(json.dumps(r).encode())
    return b"\n".join(out) + b"\n"


def prompts(n: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"custom_id": f"r{i}", "prompt": f"prompt {i}", **extra} for i in range(n)]


def write_results(db: Engine, batch_id: str, *, fail: set[int] = frozenset(),
                  upto: int | None = None) -> int:
    """Write result rows for a batch's items through the store, as a worker would;
    returns how many were written. Finalizes the batch when all are done."""
    from sqlalchemy import select

    from store.queries import finalize_if_done, insert_results
    from store.records import ResultRow
    from store.tables import Item, now

    with session_scope(db) as s:
        items = list(s.scalars(select(Item).where(Item.batch_id == batch_id)
                               .order_by(Item.index)))
        if upto is not None:
            items = items[:upto]
        t = now()
        rows = []
        for it in items:
            bad = it.index in fail
            rows.append(ResultRow(
                item_id=it.id, batch_id=batch_id, index=it.index,
                choices=[] if bad else [{"index": 0, "text": f" out {it.index}",
                                         "finish_reason": "length", "logprobs": None}],
                text=None if bad else f" out {it.index}",
                finish_reason=None if bad else "length",
                prompt_tokens=0 if bad else 3, completion_tokens=0 if bad else 5,
                error={"code": "context_length_exceeded",
                       "message": "max_tokens: prompt + max_tokens exceed 2048",
                       "param": "max_tokens"} if bad else None,
                queued_at=it.queued_at, started_at=t, first_token_at=t,
                finished_at=t, tokens_per_s=None if bad else 50.0,
                worker_id="test", attempt=1))
        n = len(insert_results(session=s, rows=rows))
        finalize_if_done(session=s, batch_id=batch_id)
    return n
