"""Alembic migrations for the neoxq store, and helpers to run them from code and the CLI."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def alembic_config(url: str | None = None):
    """An Alembic ``Config`` for this folder, pointed at ``url`` (default: the settings)."""
    from alembic.config import Config

    from core.settings import get_settings

    cfg = Config(str(HERE / "alembic.ini"))
    cfg.set_main_option("script_location", str(HERE))
    # ConfigParser interpolation: a literal % in a URL (an encoded password) must be %%.
    cfg.set_main_option("sqlalchemy.url", (url or get_settings().db_url).replace("%", "%%"))
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Bring the database at ``url`` up to ``revision``."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def current(url: str | None = None) -> str | None:
    """The revision the database at ``url`` is at (None for an empty database)."""
    from alembic.runtime.migration import MigrationContext

    from store.db import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
