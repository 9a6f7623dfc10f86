"""Bad input through the real CLI: exit 2, one line naming the key, nothing written, no rank started.

Each case runs `vptrain.cli.main(["train", ...])` in-process (a few run as a subprocess to show no
traceback reaches the user). The trainer's entry is replaced by one that fails the test, so a case
that got past the checks would be caught even if it then failed for another reason.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _bad_input_files import (
    DEFAULT,
    RUN,
    checkpoint_files,
    ids_beyond_vocab,
    latest_names_missing,
    meta_bigger_vocab,
    meta_json_empty,
    meta_json_truncated,
    meta_other_dtype,
    meta_truncated,
    no_bin_files,
    not_a_checkpoint,
    odd_size_uint16,
    other_layout,
    other_model,
    rank_file_empty,
    rank_file_missing,
    rank_file_truncated,
    run_dir_as_checkpoint,
    run_dir_is_file,
    run_dir_under_file,
    uint16_read_as_uint32,
    uint32_read_as_uint16,
)
from conftest import run_cli

import vptrain.cli as cli
from vptrain.config import RunConfig
from vptrain.hydra_checks import schema_keys
from vptrain.preflight import check_machine
from vptrain.validate import validate
from vptrain.validate_ranges import RANGES, value_of

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
TOO_MANY_DP = 2 * CORES + 1  # with layout.pp=2: more than 4 ranks per core


@dataclass(frozen=True)
class Case:
    key: str
    """The key the one line must start with."""
    overrides: tuple[str, ...] = ()
    setup: Callable[[Path], list[str]] | None = None
    """Builds files under the test's directory; returns more overrides."""


def v(key: str, *overrides: str) -> Case:
    return Case(key, overrides)


