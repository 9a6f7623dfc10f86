"""Activation memory and recompute time of the transformer layers, per model.activation_checkpointing
mode (the model side: vptrain/models/recompute.py). Pure Python, like the rest of the cost model.

What one layer keeps for its backward, per token, in elements of the activation dtype (h hidden,
I the MLP width: 4h for gpt), as autograd saves it on the CPU kernels (flash-style attention keeps
no s x s scores; tests/unit/test_activation_checkpointing.py measures these):

    part                   gpt                              llama
    input x                1 (ln_1's input)                 1 (the norm's input)
    attention interior     4: ln_1 output, q, k, v          5: normalised x and its scaled copy,
                                                               rotated q, k and v repeated to nh heads
    attention output y     1 (the output projection's input)
    residual               1 (ln_2's input)
    MLP interior           5: ln_2 output, fc output (4h)   2 + 3I: the norm's two, gate, silu, up
    MLP activation a       4 (GELU output)                  I (silu(gate) * up)

    none       everything: gpt 16h, llama 10h + 4I
    selective  x, y, the residual and a: gpt 7h, llama 3h + I (the interiors are recomputed)
    full       x: h

plus per-token statistics of a few elements (norm statistics, the attention's log-sum-exp) that the
plan leaves out. A chunk of L layers keeps L layers' worth plus its output (h), which the pipeline
holds until the chunk's backward.

Recompute runs inside a layer's backward, one layer (selective: one of its two parts) at a time, so
besides the in-flight microbatches a rank holds, transiently, what that recomputation rebuilds
(`recompute_transient_bytes`), and each B runs the recomputed forward again (`recompute_flops`:
full, the layer's forward; selective, the q/k/v and fc (gate, up) GEMMs and the attention).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vptrain.schedule.costs import ModelShape

MODES = ("none", "full", "selective")


def _parts(arch: str, hidden: int, intermediate: int) -> dict[str, int]:
    """Elements per token of each part of one layer (module docstring's table)."""
    h = hidden
    if arch == "llama":
        return {"input": h, "attention_interior": 5 * h, "attention_output": h, "residual": h,
                "mlp_interior": 2 * h + 3 * intermediate, "mlp_activation": intermediate}
    return {"input": h, "attention_interior": 4 * h, "attention_output": h, "residual": h,
            "mlp_interior": 5 * h, "mlp_activation": 4 * h}


KEPT = {
    "none": ("input", "attention_interior", "attention_output", "residual", "mlp_interior", "mlp_activation"),
    "selective": ("input", "attention_output", "residual", "mlp_activation"),
    "full": ("input",),
}


def kept_per_layer(mode: str, *, arch: str, hidden: int, intermediate: int) -> int:
    """Elements per token one layer keeps for its backward under `mode`."""
    if mode not in KEPT:
        raise ValueError(f"model.activation_checkpointing: '{mode}': choose one of {', '.join(MODES)}")
    parts = _parts(arch, hidden, intermediate)
    return sum(parts[name] for name in KEPT[mode])


def _width(m: ModelShape) -> int:
    return m.intermediate if m.arch == "llama" else 4 * m.hidden


def activation_bytes(m: ModelShape, layers: int) -> float:
    """Activations one in-flight microbatch keeps on a chunk of `layers` transformer layers."""
    per_layer = kept_per_layer(m.recompute, arch=m.arch, hidden=m.hidden, intermediate=_width(m))
    return float(per_layer * layers + m.hidden) * m.tokens * m.act_bytes


def pipeline_copies_bytes(m: ModelShape, *, hidden_input: bool, loss_chunk: bool) -> float:
    """Per in-flight microbatch-chunk beside activation_bytes (measured by the activation meter,
    tests/distributed/test_activation_memory.py): DeepSpeed runs a chunk on a clone of its input
    buffer and differentiates into the buffer, so a chunk whose input is a hidden state (all but the
    plain pipeline's first) keeps it twice; the loss chunk's final norm keeps its input beside its output."""
    return float((int(hidden_input) + int(loss_chunk)) * m.hidden) * m.tokens * m.act_bytes


def recompute_transient_bytes(m: ModelShape) -> float:
    """What one recomputation rebuilds while its layer's backward runs (0 without recompute): full,
    the layer's activations beyond its input; selective, the larger of the two recomputed interiors."""
    parts = _parts(m.arch, m.hidden, _width(m))
    if m.recompute == "full":
        rebuilt = sum(parts.values()) - parts["input"]
    elif m.recompute == "selective":
        rebuilt = max(parts["attention_interior"], parts["mlp_interior"])
    else:
        rebuilt = 0
    return float(rebuilt) * m.tokens * m.act_bytes


def recompute_flops(m: ModelShape) -> float:
    """Forward FLOPs one layer runs again in its backward, one microbatch (0 without recompute)."""
    n, h, s = m.tokens, m.hidden, m.seq
    if m.recompute == "none":
        return 0.0
    attention = 4.0 * n * h * s  # QK^T and AV, counted over the full s as layer_flops counts them
    if m.recompute == "full":
        return 2.0 * n * m.layer_weights + attention
    if m.arch == "llama":
        qkv, up = h * h + 2 * h * (m.kv_dim or h), 2 * h * m.intermediate
    else:
        qkv, up = 3 * h * h, 4 * h * h
    return 2.0 * n * (qkv + up) + attention


def weight_grad_input_bytes(m: ModelShape, layers: int) -> float:
    """What a split backward keeps from B to W on a chunk of `layers` layers, one microbatch, beyond
    the saved activations (which W reads and which therefore stay alive until W anyway).

    W computes each weight's gradient as (its GEMM's input)^T x (the gradient of its GEMM's output):
    the inputs are saved activations, but the output gradients exist only during B, so B must keep
    them, one per weight GEMM, in the activation dtype. A norm's weight gradient likewise needs the
    gradient of its output (its normalised input is saved). Per token of one layer:
        gpt    qkv 3h + attention projection h + fc 4h + MLP projection h + two LayerNorms 2h = 11h
        llama  q h + k, v 2*kv + o h + gate, up 2I + down h + two RMSNorms 2h = 5h + 2kv + 2I
    Biases take their gradient from the same output gradients (no extra bytes)."""
    h = m.hidden
    if m.arch == "llama":
        per_layer = 5 * h + 2 * (m.kv_dim or h) + 2 * m.intermediate
    else:
        per_layer = 11 * h
    return float(per_layer * layers) * m.tokens * m.act_bytes
