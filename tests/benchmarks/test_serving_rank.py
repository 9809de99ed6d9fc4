"""benchmarks/serving_rank.py's energy-kept figure, on a tiny random Llama (seconds): the share of Σ‖Δσ‖² a
serving rank r' keeps grows with r', is exactly 1 from the trained rank r on, and is the share of the r'
largest squares of Δσ per layer (not of the first r' singular directions)."""

from __future__ import annotations

import torch

from benchmarks.serving_rank import delta_sigmas, energy_kept
from svfit_core import SVFitConfig, inject_svfit
from testkit.tiny_models import build_tiny, load_tiny


def test_energy_kept_grows_with_the_serving_rank_and_is_whole_from_the_trained_rank(tmp_path):
    model = load_tiny(build_tiny("llama", "causal", tmp_path), "causal")
    svfit_model = inject_svfit(model, SVFitConfig(rank=None, target_modules="all-linear"))  # r = k
    # Every σ moved by seeded noise of varied size, so the |Δσ| ranking is not the σ ranking.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in svfit_model.svfit_layers().values():
            layer.sigma.add_(torch.randn(layer.rank, generator=g) * torch.rand(layer.rank, generator=g))
    deltas = delta_sigmas(svfit_model)
    r = max(svfit_model.ranks.values())  # 32; k and v have 16
    assert min(svfit_model.ranks.values()) < r  # layers of two ranks: r' between them cuts only some

    shares = [energy_kept(deltas, rank) for rank in range(1, r + 3)]
    assert all(later >= earlier for earlier, later in zip(shares, shares[1:])), shares
    assert all(0.0 < share < 1.0 for share in shares[: r - 1]), shares  # below r something is always cut
    assert shares[r - 1:] == [1.0, 1.0, 1.0] and energy_kept(deltas, None) == 1.0

    # Brute force at r' = 5: the 5 largest squares of each layer's Δσ, summed over layers.
    squares = [d.square().sort(descending=True).values for d in deltas.values()]
    expected = sum(float(s[:5].sum()) for s in squares) / sum(float(s.sum()) for s in squares)
    assert abs(shares[4] - expected) < 1e-12
    first_five = sum(float(d[:5].square().sum()) for d in deltas.values()) / sum(float(s.sum()) for s in squares)
    assert abs(shares[4] - first_five) > 1e-3  # keeping the top singular directions would be a different figure
