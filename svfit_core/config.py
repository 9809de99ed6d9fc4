"""``SVFitConfig``: the method's options, validated when the config is built.

Rank rule: ``rank`` fixes r; otherwise ``energy`` (τ) picks the smallest r holding τ of the spectrum's
energy; with neither, r = k = min(m, n). r is always clamped to 1 ≤ r ≤ k per matrix.

Band (SVFT's banded variant): ``band`` = d > 0 also trains d upper and d lower off-diagonals of the r×r
coupling Δ, so W' = W + U_r Δ V_rᵀ with Δ = diag(σ − s_r) + band (initialised to zero). Same bases, same
basis-store keys; still exactly a rank-r update. d = 0 is plain SVFit.

Target rule (same as HF PEFT, so specs carry over):
- a list of names: a module matches an entry when its full name equals the entry or ends with
  ``"." + entry`` (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``). Every entry must match
  something, so a typo fails loudly;
- the string ``"all-linear"``: every ``nn.Linear``/``Conv1D`` inside the transformer blocks (never the
  embeddings, ``lm_head``, the pooler or a classification head);
- any other string: a regular expression that must *fully* match the module name (``re.fullmatch``);
- ``None``: the architecture's default (q and v attention projections, see ``targets.DEFAULT_TARGETS``).
  (A training run's ``PeftSpec`` resolves None to "all-linear" before it gets here:
  ``training.run_config.DEFAULT_TARGET_MODULES``.)
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from .errors import ConfigError

ALL_LINEAR = "all-linear"
ENERGY_MEASURES = ("squared", "linear")
# Off-diagonals per side of the coupling matrix; SVFT uses 1 or 2, more makes Δ dense at a small r anyway.
MAX_BAND = 8


@dataclass
class SVFitConfig:
    """Options of one SVFit adapter.

    Attributes:
        rank: fixed r per adapted matrix (clamped to k = min(m, n)).
        energy: τ ∈ (0, 1]; smallest r whose top-r singular values hold τ of the energy. Ignored when
            ``rank`` is set.
        energy_measure: ``"squared"`` (Σ s², the default) or ``"linear"`` (Σ s).
        target_modules: see the module docstring; ``None`` means the architecture default.
        train_bottom: ablation: train the r *smallest* singular values instead of the top r (r is chosen
            by the same rule).
        store_bases: keep U_r, V_r, s_r in the artifact (True) or only σ, recomputing the SVD at load time
            after verifying the base-weight hash (False, "compact").
        modules_to_save: modules trained in full and saved whole (a classification head). ``None`` means
            "a classifier's head and its backbone's pooler (BERT's ``bert.pooler``), if the model is one"
            (``targets.classification_modules``); ``[]`` means none. Entries match like list targets; a
            target inside a saved module is left to it.
    """

    rank: int | None = None
    energy: float | None = None
    energy_measure: Literal["squared", "linear"] = "squared"
    target_modules: list[str] | str | None = None
    train_bottom: bool = False
    store_bases: bool = True
    modules_to_save: list[str] | None = None
    band: int = 0

    def __post_init__(self) -> None:
        self._validate_rank()
        self._validate_band()
        self._validate_energy()
        self._validate_targets()
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(
                isinstance(m, str) and m for m in self.modules_to_save
            ):
                raise ConfigError(
                    f"modules_to_save must be a list of module names, got {self.modules_to_save!r}",
                    code="invalid_modules_to_save",
                )
            self.modules_to_save = list(self.modules_to_save)

    def _validate_rank(self) -> None:
        if self.rank is None:
            return
        # bool is an int subclass; rank=True is a bug, not rank 1.
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}", code="invalid_rank")

    def _validate_band(self) -> None:
        if isinstance(self.band, bool) or not isinstance(self.band, int) or not 0 <= self.band <= MAX_BAND:
            raise ConfigError(
                f"band must be an integer from 0 to {MAX_BAND}, got {self.band!r}", code="invalid_band"
            )

    def _validate_energy(self) -> None:
        if self.energy_measure not in ENERGY_MEASURES:
            raise ConfigError(
                f"energy_measure must be one of {ENERGY_MEASURES}, got {self.energy_measure!r}",
                code="invalid_energy_measure",
            )
        if self.energy is None:
            return
        if isinstance(self.energy, bool) or not isinstance(self.energy, (int, float)):
            raise ConfigError(f"energy must be a number in (0, 1], got {self.energy!r}", code="invalid_energy")
        if not 0.0 < float(self.energy) <= 1.0:
            raise ConfigError(f"energy must be in (0, 1], got {self.energy!r}", code="invalid_energy")
        self.energy = float(self.energy)

    def _validate_targets(self) -> None:
        spec = self.target_modules
        if spec is None or spec == ALL_LINEAR:
            return
        if isinstance(spec, str):
            if not spec:
                raise ConfigError("target_modules must not be an empty string", code="invalid_target_modules")
            try:
                re.compile(spec)
            except re.error as exc:
                raise ConfigError(
                    f"target_modules {spec!r} is not a valid regular expression: {exc}",
                    code="invalid_target_modules",
                ) from exc
            return
        if isinstance(spec, (list, tuple)) and spec and all(isinstance(t, str) and t for t in spec):
            self.target_modules = list(spec)
            return
        raise ConfigError(
            "target_modules must be a non-empty list of module names, a regex string or 'all-linear', "
            f"got {spec!r}",
            code="invalid_target_modules",
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SVFitConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})
