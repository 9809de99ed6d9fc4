"""The SVFit layer wrapper and its training kernel.

``SVFitLayer`` wraps an ``nn.Linear`` or a transformers ``Conv1D`` (kept as ``base_layer``) and computes

    y = base_layer(x) + ((x V_r) ⊙ (σ − s_r)) U_rᵀ      (= x W'ᵀ + b with W' = W + U_r diag(σ − s_r) V_rᵀ)

with σ ∈ ℝ^r the only trainable tensor. ``_SVFitLinear`` is a custom autograd function that picks, per
call and by a cost rule, the cheapest of three plans (skinny matmuls through V_r and U_r; or W' rebuilt on
the fly, with the σ-gradient from Gᵀ X or from skinny matmuls) and never keeps a materialised W' alive for
backward.

The banded variant (``band`` = d > 0, SVFT's banded form) also trains d upper and d lower off-diagonals of
the r×r coupling Δ = diag(σ − s_r) + band:

    y = base_layer(x) + ((x V_r) Δᵀ) U_rᵀ      (W' = W + U_r Δ V_rᵀ, still rank r)

where z Δᵀ is Δσ ⊙ z plus 2d shifted elementwise products (``banded_product``), in plain autograd.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import SVFitConfig
from .errors import ConfigError, NonFiniteMergeError
from .rank import truncated_svd

SUPPORTED_LAYERS = (nn.Linear, Conv1D)
FORMULATIONS = ("auto", "skinny", "dense", "dense_skinny")

# Cost rule. A matmul (a, b) @ (b, c) costs max(a·b·c, BALANCE · (a·b + b·c + a·c)) multiply-add
# equivalents: below some inner size a skinny matmul is bound by moving its operands, not by arithmetic.
# BALANCE = 16 picked the fastest (or within a few percent of the fastest) plan in CPU measurements over
# r ∈ {8, 64, 256, k} and 512–2048 tokens on 768-wide layers. It is a speed choice only: every plan
# computes the same function and the same gradients.
BALANCE = 16


@dataclass(frozen=True)
class Plan:
    """How one call evaluates the layer: ``forward`` in "skinny" | "dense"; ``grad_sigma`` in
    "skinny" (Σ_t (G U)_t ⊙ (X V)_t) | "outer" (diag(U_rᵀ (Gᵀ X) V_r))."""

    forward: str
    grad_sigma: str


_PLANS = {
    "skinny": Plan("skinny", "skinny"),
    "dense": Plan("dense", "outer"),
    "dense_skinny": Plan("dense", "skinny"),
}


def _mm(a: int, b: int, c: int) -> int:
    return max(a * b * c, BALANCE * (a * b + b * c + a * c))


def plan_cost(plan: Plan, tokens: int, m: int, n: int, r: int, need_x: bool, need_sigma: bool) -> int:
    """Extra cost of ``plan`` over the frozen floor (x Wᵀ forward, G W backward) for a (m, n) layer."""
    t = tokens
    if plan.forward == "skinny":
        cost = _mm(t, n, r) + _mm(t, r, m)  # x V, then (· ⊙ Δσ) U_rᵀ added into y
        if need_x or need_sigma:
            cost += _mm(t, m, r)  # G U, shared by both gradients
        if need_x:
            cost += _mm(t, r, n)  # (G U ⊙ Δσ) V_rᵀ added into grad_x
        return cost
    cost = _mm(m, r, n)  # rebuild W' in forward
    if need_x:
        cost += _mm(m, r, n)  # rebuild W' again in backward rather than keep it alive
    if need_sigma:
        if plan.grad_sigma == "outer":
            cost += _mm(m, t, n) + _mm(r, m, n)  # Gᵀ X, then U_rᵀ (Gᵀ X) ⊙ V_rᵀ
        else:
            cost += _mm(t, n, r) + _mm(t, m, r)  # X V saved in forward, G U in backward
    return cost


# Cached: a training run sees a handful of (tokens, shape) combinations, and on a GPU at small batch sizes
# the per-call Python of scoring three plans is a visible part of a layer's time.
@functools.lru_cache(maxsize=4096)
def choose_plan(tokens: int, m: int, n: int, r: int, need_x: bool, need_sigma: bool) -> Plan:
    """The cheapest plan under the cost rule (ties go to the skinny form)."""
    return min(
        _PLANS.values(),
        key=lambda p: plan_cost(p, tokens, m, n, r, need_x, need_sigma),
    )


def _affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """The base layer's own op on ``weight``, so that W' == W gives bit-identical outputs."""
    if transposed:  # Conv1D stores (in, out) and runs addmm; mirror it exactly
        out = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight)
        return out.view(x.shape[:-1] + (weight.shape[1],))
    return F.linear(x, weight, bias)


def _rebuild(
    weight: torch.Tensor, u: torch.Tensor, d: torch.Tensor, v: torch.Tensor, transposed: bool
) -> torch.Tensor:
    """W + U_r diag(d) V_rᵀ in the base layer's layout (a fresh tensor)."""
    if transposed:
        return torch.addmm(weight, v * d, u.mT)  # (in, out)
    return torch.addmm(weight, u * d, v.mT)  # (out, in)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the base layer would compute in: the autocast dtype when autocast is on, else W's."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and weight.is_floating_point():
        return torch.get_autocast_dtype(device)
    return weight.dtype


