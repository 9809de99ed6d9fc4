"""The baselines SVFit is compared against, run through the same data path and loop: LoRA and PiSSA (via HF
PEFT), full fine-tuning, and head-only training (a linear probe for classifiers).

Each method is a small class with the same five operations (see ``methods.Method``): prepare a base model
for training, save its servable weights, load them back for serving or resuming, and build param groups.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from svfit_core.errors import AdapterFormatError
from svfit_core.training.setup_resources import NO_RESOURCES, SetupResources
from svfit_core.training.run_config import HyperparameterError, PeftSpec

HEAD_WEIGHTS = "head_model.safetensors"
PISSA_STATE = "pissa_state.safetensors"


def _unfreeze(model: nn.Module, module_names: list[str]) -> None:
    for name in module_names:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)


class LoraMethod:
    """LoRA through HF PEFT: W + (α/r) B A on the target modules; a classifier's head and pooler train as
    ``modules_to_save``, which PEFT also keeps out of the targets ("all-linear" names `bert.pooler.dense`)."""

    name = "lora"
    body_name = "lora"
    decay_body = True
    head_includes_pooler = True
    init_lora_weights: bool | str = True

    def lora_config(self, spec: PeftSpec, head_modules: list[str], task: str) -> LoraConfig:
        return LoraConfig(
            task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM",
            r=spec.rank,
            lora_alpha=spec.lora_alpha,
            target_modules=spec.target_modules,
            lora_dropout=0.0,  # keeps the comparison with SVFit (which has no dropout of its own) fair
            modules_to_save=list(head_modules) or None,
            init_lora_weights=self.init_lora_weights,
        )

    def prepare(
        self, model: nn.Module, spec: PeftSpec, head_modules: list[str], task: str,
        resources: SetupResources = NO_RESOURCES,
    ) -> nn.Module:
        return get_peft_model(model, self.lora_config(spec, head_modules, task))

    def save(self, model: PeftModel, out_dir: Path) -> None:
        model.save_pretrained(out_dir)

    def load(
        self, base_model: nn.Module, adapter_dir: Path, trainable: bool = False,
        resources: SetupResources = NO_RESOURCES,
    ) -> nn.Module:
        return PeftModel.from_pretrained(base_model, adapter_dir, is_trainable=trainable)

    def save_resume_state(self, model: nn.Module, checkpoint_dir: Path) -> None:
        """Nothing beyond the servable adapter: it holds every trained tensor exactly."""

    def restore(
        self, base_model, spec, head_modules, task, checkpoint_dir: Path, resources: SetupResources = NO_RESOURCES
    ) -> nn.Module:
        return self.load(base_model, checkpoint_dir, trainable=True)


class PissaMethod(LoraMethod):
    """PiSSA: LoRA whose A, B start from the top-r SVD of W, with that part removed from the base weight.

    The trained adapter only works on the modified (residual) base, so the servable adapter is converted to
    a plain LoRA of rank 2r on the original base: ΔW = A B − A₀ B₀ = [A | A₀] [B ; −B₀]. Resuming instead
    rebuilds the PiSSA initialisation (deterministic) and reloads A, B as trained (``pissa_state``).
    """

    name = "pissa"
    init_lora_weights = "pissa"

    def prepare(self, model, spec, head_modules, task, resources: SetupResources = NO_RESOURCES):
        peft_model = super().prepare(model, spec, head_modules, task)
        # A₀, B₀ for the conversion at save time; kept on CPU, they are as small as the adapter.
        peft_model._pissa_initial = {
            k: v.detach().to("cpu", copy=True)
            for k, v in get_peft_model_state_dict(peft_model).items()
            if "lora_A" in k or "lora_B" in k
        }
        return peft_model

    def save(self, model: PeftModel, out_dir: Path) -> None:
        initial = model._pissa_initial
        state = {k: v.detach().to("cpu") for k, v in get_peft_model_state_dict(model).items()}
        for key in list(state):
            if "lora_A" in key:  # (r, in) -> (2r, in)
                state[key] = torch.cat([state[key], initial[key]], dim=0)
            elif "lora_B" in key:  # (out, r) -> (out, 2r)
                state[key] = torch.cat([state[key], -initial[key]], dim=1)
        config = copy.deepcopy(model.peft_config["default"])
        config.init_lora_weights = True
        config.r *= 2
        config.lora_alpha *= 2  # keeps α/r, hence the scale, unchanged
        config.inference_mode = True
        out_dir.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(out_dir)
        save_file({k: v.contiguous() for k, v in state.items()}, out_dir / "adapter_model.safetensors")

    def load(self, base_model, adapter_dir, trainable=False, resources: SetupResources = NO_RESOURCES):
        if trainable:
            raise AdapterFormatError("a converted PiSSA adapter cannot be trained further; resume from a checkpoint")
        return PeftModel.from_pretrained(base_model, adapter_dir)

    def save_resume_state(self, model, checkpoint_dir):
        state = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_file(state, checkpoint_dir / PISSA_STATE)

    def restore(self, base_model, spec, head_modules, task, checkpoint_dir, resources: SetupResources = NO_RESOURCES):
        path = checkpoint_dir / PISSA_STATE
        if not path.is_file():
            raise AdapterFormatError(f"{checkpoint_dir} holds no {PISSA_STATE}; it is not a PiSSA checkpoint")
        model = self.prepare(base_model, spec, head_modules, task)
        result = set_peft_model_state_dict(model, load_file(path))
        if result.unexpected_keys:
            raise AdapterFormatError(f"unexpected tensors in {path}: {result.unexpected_keys[:5]}")
        return model


class FullMethod:
    """Full fine-tuning: every parameter trains. The servable form is a complete HF model folder."""

    name = "full"
    body_name = "full"
    decay_body = True
    # It trains anyway, with the body at the body's rate as it always did: a full checkpoint written before
    # the other methods trained the pooler keeps its optimizer groups when resumed.
    head_includes_pooler = False

    def prepare(self, model, spec, head_modules, task, resources: SetupResources = NO_RESOURCES):
        for param in model.parameters():
            param.requires_grad_(True)
        return model

    def save(self, model, out_dir):
        model.save_pretrained(out_dir, safe_serialization=True)

    def load(self, base_model, adapter_dir, trainable=False, resources: SetupResources = NO_RESOURCES):
        # The checkpoint is a whole model; the base only tells which class and dtype to load it as.
        model = type(base_model).from_pretrained(adapter_dir, dtype=base_model.dtype, trust_remote_code=False)
        return self.prepare(model, None, [], "") if trainable else model

    def save_resume_state(self, model, checkpoint_dir):
        """Nothing beyond the saved model."""

    def restore(self, base_model, spec, head_modules, task, checkpoint_dir, resources: SetupResources = NO_RESOURCES):
        return self.load(base_model, checkpoint_dir, trainable=True)


class HeadOnlyMethod:
    """Only the classification head trains (a linear probe); the servable form is the head's weights."""

    name = "head_only"
    body_name = "head"
    decay_body = True
    # A benchmark baseline: a probe of the encoder as pretrained, so the backbone's pooler stays frozen. The
    # head is every top-level module outside the backbone (DistilBERT's `pre_classifier`, initialised with
    # the head, trains with it), as before pooler training was added for the other methods.
    head_includes_pooler = False

    def prepare(self, model, spec, head_modules, task, resources: SetupResources = NO_RESOURCES):
        if task != "classification" or not head_modules:
            raise HyperparameterError("head_only needs a classification task (a model with a task head)",
                                      param="method")
        for param in model.parameters():
            param.requires_grad_(False)
        _unfreeze(model, head_modules)
        model._head_modules = list(head_modules)
        return model

    def save(self, model, out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {
            f"{name}.{key}": tensor.detach().to("cpu").contiguous()
            for name in model._head_modules
            for key, tensor in model.get_submodule(name).state_dict().items()
        }
        save_file(state, out_dir / HEAD_WEIGHTS)
        (out_dir / "head_config.json").write_text(json.dumps({"head_modules": model._head_modules}, indent=2))

    def load(self, base_model, adapter_dir, trainable=False, resources: SetupResources = NO_RESOURCES):
        path = adapter_dir / HEAD_WEIGHTS
        if not path.is_file():
            raise AdapterFormatError(f"{adapter_dir} holds no {HEAD_WEIGHTS}")
        head_modules = json.loads((adapter_dir / "head_config.json").read_text())["head_modules"]
        result = base_model.load_state_dict(load_file(path), strict=False)
        if result.unexpected_keys:
            raise AdapterFormatError(f"head weights do not fit the base model: {result.unexpected_keys[:5]}")
        base_model._head_modules = list(head_modules)
        if trainable:
            return self.prepare(base_model, None, head_modules, "classification")
        return base_model

    def save_resume_state(self, model, checkpoint_dir):
        """Nothing beyond the head's weights."""

    def restore(self, base_model, spec, head_modules, task, checkpoint_dir, resources: SetupResources = NO_RESOURCES):
        return self.load(base_model, checkpoint_dir, trainable=True)
