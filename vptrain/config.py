"""Typed configuration schema for vptrain.

Hydra composes YAML groups from `conf/` on top of these dataclasses (registered in the ConfigStore
as `vptrain_schema`), so a misspelt key or a wrong type fails at composition. Cross-field rules live
in `vptrain.validate` and run once, in the parent process, before anything is launched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, OmegaConf

from vptrain.schedule.kinds import SCHEDULE_NAMES

METHODS = ("baseline", "redis", "interlaced", "vocab-naive", "vocab-1", "vocab-2")
VOCAB_METHODS = ("interlaced", "vocab-naive", "vocab-1", "vocab-2")
SCHEDULES = SCHEDULE_NAMES  # one table: vptrain/schedule/kinds.py
PRECISIONS = ("fp32", "bf16")
ARCHS = ("gpt", "llama")
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")
DEFAULT_ROPE_THETA = 10000.0


def default_intermediate_size(hidden: int) -> int:
    """llama's SwiGLU width when model.intermediate_size is unset: 8h/3 (as many parameters as a 4h
    GELU MLP) rounded up to a multiple of 16."""
    return -(-8 * hidden // (3 * 16)) * 16


@dataclass
class ModelConfig:
    name: str = "gpt-tiny"
    vocab_size: int = 512
    """Number of real tokens. Padding rows (vocab.pad_to_multiple_of, pp) never enter the loss."""
    num_layers: int = 4
    hidden_size: int = 64
    num_heads: int = 4
    seq_len: int = 64
    tie_embeddings: bool = False
    """Share one weight between the input embedding and the output layer."""
    init_std: float = 0.02
    max_position_embeddings: int | None = None
    """Rows of the learned position table; defaults to seq_len."""
    arch: str = "gpt"
    """gpt (LayerNorm, GELU MLP, learned positions, biases) | llama (RMSNorm, SwiGLU, rotary, GQA, no
    biases): vptrain/models/."""
    norm_eps: float = 1e-5
    """Epsilon of every LayerNorm (gpt) or RMSNorm (llama)."""
    num_kv_heads: int | None = None
    """llama: key/value heads of grouped-query attention (null: model.num_heads)."""
    intermediate_size: int | None = None
    """llama: width of the SwiGLU MLP (null: 8h/3 rounded up to a multiple of 16)."""
    rope_theta: float | None = None
    """llama: base of the rotary frequencies (null: 10000)."""
    init_from: str | None = None
    """hf:DIR: start from a Hugging Face checkpoint (config.json + safetensors); its config.json sets
    the architecture and shape (vptrain/hf/). null: vptrain's own seeded initialisation."""
    activation_checkpointing: str = "none"
    """none | full (recompute each transformer layer in its backward, keeping its input) | selective
    (recompute attention and the MLP's activation, keep the layer inputs)."""


@dataclass
class LayoutConfig:
    pp: int = 2
    """Pipeline stages."""
    dp: int = 1
    """Data-parallel replicas of the pipeline. World size = pp * dp."""
    layers_per_stage: list[int] | None = None
    """Explicit transformer layers per stage (length pp, sums to model.num_layers); default even split."""


@dataclass
class MethodConfig:
    name: str = "vocab-2"
    """baseline | redis | interlaced | vocab-naive | vocab-1 | vocab-2"""


@dataclass
class ScheduleConfig:
    name: str = "1f1b"
    """One of kinds.SCHEDULE_NAMES: 1f1b | zb-h1 | vhalf | interleaved (vptrain/schedule/kinds.py)."""
    virtual_stages: int = 2
    """interleaved only: model chunks per rank (rank r holds stages r, r+p, ..., r+(v-1)p)."""
    w_reserve: str = "auto"
    """zb-h1 only (the other schedules ignore it): how many W passes each rank keeps queued through
    idle moments for the cool-down. auto: the shortest plan of every choice below; by-rank: r on
    rank r (the shortest cool-down, the most bytes on the later ranks); 0, 1, 2, 3: that many on
    every rank (fewer bytes). schedule/builders.py W_RESERVE_CHOICES."""


@dataclass
class VocabConfig:
    pad_to_multiple_of: int = 1
    """Pad the vocabulary (beyond the multiple of pp it always gets) for GEMM efficiency."""
    chunk_tokens: int | None = None
    """Process the output layer in chunks of this many tokens (0: all at once). Unset: the plan picks
    the largest chunk whose transient logits fit a share of cluster.gpu_memory_gb (plan.chunk_tokens_of)."""
    store_softmax: bool = True
    """Keep the fp32 shard softmax from S to T (false: recompute the logits in T)."""


