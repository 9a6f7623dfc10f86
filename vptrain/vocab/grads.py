"""Small helpers at the boundary between the vocabulary passes and autograd.

The per-token upstream gradient g (loss mask, 1/#tokens, 1/#microbatches, loss scale) is made once
by whoever owns the loss and handed to every rank's T; these helpers never recompute it from a rank's
own view of the batch, except `token_grad`, the closed form for a masked mean, which the loss owner
(or the synchronous interlaced step) may use instead of autograd.
"""

from __future__ import annotations

import torch

from vptrain.vocab.shard import IGNORE_INDEX


def token_grad(labels: torch.Tensor, normalizer: float | torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
    """g_n = ∂L/∂ℓ_n for L = scale * Σ_n ℓ_n / normalizer over kept tokens: [N] fp32.

    normalizer may be a 0-dim device tensor (a token count the host never reads).
    """
    kept = (labels.reshape(-1) != IGNORE_INDEX).to(torch.float32)
    return kept * (scale / normalizer)


def apply_token_grad(grad_x_hat: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """alg2: ∇X = ∇X̂ ⊙_row g (the loss owner's step once g is known). fp32 [N, h]."""
    return grad_x_hat * g.reshape(-1, 1).to(grad_x_hat.dtype)


def accumulate_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    """Add grad into param.grad through autograd, cast to the parameter's dtype.

    Going through backward() (rather than writing .grad) is what makes DeepSpeed/ZeRO's
    gradient hooks fire and keeps bf16 accumulation under autograd's rules. A tied weight simply
    receives this twice (input-layer IB and output-layer T).
    """
    if not param.requires_grad or param.grad_fn is not None:
        raise ValueError("accumulate_grad needs a leaf tensor with requires_grad=True")
    param.backward(grad.to(param.dtype))