CASES: dict[str, Case] = {
    # values the issue found running (or failing late)
    "lr-nan": v("optim.lr", "optim.lr=nan"),
    "lr-inf": v("optim.lr", "optim.lr=inf"),
    "grad-clip-nan": v("train.grad_clip", "train.grad_clip=nan"),
    "grad-clip-inf": v("train.grad_clip", "train.grad_clip=inf"),
    "timeout-inf": v("train.collective_timeout_s", "train.collective_timeout_s=inf"),
    "timeout-nan": v("train.collective_timeout_s", "train.collective_timeout_s=nan"),
    "beta1-1.5": v("optim.beta1", "optim.beta1=1.5"),
    "beta2-1": v("optim.beta2", "optim.beta2=1"),
    "eps-negative": v("optim.eps", "optim.eps=-1"),
    "weight-decay-negative": v("optim.weight_decay", "optim.weight_decay=-0.1"),
    "init-std-negative": v("model.init_std", "model.init_std=-0.02"),
    "init-std-0": v("model.init_std", "model.init_std=0"),
    "port-70000": v("launcher.master_port", "launcher.master_port=70000"),
    # every other numeric key of the schema, out of its range
    "vocab-0": v("model.vocab_size", "model.vocab_size=0"),
    "hidden-0": v("model.hidden_size", "model.hidden_size=0"),
    "positions-0": v("model.max_position_embeddings", "model.max_position_embeddings=0"),
    "pp-0": v("layout.pp", "layout.pp=0"),
    "dp-0": v("layout.dp", "layout.dp=0"),
    "chunk-negative": v("vocab.chunk_tokens", "vocab.chunk_tokens=-1"),
    "steps-0": v("train.steps", "train.steps=0"),
    "micro-batch-0": v("train.micro_batch_size", "train.micro_batch_size=0"),
    "seed-negative": v("train.seed", "train.seed=-1"),
    "checkpoint-every-negative": v("train.checkpoint_every", "train.checkpoint_every=-1"),
    "stop-at-negative": v("train.stop_at_step", "train.stop_at_step=-1"),
    "stop-after-steps": v("train.stop_at_step", "train.steps=10", "train.stop_at_step=20"),
    "timeout-beyond-a-week": v("train.collective_timeout_s", "train.collective_timeout_s=1e9"),
    "lr-0": v("optim.lr", "optim.lr=0"),
    "min-lr-negative": v("optim.min_lr", "optim.min_lr=-1"),
    "min-lr-above-lr": v("optim.min_lr", "optim.lr=0.01", "optim.min_lr=1"),
    "gpu-memory-0": v("cluster.gpu_memory_gb", "cluster.gpu_memory_gb=0"),
    "max-restarts-negative": v("cluster.max_restarts", "cluster.max_restarts=-1"),
    # keys the schema lacks, types it refuses
    "plus-typo": v("train.stepz", "+train.stepz=3"),
    "plus-typo-model": v("model.hiden_size", "+model.hiden_size=64"),
    "plus-top-level": v("foo", "+foo=1"),
    "typo": v("train.stepz", "train.stepz=3"),
    "typo-layout": v("layout.ppp", "layout.ppp=2"),
    "key-in-another-section": v("train.lr", "train.lr=0.1"),
    "int-as-word": v("layout.pp", "layout.pp=two"),
    "int-as-float": v("train.steps", "train.steps=1.5"),
    "bool-as-word": v("model.tie_embeddings", "model.tie_embeddings=maybe"),
    # Hydra's parse and composition errors
    "unclosed-list": v("layout.layers_per_stage", "layout.layers_per_stage=[2,2"),
    "unclosed-dict": v("model.vocab_size", "model.vocab_size={a:"),
    "no-such-model": v("model", "model=nope"),
    "no-such-method-group": v("method", "method=vocab-3"),
    "broken-interpolation": v("model.vocab_size", "model.vocab_size=${oops}"),
    "memmap-without-path": v("data.path", "data=memmap"),
    # names the validator refuses
    "precision-fp16": v("precision", "precision=fp16"),
    "optimizer-name": v("optim.name", "optim.name=lamb"),
    "zero-stage-2": v("optim.zero_stage", "optim.zero_stage=2"),
    "decay-linear": v("optim.decay", "optim.decay=linear"),
    "data-dtype-int8": v("data.dtype", "data=memmap", "data.path=/tmp", "data.dtype=int8"),
    "logger-name": v("logger", "logger.name=tensorboard"),
    "device-tpu": v("cluster.device", "cluster.device=tpu"),
    "profile-v100": v("cluster.profile", "cluster.profile=v100"),
    "method-name": v("method", "method.name=vocab-3"),
    # layout / method / schedule combinations
    "heads-not-dividing": v("model.num_heads", "model.num_heads=5"),
    "more-stages-than-layers": v("model.num_layers", "layout.pp=8"),
    "vhalf-stages-than-layers": v("model.num_layers", "schedule=vhalf", "layout.pp=3"),
    "micro-not-dividing": v("train.global_batch_size", "train.micro_batch_size=3"),
    "dp-not-dividing": v("train.global_batch_size", "layout.dp=3"),
    "layers-per-stage-sum": v("layout.layers_per_stage", "layout.layers_per_stage=[1,2]"),
    "layers-per-stage-empty-stage": v("layout.layers_per_stage", "method=vocab-1", "layout.layers_per_stage=[4,0]"),
    "layers-per-stage-vhalf": v("layout.layers_per_stage", "schedule=vhalf", "train.global_batch_size=8",
                                "layout.layers_per_stage=[2,2]"),
    "vocab-method-pp1": v("method", "method=vocab-2", "layout.pp=1"),
    "interlaced-vhalf": v("method", "schedule=vhalf", "method=interlaced"),
    "vhalf-few-microbatches": v("train.global_batch_size", "schedule=vhalf", "train.global_batch_size=2"),
    "zb-h1-recompute": v("model.activation_checkpointing", "schedule=zb-h1", "model.activation_checkpointing=full"),
    "interlaced-zb-h1": v("method", "schedule=zb-h1", "method=interlaced"),
    "interleaved-rounds": v("train.global_batch_size", "schedule=interleaved", "layout.pp=4", "model.num_layers=8",
                            "train.global_batch_size=6"),
    "interleaved-one-chunk": v("schedule.virtual_stages", "schedule=interleaved", "schedule.virtual_stages=1"),
    "tied-baseline": v("model.tie_embeddings", "model.tie_embeddings=true", "method=baseline"),
    "positions-below-seq": v("model.max_position_embeddings", "model.max_position_embeddings=32"),
    "resume-nowhere": v("train.resume", "train.resume=/nonexistent/ckpt"),
    "data-path-missing": v("data.path", "data=memmap", "data.path=/nonexistent/tokens.bin"),
    "uint16-large-vocab": v("data.dtype", "data=memmap", "data.path=/tmp", "model.vocab_size=70000"),
    # sizes and the machine
    "hidden-1e6": v("model.hidden_size", "model.hidden_size=1000000"),
    "vocab-1e8": v("model.vocab_size", "model.vocab_size=100000000"),
    "ranks-beyond-cores": v("layout.dp", "cluster.device=cpu", f"layout.dp={TOO_MANY_DP}",
                            f"train.global_batch_size={TOO_MANY_DP}"),
    "pp-beyond-cores": v("layout.pp", "cluster.device=cpu", "model.num_layers=64",
                         f"layout.pp={4 * CORES + 1}", "method=baseline"),
    # data files
    "memmap-half-token": Case("data.dtype", setup=odd_size_uint16),
    "memmap-ids-beyond-vocab": Case("model.vocab_size", setup=ids_beyond_vocab),
    "memmap-uint32-as-uint16": Case("data.dtype", setup=uint32_read_as_uint16),
    "memmap-uint16-as-uint32": Case("data.dtype", setup=uint16_read_as_uint32),
    "memmap-meta-dtype": Case("data.dtype", setup=meta_other_dtype),
    "memmap-meta-vocab": Case("model.vocab_size", setup=meta_bigger_vocab),
    "memmap-meta-truncated": Case("data.path", setup=meta_truncated),
    "memmap-no-bin-files": Case("data.path", setup=no_bin_files),
    # checkpoints to resume
    "resume-latest-missing": Case("train.resume", setup=latest_names_missing),
    "resume-not-a-checkpoint": Case("train.resume", setup=not_a_checkpoint),
    "resume-run-dir-not-step": Case("train.resume", setup=run_dir_as_checkpoint),
    "resume-meta-truncated": Case("train.resume", setup=meta_json_truncated),
    "resume-meta-empty": Case("train.resume", setup=meta_json_empty),
    "resume-rank-file-empty": Case("train.resume", setup=rank_file_empty),
    "resume-rank-file-truncated": Case("train.resume", setup=rank_file_truncated),
    "resume-rank-file-missing": Case("train.resume", setup=rank_file_missing),
    "resume-other-pp": Case("train.resume", setup=other_layout(pp=4, world_size=4)),
    "resume-other-dp": Case("train.resume", setup=other_layout(dp=2, world_size=4)),
    "resume-other-method": Case("train.resume", setup=other_layout(method="baseline")),
    "resume-other-vocab": Case("train.resume", setup=other_model(vocab_size=1024)),
    "resume-other-hidden": Case("train.resume", setup=other_model(hidden_size=128)),
    "resume-other-vocab-in-meta": Case("train.resume", setup=other_layout(vocab_size=1024)),
    # the run directory
    "run-dir-is-file": Case("hydra.run.dir", setup=run_dir_is_file),
    "run-dir-under-file": Case("hydra.run.dir", setup=run_dir_under_file),
}


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture
def no_launch(monkeypatch):
    """Fail the test if the CLI ever reaches a command's handler (where ranks would start)."""

    def reached(command):
        raise AssertionError(f"vptrain {command} got past the checks")

    monkeypatch.setattr(cli, "_handler", reached)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the CLI rewrites it for Hydra