@dataclass
class TrainConfig:
    steps: int = 60
    global_batch_size: int = 8
    """Sequences per optimizer step, all data-parallel ranks together."""
    micro_batch_size: int = 1
    """Sequences per microbatch; microbatches per pipeline m = global / (micro * dp)."""
    seed: int = 1234
    log_every: int = 1
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    checkpoint_every: int = 0
    """Save a checkpoint every k steps (0: only at the end when checkpoint_at_end)."""
    checkpoint_at_end: bool = True
    stop_at_step: int = 0
    """Stop (with a checkpoint) once this many steps are done, keeping the schedule of train.steps
    (0: run to train.steps). For time-sliced jobs and resume tests."""
    resume: str = "never"
    """never | auto (latest checkpoint in the run directory) | a checkpoint directory."""
    collective_timeout_s: float = 300.0
    """A collective that takes longer than this ends the job (a dead or stuck rank)."""
    record_passes: bool = False
    """Record the executed pass order per rank into the run directory (tests)."""
    strict_comm_order: bool = False
    """Check at run time that every two ranks issue the operations they share in one order, failing
    with both ranks' operations named (tests; a few store round trips per operation)."""
    dump_params: bool = False
    """Save every stage's final parameters under run_dir/params (equivalence tests)."""
    eval_every: int = 0
    """Evaluate on data.eval_path every k steps (0: never during training; `vptrain eval` any time)."""


@dataclass
class OptimConfig:
    name: str = "adamw"
    """adamw | sgd"""
    lr: float = 1e-2
    min_lr: float = 1e-3
    warmup_steps: int = 5
    decay: str = "cosine"
    """cosine | constant (after warmup)"""
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    zero_stage: int = 0
    """0 or 1 (DeepSpeed pipeline parallelism rejects ZeRO-2/3)."""


@dataclass
class DataConfig:
    name: str = "synthetic"
    """synthetic | memmap"""
    path: str | None = None
    """memmap: a .bin token file, a directory of them, or a glob."""
    dtype: str = "auto"
    """Token dtype of data.path / data.eval_path: uint16 | uint32 | auto (the dtype in the meta.json
    prepare-data wrote beside the files, else uint16; vptrain/data_meta.py resolves it before validation)."""
    eval_path: str | None = None
    """A token file (memmap format) to evaluate on: train.eval_every and `vptrain eval`."""


@dataclass
class EvalConfig:
    sequences: int = 64
    """Windows evaluated: window i = tokens[i*S : i*S + S + 1] of data.eval_path, S = model.seq_len,
    in file order (vptrain/evaluate.py)."""


@dataclass
class LoggerConfig:
    name: str = "wandb"
    """wandb | none"""
    project: str = "vptrain"
    entity: str | None = None
    mode: str = "auto"
    """auto (online when an API key is configured, else offline) | offline | online"""
    group: str | None = None
    run_name: str | None = None
    job_type: str = "train"
    tags: list[str] = field(default_factory=list)
    """added to the tags every run gets: its method, schedule and layout (method:vocab-2,
    schedule:1f1b, pp:4, dp:1)"""
    console: bool = True
    """W&B records the logging rank's console output (its Logs tab)"""
    system_metrics_interval_s: float = 15.0
    """seconds between W&B's system metric samples (CPU, memory, GPU); 0 turns them off"""


@dataclass
class LauncherConfig:
    name: str = "local"
    """local: vptrain starts pp*dp worker processes itself. submitit_slurm: Hydra's submitit launcher
    submits each multirun point as a Slurm job whose tasks are the ranks (conf/launcher/submitit_slurm.yaml)."""
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    """0: pick a free port."""
    threads_per_rank: int = 1
    """torch intra-op threads per worker on CPU."""


