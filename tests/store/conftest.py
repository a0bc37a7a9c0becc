"""Fixtures of the store's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from store.db import create_all, make_engine


@pytest.fixture
def db(database_url: str) -> Iterator[Engine]:
    """The store's tables in a fresh database (SQLite and PostgreSQL: see database_url)."""
    engine = make_engine(database_url)
    create_all(engine)
    yield engine
    engine.dispose()