class _SVFitLinear(torch.autograd.Function):
    """y = x Wᵀ + b + ((x V) ⊙ d) Uᵀ with gradients for x and d only (W, b, U, V are frozen).

    Autocast is resolved by hand: operands are cast to the dtype the base layer would have used and the
    body runs with autocast off, so outputs match the base layer bit for bit at init in either mode. The
    backward recasts W instead of keeping a low-precision copy alive between the passes.
    """

    @staticmethod
    def forward(ctx, x, d, weight, bias, u, v, transposed, formulation):
        m, n = u.shape[0], v.shape[0]
        tokens = x.numel() // n if n else 0
        need_x, need_sigma = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        plan = (
            choose_plan(tokens, m, n, d.shape[0], need_x, need_sigma)
            if formulation == "auto"
            else _PLANS[formulation]
        )
        dtype = _compute_dtype(x, weight)
        with torch.autocast(x.device.type, enabled=False):
            x_c, w_c, u_c, v_c, d_c = (t.to(dtype) for t in (x, weight, u, v, d))
            b_c = None if bias is None else bias.to(dtype)
            x2 = x_c.reshape(-1, n)  # (T, n)
            xv = None
            if plan.forward == "skinny":
                y = _affine(x_c, w_c, b_c, transposed)
                xv = x2 @ v_c  # (T, r)
                # In place into the fresh output: with d == 0 this adds exact zeros, so y is
                # bit-identical to the base layer's output at init.
                y.view(-1, m).addmm_(xv * d_c, u_c.mT)
            else:
                y = _affine(x_c, _rebuild(w_c, u_c, d_c, v_c, transposed), b_c, transposed)
                if need_sigma and plan.grad_sigma == "skinny":
                    xv = x2 @ v_c

        # x itself (not its cast) for the outer product: the caller usually keeps x alive anyway
        saved_x = x if need_sigma and plan.grad_sigma == "outer" else None
        saved_xv = xv if need_sigma else None
        ctx.save_for_backward(saved_x, saved_xv, d, weight, u, v)
        ctx.plan, ctx.transposed, ctx.dtype = plan, transposed, dtype
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, xv, d, weight, u, v = ctx.saved_tensors
        plan, transposed, dtype = ctx.plan, ctx.transposed, ctx.dtype
        need_x, need_sigma = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        m, n = u.shape[0], v.shape[0]
        u_c, v_c, d_c = u.to(dtype), v.to(dtype), d.to(dtype)
        g2 = grad_y.to(dtype).reshape(-1, m)  # (T, m)

        grad_x = grad_d = gu = None
        if plan.forward == "skinny" or (need_sigma and plan.grad_sigma == "skinny"):
            gu = g2 @ u_c  # (T, r)

        if need_x:
            w_c = weight.to(dtype)
            if plan.forward == "skinny":
                grad_x = g2 @ (w_c.mT if transposed else w_c)  # G W, W as (out, in)
                grad_x.addmm_(gu * d_c, v_c.mT)
            else:
                w_new = _rebuild(w_c, u_c, d_c, v_c, transposed)  # rebuilt, never kept from forward
                grad_x = g2 @ (w_new.mT if transposed else w_new)
                del w_new
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)

        if need_sigma:
            # accumulate in at least fp32: a bf16 sum over thousands of tokens loses the signal
            acc = torch.promote_types(dtype, torch.float32)
            if plan.grad_sigma == "skinny":
                grad_d = (gu * xv).sum(0, dtype=acc)
            else:
                outer = g2.mT @ x.to(dtype).reshape(-1, n)  # (m, n) = Gᵀ X
                grad_d = ((u_c.mT @ outer) * v_c.mT).sum(1, dtype=acc)  # diag(Uᵀ Gᵀ X V)
            grad_d = grad_d.to(d.dtype)
        return grad_x, grad_d, None, None, None, None, None, None


