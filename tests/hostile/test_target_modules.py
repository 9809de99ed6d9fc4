"""`peft.target_modules` that match nothing: accepted at creation, failed by the worker with a clear error.

Why not a 400: knowing a model's module names means building its module tree (transformers, seconds per
request), which the API does not pay at job creation. The API checks the shape of the value (a non-empty
list of names or one pattern, see test_job_bounds.py); the worker, which loads the model anyway, fails the
job before the first step with the training library's `target_modules_not_found` error, naming the
entries that matched nothing and the modules that exist.
"""

from __future__ import annotations

import pytest

from tests.worker.conftest import PEFT, service, tiny_llama  # noqa: F401 — fixtures
from worker import pipeline


@pytest.mark.parametrize("targets", [["no_such_module"], ["q_proj", "not_a_layer"], "nothing-matches-this"])
def test_unmatched_target_modules_fail_the_job_with_a_clear_error(service, targets):  # noqa: F811
    job_id = service.add_job(validation=False, peft={**PEFT, "target_modules": targets})

    assert pipeline.run_job(job_id) == "failed"

    job = service.job(job_id)
    assert job.error["code"] == "target_modules_not_found", job.error
    assert job.error["param"] == "peft.target_modules", job.error
    missing = [t for t in ([targets] if isinstance(targets, str) else targets) if t != "q_proj"]
    assert all(name in job.error["message"] for name in missing), job.error["message"]
    assert "q_proj" in job.error["message"]  # the modules that do exist are listed
    assert "Traceback" not in job.error["message"]
    assert job.fine_tuned_model is None and job.trained_tokens in (None, 0)
