"""Cross-field configuration rules, checked once before any process starts.

Every rule raises `ValueError` naming the key and what to change. Single-field type errors are
already caught by Hydra/OmegaConf when the config is composed against the schema.
"""

from __future__ import annotations

import glob
import os

from vptrain.config import ACTIVATION_CHECKPOINTING, ARCHS, METHODS, PRECISIONS, SCHEDULES, VOCAB_METHODS, RunConfig
from vptrain.schedule.builders import reserve_choices
from vptrain.schedule.costs import device_profile
from vptrain.schedule.kinds import SCHEDULE_KINDS, schedule_kind
from vptrain.validate_ranges import check_ranges

# Which methods each schedule can run: one table, vptrain/schedule/kinds.py.
SCHEDULE_METHODS = {name: kind.methods for name, kind in SCHEDULE_KINDS.items()}


def _fail(key: str, msg: str) -> None:
    raise ValueError(f"{key}: {msg}")


def validate(cfg: RunConfig, *, world_size: int | None = None) -> None:
    """Check every cross-field rule; `world_size` is the launcher's world when ranks were started
    externally (torchrun, srun), None when vptrain starts them itself."""
    m, lay, t = cfg.model, cfg.layout, cfg.train
    check_ranges(cfg)
    if cfg.method.name not in METHODS:
        _fail("method", f"unknown method '{cfg.method.name}'; choose one of {', '.join(METHODS)}")
    if cfg.schedule.name not in SCHEDULES:
        _fail("schedule", f"unknown schedule '{cfg.schedule.name}'; choose one of {', '.join(SCHEDULES)}")
    kind = schedule_kind(cfg.schedule.name)
    if cfg.method.name not in kind.methods:
        _fail(
            "method",
            f"method={cfg.method.name} does not run on schedule={cfg.schedule.name}; "
            f"with {kind.name} use one of {', '.join(kind.methods)}",
        )
    reserve_choices(cfg.schedule.w_reserve)  # raises naming schedule.w_reserve
    if kind.split_backward and m.activation_checkpointing != "none":
        _fail(
            "model.activation_checkpointing",
            f"{m.activation_checkpointing} does not combine with schedule={kind.name}: recompute re-runs per "
            "autograd call, so B and W would each recompute; use schedule=1f1b or activation_checkpointing=none",
        )
    if cfg.precision not in PRECISIONS:
        _fail("precision", f"'{cfg.precision}' is not supported; use fp32 or bf16")
    if m.hidden_size % m.num_heads:
        _fail("model.num_heads", f"{m.num_heads} heads must divide model.hidden_size={m.hidden_size}")
    _check_arch(cfg)
    pos = m.max_position_embeddings
    if pos is not None and pos < m.seq_len:
        _fail("model.max_position_embeddings", f"{pos} < model.seq_len={m.seq_len}; raise it or leave it null")
    chunks = _chunks(cfg)
    if m.num_layers < lay.pp * chunks:
        what = f"{chunks} * layout.pp ({chunks} chunks per rank in {kind.name})" if chunks > 1 else "layout.pp"
        _fail("model.num_layers", f"{m.num_layers} layers cannot fill {what} = {lay.pp * chunks} stages")
    if m.vocab_size < lay.pp:
        _fail("model.vocab_size", f"{m.vocab_size} < layout.pp={lay.pp}; every stage needs vocabulary rows")
    if lay.pp == 1 and cfg.method.name != "baseline":
        _fail("method", f"method={cfg.method.name} needs layout.pp >= 2; layout.pp=1 is the plain reference")
    if m.tie_embeddings and cfg.method.name in ("baseline", "redis") and lay.pp > 1:
        _fail(
            "model.tie_embeddings",
            "tied embeddings on a pipeline need the vocabulary sharded on every stage: "
            "use a vocab method (vocab-1, vocab-2, ...) or layout.pp=1",
        )
    _check_layers_per_stage(cfg)
    _check_batch(cfg)
    if cfg.optim.name not in ("adamw", "sgd"):
        _fail("optim.name", f"'{cfg.optim.name}' is not supported; use adamw or sgd")
    if cfg.optim.zero_stage not in (0, 1):
        _fail("optim.zero_stage", f"{cfg.optim.zero_stage}: pipeline parallelism supports ZeRO stage 0 or 1")
    if cfg.optim.decay not in ("cosine", "constant"):
        _fail("optim.decay", f"'{cfg.optim.decay}': use cosine or constant")
    if t.resume not in ("never", "auto") and not os.path.isdir(t.resume):
        _fail("train.resume", f"'{t.resume}' is neither never, auto, nor an existing checkpoint directory")
    _check_data(cfg)
    _check_eval(cfg)
    if m.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
        _fail("model.activation_checkpointing", f"'{m.activation_checkpointing}': choose one of "
              f"{', '.join(ACTIVATION_CHECKPOINTING)}")
    _check_logger_and_device(cfg)
    expected = lay.pp * lay.dp
    if world_size is not None and world_size != expected:
        _fail(
            "layout",
            f"the launcher started {world_size} ranks but layout.pp * layout.dp = {expected}; "
            "make them equal",
        )


