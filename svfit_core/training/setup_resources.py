"""What a run lends its method while setting up a model, besides the model itself: the basis store bases
are taken from and kept in, and a progress callback for the setup's slow part (one call per matrix).

Methods that need neither (the LoRA, full and head-only baselines) accept and ignore it, so the loop never
branches on the method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from svfit_core.bases import BasisStore


@dataclass(frozen=True)
class SetupResources:
    bases: BasisStore | None = None
    # (done, total) after each matrix; it may raise to stop the setup between matrices.
    on_progress: Callable[[int, int], None] | None = None


NO_RESOURCES = SetupResources()
