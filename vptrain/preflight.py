"""Checks before launch that need the filesystem or the machine: run directory, data and checkpoint
to resume (vptrain/preflight_inputs.py), memory, cores. `vptrain train` runs them once, after the
config validated and before anything is written or any rank starts (vptrain/cli.py); each raises
ValueError naming the key.

Pure config rules live in vptrain/validate.py; these read files and the machine, so `vptrain plan`
(which sizes a cluster run on a laptop) does not run the machine checks.
"""

from __future__ import annotations

import os

from vptrain.config import RunConfig, default_intermediate_size
from vptrain.launch.env import LaunchEnv
from vptrain.preflight_inputs import check_data
from vptrain.preflight_resume import check_resume
from vptrain.schedule.activations import kept_per_layer
from vptrain.schedule.costs import state_bytes

GIB = float(1 << 30)
GPU_DRIVER_FILES = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd")
"""One of them exists wherever torch could see a GPU (NVIDIA's driver, AMD's ROCm)."""
RANKS_PER_CORE = 4
"""Beyond this many ranks per CPU core a CPU run only thrashes (each rank is a process with its own
torch runtime, ~0.4 GB and a busy thread); tests and the benchmarks use at most 2 per core."""


def _fail(key: str, msg: str) -> None:
    raise ValueError(f"{key}: {msg}")


def check_run_dir(path: str, key: str = "hydra.run.dir") -> None:
    """The run directory is a directory, or can be created: its nearest existing ancestor is a
    writable directory. Hydra would otherwise fail creating it with a traceback."""
    if os.path.exists(path) and not os.path.isdir(path):
        _fail(key, f"{path} is a file, not a directory; choose another run directory")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        _fail(key, f"cannot create {path}: {probe} is a file; choose another run directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        _fail(key, f"cannot write {probe}; choose a run directory you can write")


def preflight(cfg: RunConfig, launch: LaunchEnv | None) -> None:
    """Everything `vptrain train` checks before it writes the run directory and starts ranks.
    `launch` is the external launcher's rank layout (torchrun / srun), None when vptrain starts them."""
    check_run_dir(cfg.run_dir)
    check_data(cfg)
    check_resume(cfg)
    check_machine(cfg, launch)


# --- machine --------------------------------------------------------------------------------------


def on_gpu(cfg: RunConfig) -> bool:
    if cfg.cluster.device == "cpu":
        return False
    if cfg.cluster.device == "cuda":
        return True
    if not any(os.path.exists(p) for p in GPU_DRIVER_FILES):
        return False  # no GPU driver: spares the launcher importing torch (seconds of CPU per launch)
    import torch

    return torch.cuda.is_available()


def check_machine(cfg: RunConfig, launch: LaunchEnv | None) -> None:
    """Ranks vs cores (CPU, ranks started here) and memory per rank vs the device, or all ranks vs RAM."""
    from vptrain.validate import validate_for_this_machine

    validate_for_this_machine(cfg)  # cluster.device=cuda needs a GPU
    lay = cfg.layout
    world = lay.pp * lay.dp
    gpu = on_gpu(cfg)
    if not gpu and launch is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if world > RANKS_PER_CORE * cores:
            key = "layout.dp" if lay.dp > 1 else "layout.pp"
            _fail(key, f"layout.pp * layout.dp = {lay.pp} * {lay.dp} = {world} ranks on this machine's {cores} CPU "
                       f"core(s) (more than {RANKS_PER_CORE} per core: each rank is a process); lower layout.pp or "
                       "layout.dp, or run it on a cluster (vptrain submit)")
    per_rank = rank_bytes_lower_bound(cfg, host_data=not gpu)
    if gpu:
        limit = cfg.cluster.gpu_memory_gb * GIB
        if per_rank > limit:
            _fail(_size_key(cfg), f"each rank needs at least {per_rank / GIB:.1f} GiB (model state and one "
                                  f"microbatch's activations over layout.pp={lay.pp} stages) > cluster.gpu_memory_gb="
                                  f"{cfg.cluster.gpu_memory_gb:g}; raise layout.pp or shrink the model")
    elif launch is None:
        total, ram = per_rank * world, machine_ram_bytes()
        if total > ram:
            _fail(_size_key(cfg), f"{world} ranks need at least {total / GIB:.1f} GiB ({per_rank / GIB:.1f} GiB each: "
                                  f"model state, one microbatch's activations, data) > this machine's "
                                  f"{ram / GIB:.1f} GiB of RAM; shrink the model or run it on a cluster")


def _size_key(cfg: RunConfig) -> str:
    """The model key most to blame: the vocabulary when its tables outweigh the layers."""
    m = cfg.model
    return "model.vocab_size" if m.vocab_size > 12 * m.hidden_size * m.num_layers else "model.hidden_size"


def rank_bytes_lower_bound(cfg: RunConfig, *, host_data: bool) -> float:
    """Bytes the fullest pipeline rank needs at least, in closed form (no schedule): its share
    (1/pp, whatever the split) of parameters + gradients + optimizer state (cost model's
    state_bytes), one in-flight microbatch's activations (what each layer keeps under
    model.activation_checkpointing, schedule/activations.py), and with
    `host_data` (CPU runs) the synthetic data's permutation tables (4 x vocab int64 per rank)."""
    m, lay = cfg.model, cfg.layout
    h, v = m.hidden_size, m.vocab_size
    tables = 1 if m.tie_embeddings else 2
    positions = (m.max_position_embeddings or m.seq_len) * h
    layer, width = 12 * h * h + 13 * h, 4 * h
    if m.arch == "llama":  # GQA k/v, SwiGLU, two norm weights; no biases, no position table
        kv = (m.num_kv_heads or m.num_heads) * (h // m.num_heads)
        width = m.intermediate_size or default_intermediate_size(h)
        layer = 2 * h * h + 2 * h * kv + 3 * h * width + 2 * h
        positions = 0
    params = m.num_layers * layer + tables * v * h + positions + 2 * h
    state = sum(state_bytes(params, precision=cfg.precision, optimizer=cfg.optim.name,
                            zero_stage=cfg.optim.zero_stage, dp=lay.dp).values())
    act = 2 if cfg.precision == "bf16" else 4
    tokens = m.seq_len * cfg.train.micro_batch_size
    kept = kept_per_layer(m.activation_checkpointing, arch=m.arch, hidden=h, intermediate=width)
    activations = (kept * m.num_layers / lay.pp + h) * tokens * act
    data = 4 * 8 * v if host_data and cfg.data.name == "synthetic" else 0
    return state / lay.pp + activations + data


def machine_ram_bytes() -> float:
    """Physical memory, or the cgroup's limit when one is set lower."""
    ram = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            ram = min(ram, float(text))
    return ram
