"""The batch script behind `vptrain submit`: job shape, cluster checks and rendering.

One Slurm task per rank: tasks per node = layout.pp * layout.dp / cluster.nodes, which on a GPU
cluster is one task per GPU. The body of the script lives in slurm/train.sbatch.tmpl; this module
computes the `#SBATCH` header and the values the template names as `{{key}}` (a syntax that does
not clash with the shell's `$var` / `${var}` or Slurm's `%j`). Pure Python, no torch: a dry run
works on any login node.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from vptrain.config import RunConfig
from vptrain.preempt import MARKER

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "slurm" / "train.sbatch.tmpl"
WORKER = REPO / "launchers" / "srun_worker.sh"
SIGNALS = ("USR2", "USR1", "TERM", "INT", "HUP", "URG", "XCPU")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


@dataclass(frozen=True)
class JobShape:
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    """0 on CPU clusters (no GPUs are requested)."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


def _fail(key: str, msg: str) -> None:
    raise ValueError(f"{key}: {msg}")


def uses_gpus(cfg: RunConfig) -> bool:
    c = cfg.cluster
    return c.device == "cuda" or (c.device == "auto" and c.gpus_per_node > 0)


def time_limit_s(text: str) -> int:
    """Seconds in a Slurm time limit: M, M:S, H:M:S, D-H, D-H:M or D-H:M:S."""
    m = _TIME.match(str(text).strip())
    if not m:
        _fail("cluster.time", f"'{text}' is not a Slurm time limit; use e.g. 01:00:00, 90 (minutes) or 2-00:00:00")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:  # D-H[:M[:S]]
        return ((days * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    if c is not None:  # H:M:S
        return (a * 60 + b) * 60 + c
    return a * 60 + (b or 0)  # M or M:S


def job_shape(cfg: RunConfig) -> JobShape:
    """Check the cluster section against the layout; every rule names the key to change."""
    c, world = cfg.cluster, cfg.layout.pp * cfg.layout.dp
    if c.nodes < 1:
        _fail("cluster.nodes", f"must be >= 1, got {c.nodes}")
    if world % c.nodes:
        _fail("cluster.nodes", f"layout.pp * layout.dp = {world} ranks cannot be split evenly over {c.nodes} nodes; "
                               f"choose a divisor of {world}")
    per_node = world // c.nodes
    gpus = 0
    if uses_gpus(cfg):
        if c.gpus_per_node < 1:
            _fail("cluster.gpus_per_node", f"cluster.device={c.device} needs GPUs; set the GPUs per node (e.g. 8)")
        if per_node > c.gpus_per_node:
            need = -(-world // c.gpus_per_node)
            _fail("cluster.nodes", f"{per_node} tasks per node (layout.pp * layout.dp = {world} over {c.nodes} nodes) "
                                   f"exceed cluster.gpus_per_node={c.gpus_per_node}; use at least {need} nodes")
        gpus = c.gpus_per_node
    if c.cpus_per_task < 1:
        _fail("cluster.cpus_per_task", f"must be >= 1, got {c.cpus_per_task}")
    if c.mem_gb is not None and c.mem_gb < 1:
        _fail("cluster.mem_gb", f"must be >= 1 (GB per node) or null, got {c.mem_gb}")
    if c.require_partition and not c.partition:
        _fail("cluster.partition", "this cluster has no default partition (cluster.require_partition=true); "
                                   "set cluster.partition=NAME")
    limit = time_limit_s(c.time)
    if limit < 60:
        _fail("cluster.time", f"'{c.time}' is under a minute")
    if c.signal.upper().removeprefix("SIG") not in SIGNALS:
        _fail("cluster.signal", f"'{c.signal}' is not one of {', '.join(SIGNALS)}")
    if not 0 <= c.signal_delay_s < limit:
        _fail("cluster.signal_delay_s", f"{c.signal_delay_s} s must be >= 0 and below cluster.time ({limit} s)")
    if c.max_restarts < 0:
        _fail("cluster.max_restarts", f"must be >= 0, got {c.max_restarts}")
    if c.job_name is not None and not re.fullmatch(r"[\w.+-]+", c.job_name):
        _fail("cluster.job_name", f"'{c.job_name}': use letters, digits and . _ + - only, or null for a name "
                                  f"from the overrides")
    if c.mem_gb is not None and c.mem_per_gpu_gb is not None:
        _fail("cluster.mem_per_gpu_gb", "set cluster.mem_gb (per node) or cluster.mem_per_gpu_gb, not both")
    if c.mem_per_gpu_gb is not None and (c.mem_per_gpu_gb < 1 or not uses_gpus(cfg)):
        _fail("cluster.mem_per_gpu_gb", "must be >= 1 GB, on a GPU cluster (else use cluster.mem_gb)")
    for key, value in {"cluster.gpu_bind": c.gpu_bind, "cluster.cpu_bind": c.cpu_bind,
                       "cluster.nccl_debug": c.nccl_debug, "cluster.network_interface": c.network_interface}.items():
        if value is not None and not re.fullmatch(r"[\w.,:^+-]+", value):
            _fail(key, f"'{value}' is not a Slurm/NCCL value (letters, digits and . , : ^ + - only), or null")
    for name in c.env:
        if not re.fullmatch(r"[A-Za-z_]\w*", name):
            _fail("cluster.env", f"'{name}' is not an environment variable name")
    for line in c.extra_sbatch:
        if not line.strip().startswith(("-", "#SBATCH")):
            _fail("cluster.extra_sbatch", f"'{line}' is not an sbatch option (e.g. --exclusive)")
    if re.search(r"[\s%]", cfg.run_dir):
        # #SBATCH lines are not shell-quoted, and % starts a Slurm filename pattern.
        _fail("hydra.run.dir", f"'{cfg.run_dir}' contains whitespace or '%', which Slurm's --output cannot take")
    return JobShape(nodes=c.nodes, tasks_per_node=per_node, gpus_per_node=gpus)


# Overrides that say where or how a job runs, not what it trains: left out of its name.
_NOT_IN_NAME = ("hydra.", "cluster", "logger", "launcher", "train.resume", "train.record_passes")
_BARE_VALUE = ("method", "model", "schedule", "data", "optim", "precision")


def job_name(cfg: RunConfig) -> str:
    """cluster.job_name, else what `squeue` should show: vptrain, the experiment and the overrides
    that made the run (`vptrain_gpt-4b_pp8_dp4_vocab-2`), in Slurm's safe characters."""
    if cfg.cluster.job_name:
        return cfg.cluster.job_name
    parts = ["vptrain"] + ([cfg.experiment] if cfg.experiment != "default" else [])
    for item in cfg.overrides:
        key, _, value = item.lstrip("+~").partition("=")
        if key.startswith(_NOT_IN_NAME) or key == "experiment":
            continue
        tail = key.rsplit(".", 1)[-1]
        parts.append(value if tail in _BARE_VALUE else f"{tail}{value}")
    return re.sub(r"[^\w.+-]+", "-", "_".join(parts))[:96]


def sbatch_options(cfg: RunConfig, shape: JobShape) -> list[str]:
    c = cfg.cluster
    opts = [
        f"--job-name={job_name(cfg)}",
        f"--nodes={shape.nodes}",
        f"--ntasks-per-node={shape.tasks_per_node}",
        f"--cpus-per-task={c.cpus_per_task}",
    ]
    if shape.gpus_per_node and c.gpu_bind:
        # One GPU per task, the one nearest its cores; the task sees it as device 0 (train.resolve_device).
        opts += ["--gpus-per-task=1", f"--gpu-bind={c.gpu_bind}"]
    elif shape.gpus_per_node:
        opts.append(f"--gpus-per-node={shape.gpus_per_node}")
    if c.mem_gb is not None:
        opts.append(f"--mem={c.mem_gb}G")
    if c.mem_per_gpu_gb is not None:
        opts.append(f"--mem-per-gpu={c.mem_per_gpu_gb}G")
    opts.append(f"--time={c.time}")
    for key in ("partition", "account", "qos"):
        if getattr(c, key):
            opts.append(f"--{key}={getattr(c, key)}")
    opts += [
        f"--output={cfg.run_dir}/slurm-%j.out",
        "--open-mode=append",  # a requeued attempt appends to the same log
        "--requeue",
        f"--signal={c.signal.upper().removeprefix('SIG')}@{c.signal_delay_s}",
    ]
    lines = [f"#SBATCH {o}" for o in opts]
    lines += [x.strip() if x.strip().startswith("#SBATCH") else f"#SBATCH {x.strip()}" for x in c.extra_sbatch]
    return lines


def fill(template: str, values: dict[str, str], *, name: str = "template") -> str:
    def value(m: re.Match) -> str:
        key = m.group(1)
        if key not in values:
            raise KeyError(f"{name}: no value for {{{{{key}}}}}")
        return values[key]

    return _PLACEHOLDER.sub(value, template)


def environment(cfg: RunConfig) -> str:
    """The cluster.* settings the job exports, one line each (NCCL's and gloo's network choice)."""
    c = cfg.cluster
    env = {}
    if c.nccl_debug:
        env["NCCL_DEBUG"] = c.nccl_debug
    if c.network_interface:
        env["NCCL_SOCKET_IFNAME"] = env["GLOO_SOCKET_IFNAME"] = c.network_interface
    env.update(c.env)
    lines = [f"export {k}={shlex.quote(str(v))}" for k, v in env.items()]
    return "\n".join(lines) if lines else "# (none: cluster.nccl_debug, cluster.network_interface, cluster.env)"


def render(cfg: RunConfig, *, workdir: str, python: str | None = None) -> str:
    """The batch script for this run (validates the cluster section first). cluster.workdir names
    the cluster's checkout: the job runs there and finds its worker there, with python3 from the
    PATH the site setup leaves unless cluster.python says otherwise."""
    shape = job_shape(cfg)
    c = cfg.cluster
    device_env = "export DS_ACCELERATOR=cpu" if c.device == "cpu" else "# GPUs: DeepSpeed picks the CUDA accelerator"
    if c.workdir:
        workdir, worker, default_python = c.workdir, f"{c.workdir.rstrip('/')}/launchers/srun_worker.sh", "python3"
    else:
        worker, default_python = str(WORKER), sys.executable
    values = {
        "sbatch_options": "\n".join(sbatch_options(cfg, shape)),
        "run_dir": cfg.run_dir,
        "run_dir_q": shlex.quote(cfg.run_dir),
        "workdir_q": shlex.quote(workdir),
        "python_q": shlex.quote(python or c.python or default_python),
        "worker_q": shlex.quote(worker),
        "env_exports": environment(cfg),
        "cpu_bind": f" --cpu-bind={c.cpu_bind}" if c.cpu_bind else "",
        "max_restarts": str(c.max_restarts),
        "marker": MARKER,
        "setup": "\n".join(c.setup) if c.setup else "# (none)",
        "threads": str(cfg.launcher.threads_per_rank),
        "cpus_per_task": str(c.cpus_per_task),
        "device_env": device_env,
        "signal": c.signal.upper().removeprefix("SIG"),
    }
    return fill(TEMPLATE.read_text(), values, name=str(TEMPLATE))


def register_resolvers() -> None:
    """OmegaConf resolvers for conf/launcher/submitit_slurm.yaml (YAML has no arithmetic)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver(
        "vptrain.tasks_per_node", lambda pp, dp, nodes: max(1, int(pp) * int(dp) // max(1, int(nodes))), replace=True
    )
    OmegaConf.register_new_resolver("vptrain.job_name", lambda name, experiment: name or f"vptrain_{experiment}",
                                    replace=True)
    OmegaConf.register_new_resolver("vptrain.minutes", lambda t: max(1, time_limit_s(t) // 60), replace=True)
    OmegaConf.register_new_resolver("vptrain.gpus", lambda device, gpus: int(gpus) if device != "cpu" and int(gpus)
                                    else None, replace=True)
