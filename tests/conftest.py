"""Shared fixtures: real PostgreSQL, real Redis, SQLite files, the project's own data.

Every fixture hands out an isolated resource (a fresh PostgreSQL database, a Redis
database number plus a unique key prefix), so test sessions and parallel runs never
see each other's rows or messages.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import assets

ROOT = Path(__file__).resolve().parents[1]
# The copies the project carries (assets/); NEOXQ_TEST_DATA points the suite at another
# folder of the same layout.
DATA_DIR = Path(os.environ.get("NEOXQ_TEST_DATA") or assets.DATA_DIR)
PG_ADMIN_URL = os.environ.get("NEOXQ_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_HOST_URL = os.environ.get("NEOXQ_TEST_REDIS", "redis://127.0.0.1:6379")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` first (otherwise in their usual order): run on several
    processes (scripts/test.sh), the long ones then start early and spread over the
    processes instead of leaving one of them a tail of long tests after the rest end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real tokenizer, LAMBADA, PIQA and tinyshakespeare (``assets/``)."""
    if not (DATA_DIR / "20B_tokenizer.json").is_file():
        # The repository carries these files: their absence is a broken checkout, not
        # something to skip over.
        pytest.fail(f"test data not found at {DATA_DIR} (NEOXQ_TEST_DATA)")
    return DATA_DIR


@pytest.fixture(scope="session")
def tokenizer_path(data_dir: Path) -> Path:
    return data_dir / "20B_tokenizer.json"


def _pg_admin():
    import psycopg2

    conn = psycopg2.connect(PG_ADMIN_URL, connect_timeout=5)
    conn.autocommit = True
    return conn


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped afterwards."""
    try:
        admin = _pg_admin()
    except Exception as exc:  # noqa: BLE001 - any connection failure means "not available"
        pytest.fail(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}")
    name = f"neoxq_t_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}".replace("postgresql://", "postgresql+psycopg2://", 1)
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A new SQLite file in the test's temporary directory."""
    return f"sqlite:///{tmp_path / 'neoxq.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Runs the test once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'neoxq.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def redis_url() -> str:
    """A real Redis server (database 1). Nothing is flushed: several test runs may
    share the server, so tests isolate themselves with unique queue names and key
    prefixes (the ``unique`` fixture) instead."""
    import redis

    url = f"{REDIS_HOST_URL}/1"
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"Redis not reachable at {url}: {exc}")
    finally:
        client.close()
    return url


@pytest.fixture
def unique() -> str:
    """A short unique token for queue names, key prefixes and the like."""
    return uuid.uuid4().hex[:10]
