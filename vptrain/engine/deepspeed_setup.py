"""Importing DeepSpeed safely, translating our config into its JSON config, and giving DeepSpeed's
process groups our collective timeout."""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import sys
from datetime import timedelta

import torch.distributed

from vptrain.config import RunConfig, microbatches


def import_deepspeed(device_type: str):
    """Import deepspeed for this device without the CPU shm-op JIT build (~60 s per process).

    The shm op is only used by inference all-reduce; `deepspeed.comm.torch.build_shm_op` is
    replaced before any communicator is created. `import deepspeed.comm.torch as m` would return
    the torch package (deepspeed.comm re-exports it), hence sys.modules.
    """
    if device_type == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    return deepspeed


def deepspeed_config(cfg: RunConfig) -> dict:
    t = cfg.train
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": microbatches(cfg),
        "train_batch_size": t.global_batch_size,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # DeepSpeed 0.19 clips at 1.0 unless told otherwise; ours comes from train.grad_clip.
        "gradient_clipping": float(t.grad_clip),
        "zero_optimization": {"stage": cfg.optim.zero_stage},
        "zero_allow_untested_optimizer": True,
    }
    if cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    return ds


@contextlib.contextmanager
def new_groups_time_out_after(timeout: timedelta):
    """While active, a `torch.distributed.new_group()` call that names no timeout gets `timeout`.

    torch gives such a group its backend's default (10 min for NCCL, 30 for gloo), not the default
    group's, and DeepSpeed creates every group of its own that way: the pipeline grid's data-,
    model- and pipe-parallel groups, the p2p pairs, the world clone. A rank stuck in a gradient
    all-reduce would then outlast train.collective_timeout_s by far. DeepSpeed calls
    `torch.distributed.new_group` through the module attribute, which is what is wrapped here.
    """
    original = torch.distributed.new_group

    @functools.wraps(original)
    def new_group(*args, **kwargs):
        if len(args) < 2 and kwargs.get("timeout") is None:  # timeout is new_group's 2nd parameter
            kwargs["timeout"] = timeout
        return original(*args, **kwargs)

    torch.distributed.new_group = new_group
    try:
        yield
    finally:
        torch.distributed.new_group = original
