"""The training run the service builds for a request that leaves every hyperparameter "auto".

Quality benchmarks measure the service's defaults through this, so a change of the defaults
(`api.core.job_spec`, `svfit_core.training.run_config`) changes what they measure, with nothing copied here.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any


def service_job(peft_request: dict[str, Any], n_examples: int, seed: int,
                hyperparameters_request: dict[str, Any] | None = None, **overrides: Any):
    """``(PeftSpec, TrainConfig, hyperparameters)`` for a job created with ``peft=peft_request`` and
    ``hyperparameters=hyperparameters_request`` (None: every one "auto") on ``n_examples`` training lines. ``overrides`` replace TrainConfig fields the service
    leaves to the request or the machine (``max_seq_length``, ``device``, ``label_names``)."""
    from api.core.job_spec import peft_spec, resolve_request, train_config

    peft, hyperparameters = resolve_request(peft_request, hyperparameters_request or {}, n_examples=n_examples)
    config = train_config(hyperparameters, peft, seed=seed, default_checkpoint_every=None)
    return peft_spec(peft), replace(config, **overrides), hyperparameters
