"""Activation recompute (model.activation_checkpointing), one rule for both architectures.

A transformer layer is written as four pieces, the same in gpt.py and llama.py:

    y = attention_core(x)      norm, q/k/v projections (+ rotary), scaled-dot-product attention
    h = x + attention_out(y)   the attention's output projection
    a = mlp_activation(h)      norm, fc + GELU (gpt) or silu(gate) * up (llama)
    out = h + mlp_out(a)       the MLP's down projection

and run under one of three modes:

    none        autograd keeps every intermediate tensor until the layer's backward
    full        the whole layer is recomputed in its backward: only its input x is kept
    selective   attention_core and mlp_activation are recomputed: kept are the layer input x, the
                attention output y, the residual h and the activation a (the inputs of the two output
                projections, which are not recomputed). The recompute costs the q/k/v and fc (gate,
                up) GEMMs and the attention, not the output projections

Recompute is torch.utils.checkpoint without re-entrance: the backward graph is the one the forward
built, the recomputation re-runs the same kernels on the same inputs, so losses and gradients are
bitwise those of `none` (tests/unit/test_activation_checkpointing.py). It lives inside each layer's
forward, so every engine (single process, DeepSpeed's pipeline, V-Half) gets it unchanged: they
backpropagate stage outputs with torch.autograd.backward, which runs the recomputation. The cost
model's side is vptrain/schedule/activations.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from vptrain.config import ACTIVATION_CHECKPOINTING


def check_mode(mode: str) -> str:
    if mode not in ACTIVATION_CHECKPOINTING:
        choices = ", ".join(ACTIVATION_CHECKPOINTING)
        raise ValueError(f"model.activation_checkpointing: '{mode}': choose one of {choices}")
    return mode


def recomputed(fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
    """fn(*args), keeping only its inputs for the backward, which recomputes the rest. Without
    autograd (evaluation) there is nothing to keep: fn runs plainly. The models draw no random
    numbers (no dropout), so there is no RNG state to replay."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)


def _plain(fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
    return fn(*args)


class RecomputedLayer(nn.Module):
    """A pre-norm transformer layer from its four pieces (module docstring), run in `mode`.
    Subclasses define the pieces; they hold no state here beyond the mode, so parameter names are
    those of the plain layer."""

    def __init__(self, mode: str):
        super().__init__()
        self.recompute = check_mode(mode)

    def attention_core(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def attention_out(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mlp_activation(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mlp_out(self, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute == "full":
            return recomputed(self._layer, x)
        return self._layer(x)

    def _layer(self, x: torch.Tensor) -> torch.Tensor:
        part = recomputed if self.recompute == "selective" else _plain
        h = x + self.attention_out(part(self.attention_core, x))
        return h + self.mlp_out(part(self.mlp_activation, h))
