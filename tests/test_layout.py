"""The package layout holds: no import circles, no import up the layers, api/ within its share of the code
(scripts/check_layout.py, which states the rules)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _checker():
    spec = importlib.util.spec_from_file_location("check_layout", ROOT / "scripts" / "check_layout.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tree_has_no_circles_no_upward_imports_and_api_within_its_share():
    result = _checker().report()
    assert result["circles"] == []
    assert result["upward_imports"] == []
    assert result["too_big"] == []


def test_the_checker_finds_a_circle_and_an_upward_import():
    checker = _checker()
    graph = {"worker.a": {"worker.b"}, "worker.b": {"worker.a"}, "api.routes": {"worker.a"}, "svfit_core.x": set()}
    assert checker.circles(graph) == [["worker.a", "worker.b"]]
    assert [line.split(" (")[0] for line in checker.upward_imports(graph)] == ["api.routes -> worker.a"]