def _run_train(overrides: list[str], capsys) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", *overrides])
    captured = capsys.readouterr()
    return exc.value.code, [line for line in captured.err.splitlines() if line.strip()]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_naming_the_key_exit_2_nothing_written(name, tmp_path, capsys, no_launch):
    case = CASES[name]
    extra = case.setup(tmp_path) if case.setup else []
    before = _snapshot(tmp_path)
    run_dir = next((o.split("=", 1)[1] for o in extra if o.startswith("hydra.run.dir=")), str(tmp_path / RUN))
    code, lines = _run_train([f"hydra.run.dir={run_dir}", "logger=none", *case.overrides, *extra], capsys)
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"vptrain train: config error: {case.key}"), lines[0]
    assert _snapshot(tmp_path) == before, "the checks wrote into the run's directory"


def test_the_table_covers_at_least_90_bad_inputs():
    assert len(CASES) >= 90


def _numeric_keys() -> dict[str, type]:
    """Every int / float key of the schema (optional ones included)."""
    out = {}
    for key in schema_keys():
        section, _, name = key.rpartition(".")
        cls = RunConfig
        for part in filter(None, section.split(".")):
            cls = typing.get_type_hints(cls)[part]
        if not dataclasses.is_dataclass(cls):
            continue
        kind = typing.get_type_hints(cls)[name]
        args = set(typing.get_args(kind)) - {type(None)} or {kind}
        if args <= {int} or args <= {float}:
            out[key] = args.pop()
    return out


