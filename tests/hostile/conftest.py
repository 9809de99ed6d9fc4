"""Fixtures for the hostile-input suites: the API test fixtures (an in-process app per test on SQLite or
PostgreSQL, two organizations with keys, a recording dispatcher), and checks that a refused or failed
request left nothing behind in the store or the database.

Every test collected under tests/hostile carries the `hostile` marker (`pytest -m hostile`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from api.core.tables import Base
from tests.api.conftest import (  # noqa: F401 — fixtures, re-exported for this directory
    Api,
    api,
    make_api,
    migrated_sqlite_template,
    postgres_database,
    sqlite_url,
)

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.hostile)


def row_counts(api: Api) -> dict[str, int]:
    """Rows per table, organizations and keys left out (the fixture made those)."""
    with api.session() as session:
        return {
            table.name: session.scalar(select(func.count()).select_from(table))
            for table in Base.metadata.sorted_tables
            if table.name not in ("organizations", "api_keys")
        }


def store_entries(api: Api) -> list[Path]:
    """Every file in the store, `.part` files included."""
    root = api.settings.data_dir / "store"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def assert_envelope(response, status: int, code: str | None = None, param: str | None = "*") -> dict:  # noqa: ANN001
    """The response is `status` with OpenAI's error envelope (and `code` / `param` when given)."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and isinstance(error["code"], str)
    if code is not None:
        assert error["code"] == code, error
    if param != "*":
        assert error["param"] == param, error
    return error
