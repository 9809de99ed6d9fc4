"""Optimizer parameter groups shared by every method: the method's own parameters (σ, LoRA factors, or the
whole body) and the task head (``head_modules``: with a classifier's pooler, which trains in full like the
head and so at its learning rate), each with its own learning rate and weight decay.

Weight decay goes to matrices only, never to 1-D tensors (biases, norms, and σ: decaying σ would shrink the
pretrained weight itself, see SVFIT.md). Each group carries ``base_lr`` for the schedule to scale.
"""

from __future__ import annotations

from torch import nn


def is_head_parameter(name: str, head_modules: list[str]) -> bool:
    """A parameter belongs to the head when a component of its dotted name is a head module's name
    (``score.weight``, ``base_model.model.score.modules_to_save.default.weight``)."""
    heads = {h.rsplit(".", 1)[-1] for h in head_modules}
    return any(part in heads for part in name.split("."))


def build_param_groups(
    model: nn.Module,
    head_modules: list[str],
    *,
    body_name: str,
    lr: float,
    head_lr: float,
    weight_decay: float,
    decay_body: bool = True,
) -> list[dict]:
    """Groups of the trainable parameters, in ``named_parameters`` order, empty groups dropped.

    Each group has ``name``, ``params``, ``param_names``, ``lr``, ``base_lr`` and ``weight_decay``;
    ``param_names`` lets a checkpoint store optimizer state by name rather than by position.
    """
    buckets: dict[tuple[str, bool], list[tuple[str, nn.Parameter]]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        head = is_head_parameter(name, head_modules)
        decays = param.ndim >= 2 and (head or decay_body)
        buckets.setdefault((("head" if head else body_name), decays), []).append((name, param))
    groups = []
    for group_name in dict.fromkeys((body_name, "head")):  # head_only's body *is* the head
        for decays in (True, False):
            members = buckets.get((group_name, decays))
            if not members:
                continue
            group_lr = head_lr if group_name == "head" else lr
            groups.append({
                "name": group_name,
                "params": [p for _, p in members],
                "param_names": [n for n, _ in members],
                "lr": group_lr,
                "base_lr": group_lr,
                "weight_decay": weight_decay if decays else 0.0,
            })
    return groups


def count_trainable(groups: list[dict]) -> int:
    return sum(p.numel() for group in groups for p in group["params"])
