"""Tolerances of the equivalence tests (a distributed run against the single-process reference),
derived from the arithmetic rather than fitted to one machine.

Both runs compute the same fp32 gradients, summed in different orders (pipeline stages, data-
parallel all-reduces, vocabulary shards); the gradient norm is summed in fp64, so the clip
coefficient does not add a difference of its own. Call δ the per-element difference between the
two runs' gradients.

SGD moves a parameter by lr·g, linearly: the comparison is tight (SGD_ATOL + RTOL·|θ|, the RTOL
part being the parameter's own fp32 rounding). With lr = SGD_LR it bounds the gradient
differences summed over the steps: Σ_t δ_t ≤ SGD_ATOL / SGD_LR.

AdamW moves a parameter by lr_t·u_t, u = m̂ / (√v̂ + ε). The bias-corrected moments are weighted
means of the gradient history, so δ moves m̂ by at most δ and √v̂ by at most δ, and |m̂| ≤ c·√v̂ with
c = √(Σ w_k² / w'_k) ≤ 1.01 for betas (0.9, 0.95) and the first steps. To first order
    |δu| ≤ δ/(√v̂ + ε) · (1 + c) ≤ 2.01 · δ / ε,
largest where the gradient is near zero. Step t sees at most Σ_k δ_k of difference in its moments,
so the parameters agree to 2.01 · (Σ_t lr_t) · (Σ_t δ_t) / ε.
At the default ε = 1e-8 that bound is vacuous (one ulp of a 1e-2 gradient becomes a step of lr):
whether the comparison passes depends on the machine's rounding. The AdamW cases therefore run
with ADAMW_EPS = 1e-4, below the median gradient of these models (5e-4 to 2e-3): most elements
are still in Adam's normalising regime, the ~20% below ε in its linear one, which is where a wrong
gradient scale (a lost clip, a missing 1/dp) shows, since Adam is blind to scale where |g| ≫ ε.
"""

from __future__ import annotations

from vptrain.config import OptimConfig
from vptrain.optim import lr_factor

RTOL = 1e-5
SGD_LR = 0.5
SGD_ATOL = 1e-7
ADAMW_EPS = 1e-4
ADAM_SENSITIVITY = 2.01  # (1 + c) above


def learning_rates(optim: OptimConfig, steps: int) -> list[float]:
    """The lr of each optimizer step, as vptrain's schedule sets it."""
    return [optim.lr * lr_factor(step, optim, steps) for step in range(steps)]


def adamw_atol(optim: OptimConfig, steps: int) -> float:
    """How far AdamW's parameters may move apart given the gradient differences SGD's comparison allows."""
    grad_diff = SGD_ATOL / SGD_LR
    return ADAM_SENSITIVITY * sum(learning_rates(optim, steps)) * grad_diff / optim.eps
