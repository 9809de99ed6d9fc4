"""The training methods behind one interface, so the loop, checkpoints and artifacts never branch on the
method: SVFit here, the baselines in ``baselines.py``.

A method knows how to ``prepare`` a freshly loaded base model (inject adapters, choose what trains), ``save``
its servable weights into a folder, ``load`` them onto a base model, save anything more that resuming needs
(``save_resume_state``), and ``restore`` a checkpoint for further training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from torch import nn

from svfit_core.training.baselines import FullMethod, HeadOnlyMethod, LoraMethod, PissaMethod
from svfit_core.config import SVFitConfig
from svfit_core.errors import ConfigError
from svfit_core.model import SVFitModel, inject_svfit
from svfit_core.training.param_groups import build_param_groups
from svfit_core.serialization import load_svfit_adapter, save_svfit_adapter
from svfit_core.targets import DEFAULT_TARGETS
from svfit_core.training.run_config import HyperparameterError, PeftSpec
from svfit_core.training.setup_resources import NO_RESOURCES, SetupResources


class Method(Protocol):
    name: str
    body_name: str  # the param group name of the method's own parameters
    decay_body: bool  # whether weight decay may apply to those (never for σ)
    # Whether the backbone's pooler (targets.BACKBONE_POOLERS) joins a classifier's head: ``head_modules``
    # then names it, and it trains in full with the head, at the head's learning rate, saved with it.
    head_includes_pooler: bool

    def prepare(self, model: nn.Module, spec: PeftSpec, head_modules: list[str], task: str,
                resources: SetupResources = NO_RESOURCES) -> nn.Module: ...
    def save(self, model: nn.Module, out_dir: Path) -> None: ...
    def load(self, base_model: nn.Module, adapter_dir: Path, trainable: bool = False,
             resources: SetupResources = NO_RESOURCES) -> nn.Module: ...
    def save_resume_state(self, model: nn.Module, checkpoint_dir: Path) -> None: ...
    def restore(self, base_model: nn.Module, spec: PeftSpec, head_modules: list[str], task: str,
                checkpoint_dir: Path, resources: SetupResources = NO_RESOURCES) -> nn.Module: ...


class SVFitMethod:
    """SVFit: only the singular values σ of the target matrices train (plus a classifier's head and pooler)."""

    name = "svfit"
    body_name = "svfit"
    decay_body = False  # weight decay on σ would shrink the pretrained weight itself
    head_includes_pooler = True

    def svfit_config(self, spec: PeftSpec, head_modules: list[str]) -> SVFitConfig:
        return SVFitConfig(
            rank=spec.rank,
            energy=spec.energy,
            energy_measure=spec.energy_measure,
            target_modules=spec.target_modules,
            train_bottom=spec.train_bottom,
            band=spec.band,
            # Without a basis store, U and V go into every adapter: serving and resuming then never depend
            # on an SVD recomputed bit for bit on another machine. With one, adapters name their bases in it.
            store_bases=True,
            modules_to_save=list(head_modules),
        )

    def prepare(self, model, spec, head_modules, task, resources=NO_RESOURCES):
        return inject_svfit(
            model, self.svfit_config(spec, head_modules), bases=resources.bases, on_progress=resources.on_progress
        )

    def save(self, model: SVFitModel, out_dir):
        save_svfit_adapter(model, out_dir)

    def load(self, base_model, adapter_dir, trainable=False, resources=NO_RESOURCES):
        return load_svfit_adapter(base_model, adapter_dir, is_trainable=trainable, bases=resources.bases)

    def save_resume_state(self, model, checkpoint_dir):
        """Nothing beyond the adapter: it stores σ and the head exactly, and the bases or their keys."""

    def restore(self, base_model, spec, head_modules, task, checkpoint_dir, resources=NO_RESOURCES):
        return self.load(base_model, checkpoint_dir, trainable=True, resources=resources)


METHODS: dict[str, Method] = {
    "svfit": SVFitMethod(),
    "lora": LoraMethod(),
    "pissa": PissaMethod(),
    "full": FullMethod(),
    "head_only": HeadOnlyMethod(),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise HyperparameterError(f"unknown method {name!r} (expected one of {tuple(METHODS)})",
                                  param="method") from None


def attention_targets(model: nn.Module) -> list[str] | None:
    """The architecture's q/v projections: the smaller target set a job that does not fit can fall back to
    (``preflight``). Falls back to PEFT's table for architectures SVFit has no entry for."""
    model_type = getattr(model.config, "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[model_type])
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    if model_type in PEFT_DEFAULTS:
        return list(PEFT_DEFAULTS[model_type])
    raise ConfigError(
        f"no default target modules for model_type {model_type!r}; pass target_modules explicitly",
        code="no_default_targets",
    )


def setup_method(
    model: nn.Module,
    spec: PeftSpec,
    head_modules: list[str],
    task: str,
    *,
    lr: float,
    head_lr: float,
    weight_decay: float,
    checkpoint_dir: Path | None = None,
    resources: SetupResources = NO_RESOURCES,
) -> tuple[nn.Module, list[dict]]:
    """Prepare ``model`` for ``spec.method`` (or restore it from ``checkpoint_dir``) -> (model, param groups)."""
    method = get_method(spec.method)
    if checkpoint_dir is None:
        model = method.prepare(model, spec, head_modules, task, resources)
    else:
        model = method.restore(model, spec, head_modules, task, checkpoint_dir, resources)
    groups = build_param_groups(
        model, head_modules, body_name=method.body_name, lr=lr, head_lr=head_lr,
        weight_decay=weight_decay, decay_body=method.decay_body,
    )
    if not groups:
        raise HyperparameterError(f"method {spec.method!r} left no parameter to train", param="method")
    return model, groups