def svfit_linear(
    x: torch.Tensor,
    delta: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    u: torch.Tensor,
    v: torch.Tensor,
    *,
    transposed: bool = False,
    formulation: str = "auto",
) -> torch.Tensor:
    """Functional form of the layer; ``delta`` = σ − s_r. Exposed for gradient checks and benchmarks."""
    return _SVFitLinear.apply(x, delta, weight, bias, u, v, transposed, formulation)


# -- the banded coupling --------------------------------------------------------------------------------
# The off-diagonals live in one flat fp32 vector, diagonal by diagonal: for j = 1..d, first the upper one
# (Δ[i, i + j], r − j entries), then the lower one (Δ[i + j, i], r − j entries). Exactly the trained numbers,
# no padding: its length is the parameter count 2·Σ_{j=1..d} (r − j).


def effective_band(band: int, r: int) -> int:
    """The band an r×r coupling can hold: an r×r matrix has r − 1 off-diagonals on each side."""
    return max(0, min(band, r - 1))


def band_size(r: int, band: int) -> int:
    """Entries of the d = ``effective_band(band, r)`` upper and d lower off-diagonals: 2·Σ_{j=1..d} (r − j)."""
    return 2 * sum(r - j for j in range(1, effective_band(band, r) + 1))


def _diagonals(weights: torch.Tensor, r: int, band: int):
    """(j, upper_j (r − j,), lower_j (r − j,)) for j = 1..band, views into the flat ``weights``."""
    offset = 0
    for j in range(1, band + 1):
        n = r - j
        yield j, weights[offset:offset + n], weights[offset + n:offset + 2 * n]
        offset += 2 * n


def coupling_matrix(delta: torch.Tensor, weights: torch.Tensor, band: int) -> torch.Tensor:
    """Δ (r, r) = diag(``delta``) + the ``band`` off-diagonals packed in ``weights``."""
    out = torch.diag(delta)
    for j, upper, lower in _diagonals(weights, delta.numel(), band):
        out = out + torch.diag(upper, j) + torch.diag(lower, -j)
    return out


def banded_product(z: torch.Tensor, delta: torch.Tensor, weights: torch.Tensor, band: int) -> torch.Tensor:
    """z Δᵀ for z (..., r) and the banded Δ, without forming Δ: (z Δᵀ)_i = Σ_k Δ[i, k] z_k, so the upper
    diagonal Δ[i, i + j] reads z_{i+j} into i < r − j and the lower Δ[i + j, i] reads z_i into i + j."""
    out = z * delta
    for j, upper, lower in _diagonals(weights, delta.numel(), band):
        out = out + F.pad(z[..., j:] * upper, (0, j)) + F.pad(z[..., :-j] * lower, (j, 0))
    return out


def weight_sha256(weight: torch.Tensor, precision: torch.dtype | None = None) -> str:
    """sha256 of a weight's shape and float32 values (layout as stored).

    Hashing float32 values rather than raw bytes makes a bf16 checkpoint and its exact fp32 upcast hash
    the same, so an adapter trained on one loads on the other. ``precision`` (bf16 or fp16) rounds the
    weight to that dtype first: a GPU run that loaded an fp32 checkpoint in bf16 trained on, and hashed, the
    rounded values, and an fp32 load of the same checkpoint verifies its adapter this way.
    """
    h = hashlib.sha256(repr(tuple(weight.shape)).encode())
    t = weight.detach()
    if precision is not None:
        t = t.to(precision)  # round to nearest even, as loading the checkpoint in that dtype does
    t = t.to(device="cpu", dtype=torch.float32).contiguous()
    h.update(t.view(torch.uint8).numpy().data)
    return h.hexdigest()


