"""Builders shared by the tests and the benchmarks: tiny random models from configs (`tiny_models`) and
throwaway PostgreSQL databases (`databases`). Not part of the installed service."""
