"""Start-up refuses an un-migrated database; the one Alembic revision matches the tables on SQLite and
PostgreSQL. (The job-spec rules are tested in test_job_spec.py.)"""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from api.core.db import make_engine
from api.core.migrations import DatabaseNotMigrated, is_up_to_date
from api.core.tables import Base
from api.main import create_app
from tests.api.conftest import _make_settings


def test_refuses_to_start_on_an_unmigrated_database(tmp_path):
    settings = _make_settings(tmp_path, f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(DatabaseNotMigrated, match="svfit migrate"):
        create_app(settings, dispatch=lambda _job_id: None)
    app = create_app(settings, dispatch=lambda _job_id: None, auto_migrate=True)
    assert is_up_to_date(app.state.engine)
    app.state.engine.dispose()
    # Once migrated, the strict default starts.
    create_app(settings, dispatch=lambda _job_id: None).state.engine.dispose()


def test_the_migrations_match_the_tables(database_url):
    engine = make_engine(database_url)
    try:
        assert is_up_to_date(engine)
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()