def test_every_numeric_key_of_the_schema_has_a_range():
    """A numeric key added to vptrain/config.py without a rule in validate_ranges.RANGES fails here."""
    missing = set(_numeric_keys()) - set(RANGES)
    assert not missing, f"add these keys to vptrain/validate_ranges.py RANGES: {sorted(missing)}"
    assert set(RANGES) <= set(_numeric_keys()), "RANGES names a key the schema does not have"


@pytest.mark.parametrize("key", sorted(RANGES))
def test_each_range_refuses_its_outside_and_non_finite_values(key):
    """The systematic family, directly on the validator (the CLI table above runs a sample of it):
    just past each bound, and for floats nan / inf / -inf, each refused naming the key."""
    rule, kind = RANGES[key], _numeric_keys()[key]
    step = 1 if kind is int else 0.5
    bad = []
    if rule.low is not None:
        bad.append(kind(rule.low) if rule.low_open else kind(rule.low - step))
    if rule.high is not None:
        bad.append(kind(rule.high) if rule.high_open else kind(rule.high + step))
    if kind is float:
        bad += [math.nan, math.inf, -math.inf]
    assert bad
    for value in bad:
        cfg = RunConfig(run_dir="/unused")
        section, _, name = key.rpartition(".")
        setattr(value_of(cfg, section), name, value)
        with pytest.raises(ValueError, match=rf"^{re.escape(key)}: "):
            validate(cfg)


def test_cuda_without_a_gpu_is_refused_before_launch(tmp_path, capsys, no_launch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    code, lines = _run_train([f"hydra.run.dir={tmp_path / RUN}", "cluster.device=cuda"], capsys)
    assert code == 2 and len(lines) == 1 and "config error: cluster.device" in lines[0]
    assert not (tmp_path / RUN).exists()


def test_a_model_beyond_the_gpu_memory_is_refused_with_the_estimate(monkeypatch):
    """On a GPU the bound is per rank against cluster.gpu_memory_gb (CPU machines check the GPU path
    here, without the device check that needs a visible GPU)."""
    monkeypatch.setattr("vptrain.validate.validate_for_this_machine", lambda cfg: None)
    cfg = RunConfig()
    cfg.cluster.device, cfg.cluster.gpu_memory_gb = "cuda", 80.0
    cfg.model.hidden_size, cfg.model.num_layers = 16384, 64  # ~206e9 parameters, 16 bytes each, over 2 ranks
    with pytest.raises(ValueError, match=r"model.hidden_size: each rank needs at least \d+.\d GiB .* "
                                         r"cluster.gpu_memory_gb=80"):
        check_machine(cfg, None)
    cfg.layout.pp = 64  # ~52 GiB of state per rank: fits
    cfg.model.num_layers = 64
    check_machine(cfg, None)


@pytest.mark.parametrize("overrides", [
    ["layout.layers_per_stage=[2,2"],  # refused before Hydra composes
    ["optim.lr=nan"],  # refused between Hydra's composition and its writing the run directory
], ids=["parse-error", "nan"])
def test_no_traceback_reaches_the_user(tmp_path, overrides):
    proc = run_cli("train", f"hydra.run.dir={tmp_path / RUN}", *overrides, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vptrain train: config error: "), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / RUN).exists()


def test_a_good_config_passes_the_same_checks(tmp_path, capsys, no_launch):
    """The checks refuse bad input, not everything: a valid run reaches the trainer's entry."""
    with pytest.raises(AssertionError, match="got past the checks"):
        cli.main(["train", f"hydra.run.dir={tmp_path / RUN}", "logger=none"])


def test_a_stale_latest_names_the_newest_complete_checkpoint(tmp_path, monkeypatch):
    """Where the trainer would not fall back by itself (checkpoint.resolve_resume finds nothing),
    the refusal names the complete checkpoint to resume instead of starting over in silence."""
    from vptrain import checkpoint
    from vptrain.preflight_resume import check_resume

    checkpoint_files(tmp_path, meta=DEFAULT, latest="step_00000009")
    monkeypatch.setattr(checkpoint, "resolve_resume", lambda cfg: None)
    cfg = RunConfig(run_dir=str(tmp_path / RUN))
    cfg.train.resume = "auto"
    with pytest.raises(ValueError, match=r"^train.resume: .*'step_00000009'.* newest complete one is step_00000002"):
        check_resume(cfg)
