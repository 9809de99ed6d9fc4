"""Rank selection: the float32 thin SVD of a weight and the rule that picks which r triplets to train.

Kept apart from the layer so the rules can be tested on matrices with a known spectrum. Also the rule that
keeps the best rank-r′ part of a trained update (``kept_directions``), shared by the LoRA export and the engine,
and the small SVD that puts a banded update into that form (``coupling_svd``).
"""

from __future__ import annotations

import torch

from .config import SVFitConfig


def thin_svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W (m, n) -> U (m, k), s (k,) descending, V (n, k), all float32 whatever W's dtype."""
    # bf16/fp16 SVD is unsupported or inaccurate; float64 would double the cost for no practical gain.
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    return u, s, vh.mT


def select_rank(s: torch.Tensor, config: SVFitConfig) -> int:
    """r for a spectrum ``s`` (descending): fixed, energy-based or full, always clamped to 1 ≤ r ≤ k."""
    k = s.numel()
    if config.rank is not None:
        return max(1, min(config.rank, k))
    if config.energy is None:
        return k
    # float64 cumsum: with τ near 1 the float32 rounding of a long sum moves r by several steps.
    e = s.detach().to(torch.float64)
    e = e * e if config.energy_measure == "squared" else e.abs()
    cum = torch.cumsum(e, dim=0)
    total = cum[-1]
    if total <= 0:  # a zero matrix: one triplet already holds "all" of nothing
        return 1
    # smallest r with cum[r-1] >= τ·total
    r = int((cum < config.energy * total).sum().item()) + 1
    return max(1, min(r, k))


def select_indices(k: int, r: int, train_bottom: bool) -> slice:
    """Which of the k triplets are trained: the top r, or the bottom r for the ablation."""
    return slice(k - r, k) if train_bottom else slice(0, r)


def truncated_svd(
    weight: torch.Tensor, config: SVFitConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The trained triplets of W (m, n): U_r (m, r), s_r (r,), V_r (n, r), float32 and contiguous."""
    u, s, v = thin_svd(weight)
    r = select_rank(s, config)
    idx = select_indices(s.numel(), r, config.train_bottom)
    return u[:, idx].contiguous(), s[idx].contiguous(), v[:, idx].contiguous()


def kept_directions(delta: torch.Tensor, rank: int | None) -> torch.Tensor:
    """Indices (ascending) of the ``rank`` largest |Δσ_i|; all r of them when ``rank`` is None or ≥ r.

    U_r diag(Δσ) V_rᵀ already is an SVD of ΔW (orthonormal columns), so these directions give its best
    rank-``rank`` approximation (Eckart–Young). The LoRA export and the serving engine both pick with this
    function, so an exported adapter and the engine at the same rank agree, ties included. A banded update
    U_r Δ V_rᵀ is first put in that form by ``coupling_svd`` (pass its S as ``delta``).
    """
    r = delta.numel()
    if rank is None or rank >= r:
        return torch.arange(r, device=delta.device)
    return torch.topk(delta.abs(), rank).indices.sort().values


def coupling_svd(coupling: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Δ (r, r) -> P (r, r), S (r,) descending, Q (r, r) float64 with Δ = P diag(S) Qᵀ.

    For a banded update ΔW = U_r Δ V_rᵀ = (U_r P) diag(S) (V_r Q)ᵀ, and U_r P, V_r Q still have orthonormal
    columns, so that is an SVD of ΔW: keeping the r′ largest S is its best rank-r′ approximation, exactly.
    float64: the matrix is tiny, and the kept share should not carry float32 rounding.
    """
    p, s, qh = torch.linalg.svd(coupling.detach().to(torch.float64))
    return p, s, qh.mT