def _check_eval(cfg: RunConfig) -> None:
    """data.eval_path, train.eval_every and eval.* (vptrain/evaluate.py)."""
    every, n = cfg.train.eval_every, cfg.eval.sequences
    if every < 0:
        _fail("train.eval_every", f"{every}: use 0 (no eval during training) or a step interval k >= 1")
    if n < 1:
        _fail("eval.sequences", f"{n}: evaluate at least one window")
    path = cfg.data.eval_path
    if not path:
        if every:
            _fail("train.eval_every", f"{every} needs data.eval_path (a token file to evaluate on); set it, "
                  "or train.eval_every=0")
        return
    b = cfg.train.micro_batch_size
    if n % b:
        # Eval batches are training batches; the last one is filled up with whole microbatches of padding.
        lower, upper = max(b, n - n % b), n - n % b + b
        _fail("eval.sequences", f"{n} is not a multiple of train.micro_batch_size={b} (windows are evaluated "
              f"a microbatch at a time); use {lower} or {upper}")
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        _fail("data.eval_path", f"'{path}' is not a file; give one token file (uint16/uint32, as prepare-data "
              "writes)")
    # Its dtype and ids are checked with the training files' (preflight_inputs.py); here: enough windows.
    from vptrain.data_meta import concrete_dtype  # data_meta imports this module

    itemsize = 4 if concrete_dtype(cfg) == "uint32" else 2
    tokens, need = os.path.getsize(path) // itemsize, n * cfg.model.seq_len + 1
    if tokens < need:
        fits = (tokens - 1) // cfg.model.seq_len // b * b
        _fail("eval.sequences", f"{n} windows of model.seq_len={cfg.model.seq_len} need {need} tokens, but "
              f"data.eval_path={path} holds {tokens}; "
              + (f"lower eval.sequences to {fits}" if fits else "give a longer token file"))


