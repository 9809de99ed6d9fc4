"""Throwaway PostgreSQL databases on the local server, for tests and benchmarks of the production path.

Each caller gets its own database, so concurrent runs never see each other's rows. An unreachable server
is an error, not a skip: these tests exist to exercise the real Postgres.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_URL_TEMPLATE = "postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


@contextmanager
def fresh_postgres_database(prefix: str = "svfit_test", *, migrate: bool = True) -> Iterator[str]:
    """Create a uniquely named database (migrated to head unless `migrate=False`), yield its SQLAlchemy URL,
    and drop it afterwards even if connections are still open."""
    name = f"{prefix}_{secrets.token_hex(5)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_URL_TEMPLATE.format(name=name)
    try:
        if migrate:
            from api.core.migrations import upgrade_to_head

            upgrade_to_head(url)
        yield url
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def empty_database(url: str) -> None:
    """Delete every row of every table (children first), keeping the migrated schema.

    DELETE, not TRUNCATE: on the handful of rows a test leaves it is several times faster."""
    from api.core.db import make_engine
    from api.core.tables import Base

    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            for table in reversed(Base.metadata.sorted_tables):
                conn.execute(table.delete())
    finally:
        engine.dispose()
