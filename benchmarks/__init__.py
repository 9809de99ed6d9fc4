"""Benchmarks for the SVFit service: `python -m benchmarks.quality`, `python -m benchmarks.speed`."""
