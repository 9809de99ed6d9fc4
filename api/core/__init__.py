"""Service core shared by the API and the worker: settings, database, tables, storage, ids and domain errors.

Nothing in this package imports FastAPI or Celery.
"""
