"""Schema migrations through Alembic's API: bring a database to head, or tell whether it is there.

The script directory is the `migrations/` package, located from its import path, so this works from a
source checkout and from an installed wheel alike, with no `alembic.ini` on the current directory.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

import migrations
from api.core.settings import get_settings


class DatabaseNotMigrated(RuntimeError):
    """The database schema is behind the code; the service must not start on it."""


def alembic_config(url: str | None = None) -> Config:
    script_location = Path(migrations.__file__).parent
    config = Config(str(script_location / "alembic.ini"))
    config.set_main_option("script_location", str(script_location))
    # Passed as an attribute, not a main option: ini interpolation would mangle a '%' in a password.
    config.attributes["database_url"] = url or get_settings().database_url
    return config


def upgrade_to_head(url: str | None = None) -> None:
    command.upgrade(alembic_config(url), "head")


def head_revisions() -> set[str]:
    return set(ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads())


def current_revisions(engine: Engine) -> set[str]:
    with engine.connect() as connection:
        return set(MigrationContext.configure(connection).get_current_heads())


def is_up_to_date(engine: Engine) -> bool:
    return current_revisions(engine) == head_revisions()


def ensure_up_to_date(engine: Engine, *, auto_migrate: bool) -> None:
    """Migrate (embedded mode) or refuse: serving on an old schema fails later, per request, obscurely."""
    if is_up_to_date(engine):
        return
    if not auto_migrate:
        raise DatabaseNotMigrated(
            f"The database at {engine.url.render_as_string(hide_password=True)} is not at the current schema "
            "revision. Run `svfit migrate` first."
        )
    upgrade_to_head(engine.url.render_as_string(hide_password=False))
