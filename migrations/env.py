"""Alembic environment: the URL comes from the service settings (or the caller), the target is api.core.tables."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from api.core.db import make_engine
from api.core.settings import get_settings
from api.core.tables import Base

config = context.config
# Programmatic callers (api/core/migrations.py) pass the URL and configure logging themselves.
if config.config_file_name is not None and "database_url" not in config.attributes:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

database_url = config.attributes.get("database_url") or get_settings().database_url
# SQLite cannot ALTER most things in place; batch mode rebuilds the table instead.
render_as_batch = database_url.startswith("sqlite")


def run_migrations_offline() -> None:
    context.configure(
        url=database_url,
        target_metadata=Base.metadata,
        literal_binds=True,
        render_as_batch=render_as_batch,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=Base.metadata,
                render_as_batch=render_as_batch,
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
