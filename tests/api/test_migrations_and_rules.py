"""Start-up refuses an un-migrated database; the one Alembic revision matches the tables on SQLite and
PostgreSQL; the "auto" hyperparameter rules and the method learning-rate table."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from api.core.db import make_engine
from api.core.hyperparameters import (
    METHOD_DEFAULT_LEARNING_RATE,
    auto_batch_size,
    auto_n_epochs,
    resolve_hyperparameters,
    resolve_peft,
)
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


def test_method_learning_rates_agree_with_the_training_library():
    train_config = pytest.importorskip("svfit_core.training.config")
    for method, rate in METHOD_DEFAULT_LEARNING_RATE.items():
        assert train_config.DEFAULT_LEARNING_RATE[method] == rate


@pytest.mark.parametrize(("n", "epochs"), [(1, 25), (10, 10), (20, 5), (34, 3), (1000, 3), (10_000, 2), (100_000, 1)])
def test_auto_epochs_follow_the_openai_rule(n, epochs):
    assert auto_n_epochs(n) == epochs


def test_auto_batch_size_is_a_bounded_power_of_two():
    assert auto_batch_size(3) == 3  # never more than the data set
    assert auto_batch_size(100) == 8
    assert auto_batch_size(10_000) == 16
    assert auto_batch_size(10_000_000) == 256


def test_explicit_values_are_kept_and_the_learning_rate_is_absolute():
    resolved = resolve_hyperparameters(
        {"n_epochs": 4, "batch_size": 2, "learning_rate_multiplier": 2}, n_examples=50, peft_type="full"
    )
    assert resolved == {"n_epochs": 4, "batch_size": 2, "learning_rate_multiplier": 2.0, "learning_rate": 1e-4}


def test_peft_defaults():
    assert resolve_peft(None) == {"type": "svfit", "rank": None, "energy": None, "target_modules": None}
    assert resolve_peft({"type": "svfit", "energy": 0.9})["energy"] == 0.9
    assert resolve_peft({"type": "lora"}) == {"type": "lora", "rank": 8, "alpha": 16.0, "target_modules": None}
    assert resolve_peft({"type": "full", "rank": 4, "checkpoint_every": 5}) == {"type": "full", "checkpoint_every": 5}