def _check_arch(cfg: RunConfig) -> None:
    m = cfg.model
    if m.arch not in ARCHS:
        _fail("model.arch", f"unknown architecture '{m.arch}'; choose one of {', '.join(ARCHS)}")
    if m.arch != "llama":
        for key in ("num_kv_heads", "intermediate_size", "rope_theta"):
            if getattr(m, key) is not None:
                _fail(f"model.{key}", f"applies to model.arch=llama only; leave it null for model.arch={m.arch}")
        return
    if m.num_kv_heads is not None and m.num_heads % m.num_kv_heads:
        _fail("model.num_kv_heads", f"{m.num_kv_heads} key/value heads must divide model.num_heads={m.num_heads} "
              "(each serves a group of query heads)")
    if (m.hidden_size // m.num_heads) % 2:
        _fail("model.num_heads", f"head size model.hidden_size / model.num_heads = {m.hidden_size // m.num_heads} "
              "must be even for rotary embeddings; change model.num_heads or model.hidden_size")


def _chunks(cfg: RunConfig) -> int:
    """Model chunks per rank of cfg's schedule (kinds.ScheduleKind.chunks)."""
    return schedule_kind(cfg.schedule.name).chunks(cfg.schedule.virtual_stages)


def _check_layers_per_stage(cfg: RunConfig) -> None:
    lps = cfg.layout.layers_per_stage
    if lps is None:
        return
    if len(lps) != cfg.layout.pp:
        _fail("layout.layers_per_stage", f"has {len(lps)} entries but layout.pp={cfg.layout.pp}; give one per stage")
    if sum(lps) != cfg.model.num_layers:
        _fail(
            "layout.layers_per_stage",
            f"sums to {sum(lps)} but model.num_layers={cfg.model.num_layers}; the counts must add up",
        )
    if _chunks(cfg) > 1:
        _fail("layout.layers_per_stage",
              f"schedule={cfg.schedule.name} splits layers evenly over {_chunks(cfg)} * pp chunks; leave it null")
    # The first and last stage also hold the embedding / output layer under baseline and redis,
    # so they may hold zero transformer layers; every other stage needs at least one.
    holds_vocab = cfg.method.name in ("baseline", "redis")
    for i, n in enumerate(lps):
        edge = i in (0, cfg.layout.pp - 1) and holds_vocab
        if n < 0 or (n == 0 and not edge):
            _fail("layout.layers_per_stage", f"stage {i} gets {n} layers; each stage needs at least one")


def _check_batch(cfg: RunConfig) -> None:
    t, dp = cfg.train, cfg.layout.dp
    if t.global_batch_size % (t.micro_batch_size * dp):
        _fail(
            "train.global_batch_size",
            f"{t.global_batch_size} is not divisible by train.micro_batch_size * layout.dp = "
            f"{t.micro_batch_size * dp}; microbatches per pipeline must be a whole number",
        )
    m = t.global_batch_size // (t.micro_batch_size * dp)
    p = cfg.layout.pp
    chunks = _chunks(cfg)
    if schedule_kind(cfg.schedule.name).placement == "loop" and m % p:
        _fail(
            "train.global_batch_size",
            f"schedule={cfg.schedule.name} runs microbatches in rounds of layout.pp={p}; {m} microbatches per "
            f"pipeline is not a multiple of it: use {(m // p + 1) * p * t.micro_batch_size * dp}",
        )
    # V-Half: every chunk of the first rank runs a forward before any backward (DualPipeV's engine).
    if schedule_kind(cfg.schedule.name).placement == "v" and m < chunks * p:
        _fail(
            "train.global_batch_size",
            f"schedule={cfg.schedule.name} needs at least {chunks} * layout.pp = {chunks * p} microbatches per "
            f"pipeline, got {m}; raise it to {chunks * p * t.micro_batch_size * dp}",
        )


def _check_data(cfg: RunConfig) -> None:
    d = cfg.data
    if d.name not in ("synthetic", "memmap"):
        _fail("data", f"unknown data '{d.name}'; use synthetic or memmap")
    if d.name != "memmap":
        return
    if d.dtype not in ("uint16", "uint32"):
        _fail("data.dtype", f"'{d.dtype}': memmap token files are uint16 or uint32")
    if d.dtype == "uint16" and cfg.model.vocab_size > 65536:
        _fail("data.dtype", f"uint16 tokens cannot address model.vocab_size={cfg.model.vocab_size}; use uint32")
    if not d.path:
        _fail("data.path", "data=memmap needs data.path (a .bin file, a directory of them, or a glob)")
    files = resolve_data_files(d.path)
    if not files:
        _fail("data.path", f"no .bin token files found at '{d.path}'")
    itemsize = 2 if d.dtype == "uint16" else 4
    tokens = sum(os.path.getsize(f) // itemsize for f in files)
    if tokens < cfg.model.seq_len + 1:
        _fail("data.path", f"holds {tokens} tokens, fewer than model.seq_len + 1 = {cfg.model.seq_len + 1}")


def resolve_data_files(path: str) -> list[str]:
    """A .bin file, a directory of .bin files, or a glob, in sorted order."""
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "*.bin")))
    if any(c in path for c in "*?["):
        return sorted(glob.glob(path))
    return [path] if os.path.isfile(path) else []


def _check_logger_and_device(cfg: RunConfig) -> None:
    if cfg.logger.name not in ("wandb", "none"):
        _fail("logger", f"unknown logger '{cfg.logger.name}'; use wandb or none")
    if cfg.logger.mode not in ("auto", "offline", "online"):
        _fail("logger.mode", f"'{cfg.logger.mode}': use auto, offline or online")
    if cfg.cluster.device not in ("auto", "cpu", "cuda"):
        _fail("cluster.device", f"'{cfg.cluster.device}': use auto, cpu or cuda")
    device_profile(cfg.cluster.profile)  # raises naming cluster.profile and the known profiles
    if cfg.method.name in VOCAB_METHODS and cfg.layout.pp < 2:
        _fail("layout.pp", "vocabulary parallelism shards over pipeline stages; use layout.pp >= 2")


def validate_for_this_machine(cfg: RunConfig) -> None:
    """Rules that depend on where `train` runs (not checked by `plan`, which needs no GPU)."""
    if cfg.cluster.device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        _fail("cluster.device", "cuda requested but no GPU is visible; use cluster.device=cpu or cluster=local")
