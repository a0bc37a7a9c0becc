"""Database engine and session setup for SQLite (embedded default) and PostgreSQL.

SQLite is set up for several processes at once (the API and one or more workers share
one file): WAL lets readers go on while one writer commits, ``busy_timeout`` makes a
writer wait for the lock instead of failing, and foreign keys are switched on (SQLite
leaves them off by default).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from core.settings import get_settings


def _sqlite_pragmas(busy_timeout_ms: int):
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.execute("PRAGMA foreign_keys=ON")
        # WAL + NORMAL is durable against process crashes (what we test); only a power loss
        # can drop the last commits, and FULL would fsync on every result batch.
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    return on_connect


def make_engine(url: str | None = None, **kwargs: Any) -> Engine:
    """Create an engine for ``url`` (default: the settings' database) with the right setup."""
    settings = get_settings()
    url = url or settings.db_url
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # Default 5 s wait in the driver as well; the PRAGMA is what counts.
        kwargs.setdefault("connect_args", {"timeout": settings.sqlite_busy_timeout_ms / 1000})
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas(settings.sqlite_busy_timeout_ms))
        return engine
    if url.startswith("postgresql://"):
        url = url.replace("postgresql://", "postgresql+psycopg2://", 1)
    # pre_ping: a connection the server dropped (restart, pg_terminate_backend, idle
    # timeout) is replaced before use instead of failing the next statement.
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit (no lazy reloads)."""
    return sessionmaker(engine, expire_on_commit=False)


@lru_cache(maxsize=8)
def get_engine(url: str | None = None) -> Engine:
    """One engine per URL per process (engines hold the connection pool)."""
    return make_engine(url)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with make_sessionmaker(engine)() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def create_all(engine: Engine) -> None:
    """Create every table directly (tests, throwaway databases); deployments use Alembic."""
    from store.tables import Base

    Base.metadata.create_all(engine)
