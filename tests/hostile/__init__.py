"""Hostile input, bounds, fuzzing, isolation and security checks (see SECURITY.md)."""
