"""Alembic migrations for the service's database; one revision per schema change (see api/core/migrations.py)."""