class SVFitLayer(nn.Module):
    """y = base_layer(x) + ((x V_r) ⊙ (σ − s_r)) U_rᵀ; with ``band`` d > 0, y = base_layer(x) + ((x V_r) Δᵀ) U_rᵀ.

    ``base_layer`` is the original ``nn.Linear`` (weight (out, in)) or ``Conv1D`` (weight (in, out)), frozen.
    Buffers: ``U`` (out, r), ``V`` (in, r) in the base weight's dtype and ``s`` (r,) float32 — the trained
    singular triplets of the base weight taken in (out, in) layout. Parameter: ``sigma`` (r,) float32,
    initialised to ``s`` so the layer is the base layer bit for bit until σ moves. With d > 0 (capped at
    r − 1) also ``band_weights`` (2·Σ_{j=1..d} (r − j),) float32: the off-diagonals of Δ (packed as the comment
    above ``effective_band`` says), initialised to exact zeros; that path runs in plain autograd, not the fused
    kernel, whatever ``formulation`` says.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        u: torch.Tensor,
        s: torch.Tensor,
        v: torch.Tensor,
        *,
        sigma: torch.Tensor | None = None,
        formulation: str = "auto",
        band: int = 0,
        band_weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, SUPPORTED_LAYERS):
            raise ConfigError(
                f"SVFit wraps nn.Linear or Conv1D, got {type(base_layer).__name__}", code="invalid_target_modules"
            )
        self.base_layer = base_layer
        self.transposed = isinstance(base_layer, Conv1D)
        self.out_features, self.in_features = self._weight_shape()
        r = s.numel()
        if u.shape != (self.out_features, r) or v.shape != (self.in_features, r):
            raise ValueError(
                f"bases do not fit a ({self.out_features}, {self.in_features}) weight: "
                f"U {tuple(u.shape)}, V {tuple(v.shape)}, s {tuple(s.shape)}"
            )
        for p in base_layer.parameters():
            p.requires_grad_(False)
        weight = base_layer.weight
        # U_r, V_r in the base's dtype: the kernel computes in that dtype (or the autocast one) anyway, and on
        # a bf16 base fp32 copies would double what the bases cost. s and σ stay fp32: σ is what trains, and
        # σ − s is then exactly zero at init. Merge and export upcast U, V to fp32 themselves.
        bases = dict(device=weight.device, dtype=weight.dtype)
        f32 = dict(device=weight.device, dtype=torch.float32)
        self.register_buffer("U", u.detach().to(**bases).contiguous())
        self.register_buffer("V", v.detach().to(**bases).contiguous())
        self.register_buffer("s", s.detach().to(**f32).contiguous())
        init = self.s if sigma is None else sigma.detach().to(**f32)
        self.sigma = nn.Parameter(init.clone())
        self.band = effective_band(band, r)
        if self.band:
            size = band_size(r, self.band)
            packed = torch.zeros(size, **f32) if band_weights is None else band_weights.detach().to(**f32).clone()
            if packed.shape != (size,):
                raise ValueError(f"band_weights of a band-{self.band} rank-{r} layer have {size} entries, "
                                 f"got shape {tuple(packed.shape)}")
            self.band_weights = nn.Parameter(packed)
        else:
            self.register_parameter("band_weights", None)
        # The Δσ (or banded Δ) folded into the base weight while merged, so unmerge subtracts exactly that.
        self.register_buffer("merged_delta", None, persistent=False)
        self.formulation = formulation
        # While True the layer is its base (ΔW = 0): the reference policy of reinforcement fine-tuning, with no
        # second copy of the model (SVFitModel.disable_adapter).
        self.disabled = False

    @classmethod
    def from_base(cls, base_layer: nn.Module, config: SVFitConfig, **kwargs) -> SVFitLayer:
        """Run the float32 SVD of ``base_layer``'s weight and keep the triplets ``config`` selects."""
        weight = base_layer.weight.detach()
        u, s, v = truncated_svd(weight.mT if isinstance(base_layer, Conv1D) else weight, config)
        kwargs.setdefault("band", config.band)
        return cls(base_layer, u, s, v, **kwargs)

    # -- shape helpers ---------------------------------------------------------------------------------

    def _weight_shape(self) -> tuple[int, int]:
        w = self.base_layer.weight
        return (w.shape[1], w.shape[0]) if self.transposed else (w.shape[0], w.shape[1])

    @property
    def rank(self) -> int:
        return self.s.numel()

    @property
    def merged(self) -> bool:
        return self.merged_delta is not None

    @property
    def formulation(self) -> str:
        return self._formulation

    @formulation.setter
    def formulation(self, value: str) -> None:
        if value not in FORMULATIONS:
            raise ConfigError(f"formulation must be one of {FORMULATIONS}, got {value!r}")
        self._formulation = value

    def delta_sigma(self) -> torch.Tensor:
        """σ − s_r (r,)."""
        return self.sigma - self.s

    def coupling(self) -> torch.Tensor:
        """The full coupling Δ (r, r) = diag(σ − s_r) + the trained off-diagonals (the diagonal alone at band 0)."""
        if not self.band:
            return torch.diag(self.delta_sigma())
        return coupling_matrix(self.delta_sigma(), self.band_weights, self.band)

    def _update(self) -> torch.Tensor:
        """What ΔW is made of: Δσ (r,) at band 0, so that path stays exactly the diagonal one; else Δ (r, r)."""
        return self.coupling() if self.band else self.delta_sigma()

    def base_weight_out_in(self) -> torch.Tensor:
        """The base weight as an (out, in) view, whatever the layer's storage layout."""
        w = self.base_layer.weight
        return w.mT if self.transposed else w

    # -- merge -----------------------------------------------------------------------------------------

    def get_delta_weight(self, delta: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW = U_r diag(Δσ) V_rᵀ (or U_r Δ V_rᵀ for a (r, r) ``delta``, the banded case) in float32 and in
        the base layer's layout ((in, out) for Conv1D)."""
        d = (self._update() if delta is None else delta).detach().to(torch.float32)
        if d.ndim == 2:
            delta_w = (self.U.float() @ d) @ self.V.float().mT  # (out, in)
        else:
            delta_w = (self.U.float() * d) @ self.V.float().mT  # (out, in) float32, whatever the bases' dtype
        return delta_w.mT if self.transposed else delta_w

    def merge(self, name: str | None = None) -> None:
        """Fold ΔW into the base weight. Checks the result on a copy first; raises ``NonFiniteMergeError``
        and leaves the weight untouched when it is not finite."""
        if self.merged:
            return
        d = self._update().detach().to(torch.float32).clone()
        weight = self.base_layer.weight
        merged = weight.detach().to(torch.float32) + self.get_delta_weight(d)
        if not torch.isfinite(merged).all():
            where = f" {name}" if name else ""
            raise NonFiniteMergeError(f"merging SVFit layer{where} would produce non-finite weights", module=name)
        with torch.no_grad():
            weight.copy_(merged.to(weight.dtype))
        self.merged_delta = d

    def unmerge(self) -> None:
        """Subtract the ΔW that ``merge`` added (the Δσ or Δ recorded then, not the current one)."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        with torch.no_grad():
            restored = weight.detach().to(torch.float32) - self.get_delta_weight(self.merged_delta)
            weight.copy_(restored.to(weight.dtype))
        self.merged_delta = None

    # -- forward ---------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        if self.band:
            return self._banded_forward(x)
        return svfit_linear(
            x,
            self.delta_sigma(),
            self.base_layer.weight,
            self.base_layer.bias,
            self.U,
            self.V,
            transposed=self.transposed,
            formulation=self.formulation,
        )

    def _banded_forward(self, x: torch.Tensor) -> torch.Tensor:
        """base_layer(x) + ((x V_r) Δᵀ) U_rᵀ in plain autograd. The base output is the base layer's own op and
        the update is added to it, so at init (Δ = 0) it is the base output bit for bit."""
        y = self.base_layer(x)
        dtype = _compute_dtype(x, self.base_layer.weight)
        with torch.autocast(x.device.type, enabled=False):
            z = x.reshape(-1, self.in_features).to(dtype) @ self.V.to(dtype)  # (T, r)
            # the coupling in fp32: σ and the off-diagonals get fp32 gradients summed over the tokens
            zd = banded_product(z.float(), self.delta_sigma(), self.band_weights, self.band)  # (T, r) = z Δᵀ
            update = zd.to(dtype) @ self.U.to(dtype).mT  # (T, out)
        return y + update.view(y.shape)

    def extra_repr(self) -> str:
        band = f", band={self.band}" if self.band else ""
        return f"rank={self.rank}{band}, in_features={self.in_features}, out_features={self.out_features}"
