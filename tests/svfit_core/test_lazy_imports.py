"""The library's torch-free modules import without torch, and its top-level names still resolve."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imports_torch(statement: str) -> bool:
    probe = f"import sys; {statement}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.strip() == "True"


@pytest.mark.parametrize("module", [
    "svfit_core", "svfit_core.config", "svfit_core.errors", "svfit_core.training",
    "svfit_core.training.run_config", "svfit_core.training.data", "svfit_core.training.layout",
    "api.core.job_spec", "api.core.job_states",
])
def test_torch_free_modules_do_not_import_torch(module):
    assert not _imports_torch(f"import {module}")


def test_touching_a_torch_name_imports_it():
    assert _imports_torch("import svfit_core; svfit_core.SVFitModel")


def test_every_exported_name_resolves():
    import svfit_core
    import svfit_core.training

    for package in (svfit_core, svfit_core.training):
        for name in package.__all__:
            assert getattr(package, name) is not None, name
