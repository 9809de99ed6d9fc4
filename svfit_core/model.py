"""Injection and the ``SVFitModel`` wrapper: replace target layers in place, freeze the rest, merge.

Freezing is structural: every parameter of the wrapped model is frozen except the σ vectors (and, with
``band`` > 0, the coupling's off-diagonals) of the ``SVFitLayer``s and the parameters of ``modules_to_save``
(a classifier's head and pooler, see ``targets.BACKBONE_POOLERS``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from .bases import BasisStore, basis_key, stored_or_computed
from .config import SVFitConfig
from .errors import ConfigError
from .layer import SVFitLayer, weight_sha256
from .targets import check_adaptable, resolve_modules_to_save, resolve_targets


def _has_svfit_layers(model: nn.Module) -> bool:
    return any(isinstance(m, SVFitLayer) for m in model.modules())


def _replace_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def check_not_injected(model: nn.Module) -> None:
    if isinstance(model, SVFitModel) or _has_svfit_layers(model):
        raise ConfigError("model already carries SVFit layers", code="already_injected")


def attach_layers(
    model: nn.Module,
    config: SVFitConfig,
    layers: dict[str, SVFitLayer],
    modules_to_save: list[str],
    base_hashes: dict[str, str],
) -> SVFitModel:
    """Freeze ``model``, swap ``layers`` in by name, unfreeze the saved modules. Shared by inject and load."""
    overlap = [t for t in layers for h in modules_to_save if t == h or t.startswith(h + ".")]
    if overlap:
        raise ConfigError(
            f"modules {overlap!r} are both SVFit targets and modules_to_save", code="invalid_modules_to_save"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in layers.items():
        _replace_submodule(model, name, layer)
    for name in modules_to_save:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    return SVFitModel(model, config, modules_to_save=modules_to_save, base_hashes=base_hashes)


def inject_svfit(
    model: nn.Module,
    config: SVFitConfig | None = None,
    *,
    bases: BasisStore | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> SVFitModel:
    """Wrap ``config``'s target layers of a transformers model in place and return the ``SVFitModel``.

    ``bases``: a store to take each weight's SVD from, and to keep the ones computed here (bases.py); the
    model then remembers each layer's basis key, and its adapters name them instead of storing U and V.
    ``on_progress(done, total)`` is called after each matrix; it may raise to stop between matrices.

    Raises ``TargetModulesNotFoundError`` when a target matches no linear module, ``UnsupportedLayerError``
    when one is quantized (before any SVD), and ``ConfigError`` for an invalid spec or a model that already
    carries SVFit layers.
    """
    config = config or SVFitConfig()
    check_not_injected(model)
    heads = resolve_modules_to_save(model, config.modules_to_save)
    matched = resolve_targets(model, config.target_modules)
    # A target inside a module trained in full (BERT's `bert.pooler.dense` under "dense") is left to that
    # module, as HF PEFT does for LoRA; a target that *is* a saved module stays a conflict (attach_layers).
    targets = [t for t in matched if not any(t.startswith(h + ".") for h in heads)]
    if matched and not targets:
        raise ConfigError(
            f"every target in {matched!r} lies inside modules_to_save {heads!r}", code="invalid_modules_to_save"
        )
    for name in targets:
        check_adaptable(name, model.get_submodule(name))
    layers: dict[str, SVFitLayer] = {}
    hashes: dict[str, str] = {}
    keys: dict[str, str] = {}
    for done, name in enumerate(targets, start=1):
        base = model.get_submodule(name)
        # hash before wrapping: it identifies exactly the weights the SVD was taken from
        hashes[name] = weight_sha256(base.weight)
        transposed = isinstance(base, Conv1D)
        keys[name] = basis_key(hashes[name], transposed, config)
        weight = base.weight.detach()
        u, s, v = stored_or_computed(weight.mT if transposed else weight, keys[name], config, bases)
        layers[name] = SVFitLayer(base, u, s, v, band=config.band)
        if on_progress is not None:
            on_progress(done, len(targets))
    svfit_model = attach_layers(model, config, layers, heads, hashes)
    if bases is not None:
        svfit_model.basis_keys = keys
    return svfit_model


class SVFitModel(nn.Module):
    """A transformers model whose target layers are ``SVFitLayer``s.

    ``forward``/``generate``/``config`` go to the wrapped model (``.model``); unknown attributes fall
    through to it too. Layer names are full module names of the wrapped model.
    """

    def __init__(
        self,
        model: nn.Module,
        svfit_config: SVFitConfig,
        *,
        modules_to_save: list[str],
        base_hashes: dict[str, str],
    ) -> None:
        super().__init__()
        self.model = model
        self.svfit_config = svfit_config
        self.modules_to_save = list(modules_to_save)
        self.base_hashes = dict(base_hashes)
        # Layer name -> key of its bases in a basis store (bases.py), when they came from one: adapters then
        # name the bases instead of storing U and V.
        self.basis_keys: dict[str, str] = {}

    # -- delegation ------------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)

    @property
    def config(self) -> Any:
        return self.model.config

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # dunders and half-built instances (copy, unpickling) must not recurse into the model
            model = self.__dict__.get("_modules", {}).get("model")
            if name.startswith("__") or model is None:
                raise
            return getattr(model, name)

    # -- introspection ---------------------------------------------------------------------------------

    def svfit_layers(self) -> dict[str, SVFitLayer]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, SVFitLayer)}

    @property
    def ranks(self) -> dict[str, int]:
        """Per-module rank r, by full module name."""
        return {n: layer.rank for n, layer in self.svfit_layers().items()}

    def svfit_parameters(self) -> list[nn.Parameter]:
        """The σ vectors, one per adapted layer, each followed by its layer's off-diagonals when banded (give
        these the high learning rate, no weight decay)."""
        params = []
        for layer in self.svfit_layers().values():
            params.append(layer.sigma)
            if layer.band_weights is not None:
                params.append(layer.band_weights)
        return params

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of ``modules_to_save`` (a classifier's head and pooler)."""
        return [p for name in self.modules_to_save for p in self.model.get_submodule(name).parameters()]

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # -- merge -----------------------------------------------------------------------------------------

    def merge(self) -> None:
        """Fold every ΔW into its base weight (finite-checked per layer before writing)."""
        for name, layer in self.svfit_layers().items():
            layer.merge(name)

    def unmerge(self) -> None:
        for layer in self.svfit_layers().values():
            layer.unmerge()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model is its base: every layer's ΔW is off (PEFT's name for the same switch).
        A merged model cannot switch off what its weights already hold."""
        layers = list(self.svfit_layers().values())
        if any(layer.merged for layer in layers):
            raise ConfigError("a merged SVFit model cannot disable its adapter; unmerge it first")
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disabled = False

    def merge_and_unload(self) -> nn.Module:
        """Merge, then put the original module classes back; returns the plain transformers model.

        The returned model is the wrapped one, modified in place; this wrapper is empty afterwards.
        """
        self.merge()  # all layers first: a non-finite merge then leaves no layer half swapped
        for name, layer in self.svfit_layers().items():
            _replace_submodule(self.model, name, layer.base_layer)
        return self.model
