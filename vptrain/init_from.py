"""Where a run's first weights come from: vptrain's seeded initialisation, or `model.init_from`.

Every trainer calls `apply_init_from` after building its stage (seeded weights in place) and
before building the optimizer, so the optimizer and the bf16 cast start from the imported values;
under bf16 the pipeline trainers then call `restore_fp32_masters`, because DeepSpeed builds its fp32
master weights from the already-cast module.

Each rank records what it read in run_dir/init_from/rank_<r>.json (tensor names and row ranges),
so anyone can check that no rank read a whole vocabulary table it does not hold."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from vptrain.config import RunConfig
from vptrain.engine.param_names import GlobalSlice


def apply_init_from(cfg: RunConfig, module: torch.nn.Module, slices: dict[str, GlobalSlice]) -> None:
    """Overwrite this rank's parameters with the ones `model.init_from` names (no-op when unset)."""
    if not cfg.model.init_from:
        return
    from vptrain.hf.load import read_rank_parameters
    from vptrain.hf.shape import hf_directory

    m = cfg.model
    reads = read_rank_parameters(hf_directory(m.init_from), module, slices, arch=m.arch, num_layers=m.num_layers,
                                 vocab_size=m.vocab_size)
    _record(cfg, hf_directory(m.init_from), [r.to_list() for r in reads])


def restore_fp32_masters(cfg: RunConfig, module: torch.nn.Module, slices: dict[str, GlobalSlice]) -> None:
    """precision=bf16 under DeepSpeed: its optimizer builds the fp32 master weights from the module
    after casting it to bf16, so they would start from the imported values rounded to bf16. Called
    once the engine exists, this sets the masters to the checkpoint's values (read again, one
    tensor at a time: no second copy of the stage is held). No-op without model.init_from or bf16."""
    if not cfg.model.init_from or cfg.precision != "bf16":
        return
    from deepspeed.utils import safe_set_full_fp32_param

    from vptrain.hf.load import rank_values
    from vptrain.hf.shape import hf_directory

    m = cfg.model
    for param, value in rank_values(hf_directory(m.init_from), module, slices, arch=m.arch,
                                    num_layers=m.num_layers, vocab_size=m.vocab_size, reads=[]):
        if getattr(param, "_hp_mapping", None) is not None:  # None: its master lives on another dp rank
            safe_set_full_fp32_param(param, value.to(param.device))


def _record(cfg: RunConfig, directory: str, reads: list[list]) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = os.path.join(cfg.run_dir, "init_from")
    os.makedirs(out, exist_ok=True)
    record = {"source": directory, "rank": rank, "reads": reads}
    tmp = os.path.join(out, f".rank_{rank}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, os.path.join(out, f"rank_{rank}.json"))
