"""Model FLOPs per step and device peak rates (the paper's counting, Table 4).

Training FLOPs (forward + backward) per sequence of s tokens:
transformer layer s*h*(72h + 12s) (llama: s*(6*weights + 12hs)), output layer 6*s*h*V, input layer
3*s*h. No causal halving, as the paper's artifact counts; the vocabulary layers are included.
"""

from __future__ import annotations

from vptrain.config import RunConfig, default_intermediate_size


def transformer_layer_flops(cfg: RunConfig, tokens: int) -> float:
    h, s = cfg.model.hidden_size, cfg.model.seq_len
    if cfg.model.arch == "llama":  # 6 FLOPs per weight and token (GQA k/v, SwiGLU), attention as the GPT's
        m = cfg.model
        kv = (m.num_kv_heads or m.num_heads) * (h // m.num_heads)
        weights = 2 * h * h + 2 * h * kv + 3 * h * (m.intermediate_size or default_intermediate_size(h))
        return tokens * (6 * weights + 12 * h * s)
    return tokens * h * (72 * h + 12 * s)


def output_layer_flops(cfg: RunConfig, tokens: int) -> float:
    return 6.0 * tokens * cfg.model.hidden_size * cfg.model.vocab_size


def input_layer_flops(cfg: RunConfig, tokens: int) -> float:
    return 3.0 * tokens * cfg.model.hidden_size


def step_flops(cfg: RunConfig) -> float:
    """Training FLOPs of one optimizer step over the whole global batch."""
    tokens = cfg.train.global_batch_size * cfg.model.seq_len
    return (
        cfg.model.num_layers * transformer_layer_flops(cfg, tokens)
        + output_layer_flops(cfg, tokens)
        + input_layer_flops(cfg, tokens)
    )


def peak_tflops(cfg: RunConfig) -> float:
    """The dense peak of the precision the run uses (fp32 runs against the fp32 rate, not the bf16
    tensor-core rate), from the same device profile as the plan's MFU."""
    from vptrain.schedule.profiles import device_profile

    return device_profile(cfg.cluster.profile).peak_flops[cfg.precision] / 1e12
