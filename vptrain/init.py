"""Deterministic, layout-independent parameter initialisation.

Every tensor is drawn from its own generator, seeded by (train.seed, a stable name), so a stage
that builds only its own layers gets exactly the weights the single-process model has. Vocabulary
tables are drawn in fixed blocks of rows, so a shard [start, end) can be built without
materialising the whole V x h table.
"""

from __future__ import annotations

import zlib

import torch

ROW_BLOCK = 256


def stable_seed(base_seed: int, name: str) -> int:
    """A 63-bit seed from the run seed and a name; independent of Python's hash randomisation."""
    return (base_seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def normal_(tensor: torch.Tensor, *, seed: int, name: str, std: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(stable_seed(seed, name))
    with torch.no_grad():
        values = torch.randn(tensor.shape, generator=gen, dtype=torch.float32) * std
        tensor.copy_(values)
    return tensor


def vocab_rows(
    num_real_rows: int, hidden: int, start: int, end: int, *, seed: int, name: str, std: float
) -> torch.Tensor:
    """Rows [start, end) of a (padded) V x hidden table; rows >= num_real_rows (padding) are zero."""
    out = torch.zeros(end - start, hidden)
    first_block, last_block = start // ROW_BLOCK, (end - 1) // ROW_BLOCK if end > start else -1
    for block in range(first_block, last_block + 1):
        lo, hi = block * ROW_BLOCK, (block + 1) * ROW_BLOCK
        gen = torch.Generator().manual_seed(stable_seed(seed, f"{name}/rows{block}"))
        values = torch.randn(ROW_BLOCK, hidden, generator=gen) * std
        a, b = max(lo, start), min(hi, end)
        out[a - start : b - start] = values[a - lo : b - lo]
    if end > num_real_rows:
        out[max(num_real_rows, start) - start :] = 0.0
    return out


def init_module(module: torch.nn.Module, *, seed: int, prefix: str, std: float, proj_std: float) -> None:
    """GPT-2 style: Linear weights N(0, std), residual projections (`*.proj`) N(0, proj_std),
    biases zero, LayerNorm identity."""
    for mod_name, mod in module.named_modules():
        full = f"{prefix}.{mod_name}" if mod_name else prefix
        if isinstance(mod, torch.nn.LayerNorm):
            torch.nn.init.ones_(mod.weight)
            torch.nn.init.zeros_(mod.bias)
        elif isinstance(mod, torch.nn.Linear):
            scale = proj_std if mod_name.endswith("proj") else std
            normal_(mod.weight, seed=seed, name=f"{full}.weight", std=scale)
            if mod.bias is not None:
                torch.nn.init.zeros_(mod.bias)
