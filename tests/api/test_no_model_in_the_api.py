"""The API holds no model: building the app and routing inference never imports torch or transformers (the
replicas do that), which is what keeps its memory small whatever the models served."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_api_app_imports_no_tensor_library(tmp_path):
    code = f"""
import sys
from api.core.settings import Settings
from api.main import create_app
app = create_app(Settings(data_dir={str(tmp_path)!r}, serving_token="t"), dispatch=lambda job_id: None,
                 auto_migrate=True)
import api.routes.inference, api.routing.forwarder, api.routing.pool, api.core.route_targets
heavy = sorted(name for name in ("torch", "transformers", "peft", "safetensors", "serving") if name in sys.modules)
print(",".join(heavy))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
