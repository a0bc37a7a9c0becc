"""Alembic migrations: upgrade empty SQLite and PostgreSQL databases, and find no drift
between store/tables.py and the revisions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

import migrations
from store.db import make_engine
from store.tables import Base

ROOT = Path(__file__).resolve().parents[2]
TABLES = {"api_keys", "files", "batches", "items", "results", "workers"}
# The newest revision file's id: a new migration updates no test.
HEAD = max(p.name.split("_", 1)[0] for p in (ROOT / "migrations" / "versions").glob("0*.py"))


def test_upgrade_empty_database_and_no_drift(database_url: str) -> None:
    migrations.upgrade(database_url)
    assert migrations.current(database_url) == HEAD
    engine = make_engine(database_url)
    try:
        assert TABLES <= set(inspect(engine).get_table_names())
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(ctx, Base.metadata) == []
    finally:
        engine.dispose()


def test_sqlite_is_set_up_for_concurrency(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
            assert conn.execute(text("PRAGMA busy_timeout")).scalar() >= 1000
    finally:
        engine.dispose()


def test_neoxq_db_upgrade_command(sqlite_url: str) -> None:
    env = {**os.environ, "NEOXQ_DATABASE_URL": sqlite_url}
    out = subprocess.run(
        [sys.executable, "-m", "cli.main", "db", "upgrade"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert HEAD in out.stdout
    assert migrations.current(sqlite_url) == HEAD
