"""Alembic environment: the neoxq tables, on the URL from the config or the settings."""

from __future__ import annotations

from alembic import context

from store.db import make_engine
from store.tables import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str | None:
    # Set by migrations.alembic_config(url) or `alembic -x url=...`; else the settings.
    return context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )


def run_migrations_offline() -> None:
    """Emit SQL without a database (``alembic upgrade --sql``)."""
    context.configure(
        url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run against a live database. ``render_as_batch`` because SQLite cannot ALTER most
    things in place; Alembic's batch mode copies the table instead."""
    connection = config.attributes.get("connection")
    if connection is not None:  # an open connection handed in by a caller (tests)
        context.configure(
            connection=connection, target_metadata=target_metadata, render_as_batch=True
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(_url())
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