@dataclass
class ClusterConfig:
    name: str = "local"
    device: str = "auto"
    """auto | cpu | cuda"""
    profile: str = "cpu"
    """Device profile for the cost model and MFU: cpu | a100 | h100"""
    gpu_memory_gb: float = 80.0
    gpus_per_node: int = 0
    nodes: int = 1
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "01:00:00"
    cpus_per_task: int = 1
    mem_gb: int | None = None
    """--mem: GB per node (null: the site's default)"""
    mem_per_gpu_gb: int | None = None
    """--mem-per-gpu instead of --mem (not both)"""
    gpu_bind: str | None = "closest"
    """GPU jobs: each task gets its own GPU (--gpus-per-task=1) bound this way (--gpu-bind=closest:
    the GPU nearest the task's cores); null requests --gpus-per-node and every task sees them all"""
    cpu_bind: str | None = None
    """srun --cpu-bind (e.g. cores: each rank pinned to its cpus_per_task cores); null leaves Slurm's default"""
    nccl_debug: str | None = None
    """NCCL_DEBUG for the job (WARN, INFO, ...); null leaves it unset"""
    network_interface: str | None = None
    """NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME (e.g. ib0, or ^lo,docker0 to exclude); null: autodetect"""
    env: dict[str, str] = field(default_factory=dict)
    """More environment variables the batch script exports (e.g. NCCL_IB_HCA: mlx5)"""
    workdir: str | None = None
    """Where the job runs: the vptrain checkout on the cluster (launchers/srun_worker.sh is found
    there); null: this checkout, for clusters that share its filesystem"""
    extra_sbatch: list[str] = field(default_factory=list)
    """More sbatch options, e.g. ["--exclusive", "--constraint=h100"]."""
    setup: list[str] = field(default_factory=list)
    """Shell lines the batch script runs before starting the ranks (module load, conda activate, ...)."""
    require_partition: bool = False
    """Refuse to submit without cluster.partition (for sites with no default partition)."""
    job_name: str | None = None
    """null: vptrain, the experiment and the overrides that made the run (vptrain_gpt-4b_pp8_vocab-2)"""
    python: str | None = None
    """Interpreter on the compute nodes (default: the one running `vptrain submit`; python3 from the
    job's PATH when cluster.workdir is set)."""
    signal: str = "USR2"
    """Sent to every rank signal_delay_s before the time limit: all ranks checkpoint, the job requeues.
    USR1 is best avoided (NCCL may use it)."""
    signal_delay_s: int = 120
    max_restarts: int = 3
    """How many times a job requeues itself after such a stop (counted by SLURM_RESTART_COUNT)."""


@dataclass
class SearchConfig:
    """`vptrain plan --search`: which method, schedule and (pp, dp) to run (vptrain/search.py)."""

    gpus: int | None = None
    """GPUs to spend: every pp x dp = gpus is tried (None: layout.pp * layout.dp)."""
    memory_gib: float | None = None
    """Memory budget per GPU in GiB (None: cluster.gpu_memory_gb)."""
    top: int = 5
    """Plans printed (and simulated at least)."""
    margin: float = 0.02
    """Keep simulating while a candidate's estimate is within this fraction of the top's last
    (estimates are scaled by what the simulation showed for the same method and schedule)."""
    max_simulations: int = 12
    """At most this many plans are simulated for the top (plus up to 3 per method missing from it, to
    say why it loses); the rest are ranked by the cost model's estimate (search_candidates.json)."""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    schedules: list[str] = field(default_factory=lambda: list(SCHEDULE_NAMES))
    """Default: every schedule (kinds.SCHEDULE_NAMES); a candidate a schedule cannot run is skipped."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    vocab: VocabConfig = field(default_factory=VocabConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    precision: str = "fp32"
    """fp32 | bf16 (softmax statistics stay fp32 either way)"""
    experiment: str = "default"
    """Name of the experiment preset; used for W&B grouping and run names."""
    run_dir: str = MISSING
    """Filled from hydra.run.dir by the CLI."""
    overrides: list[str] = field(default_factory=list)
    """The command-line overrides that produced this config (for run names)."""


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="vptrain_schema", node=RunConfig)
    from vptrain.launch.sbatch import register_resolvers

    register_resolvers()  # conf/launcher/submitit_slurm.yaml sizes its Slurm jobs with them


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(text: str) -> RunConfig:
    """Load a saved resolved config back into typed dataclasses (the workers' path)."""
    node = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(text))
    return OmegaConf.to_object(node)  # type: ignore[return-value]


def load(path: str) -> RunConfig:
    with open(path) as f:
        return from_yaml(f.read())


def microbatches(cfg: RunConfig) -> int:
    """Microbatches per pipeline per optimizer step (m)."""
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * cfg.layout.dp)


def padded_vocab_size(cfg: RunConfig) -> int:
    """Vocabulary rows after padding to a multiple of pp (vocab methods) and pad_to_multiple_of:
    the resolved plan's (vptrain/resolved.py), which every other module reads."""
    from vptrain.resolved import vocab_shards  # resolved imports this module

    return vocab_shards(cfg).rows
