"""Config: every preset composes and validates; bad configs fail early with a clear message."""

from __future__ import annotations

import pytest
from conftest import REPO, run_cli
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vptrain.config import RunConfig, from_yaml, microbatches, padded_vocab_size, register_configs, to_yaml
from vptrain.validate import validate

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))


def compose_cfg(*overrides: str) -> RunConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        dcfg = compose("config", overrides=list(overrides))
    dcfg.run_dir = "/tmp/unused"
    return OmegaConf.to_object(dcfg)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_preset_composes_and_validates(experiment):
    cfg = compose_cfg(f"experiment={experiment}")
    validate(cfg)
    assert cfg.layout.pp >= 1 and microbatches(cfg) >= 1


@pytest.mark.parametrize("model", MODELS)
def test_every_model_preset_composes(model):
    cfg = compose_cfg(f"model={model}", "layout.pp=4", "train.global_batch_size=8")
    validate(cfg)
    assert cfg.model.name == model


def test_paper_presets_match_the_paper_tables():
    shapes = {m: compose_cfg(f"model={m}").model for m in MODELS}
    assert (shapes["gpt-4b"].num_layers, shapes["gpt-4b"].num_heads, shapes["gpt-4b"].hidden_size) == (32, 24, 3072)
    assert (shapes["gpt-10b"].num_layers, shapes["gpt-10b"].num_heads, shapes["gpt-10b"].hidden_size) == (48, 32, 4096)
    assert (shapes["gpt-21b"].num_layers, shapes["gpt-21b"].num_heads, shapes["gpt-21b"].hidden_size) == (64, 40, 5120)
    assert (shapes["gpt-7b"].num_layers, shapes["gpt-7b"].num_heads, shapes["gpt-7b"].hidden_size) == (32, 32, 4096)
    assert (shapes["gpt-16b"].num_layers, shapes["gpt-16b"].num_heads, shapes["gpt-16b"].hidden_size) == (48, 40, 5120)
    assert (shapes["gpt-30b"].num_layers, shapes["gpt-30b"].num_heads, shapes["gpt-30b"].hidden_size) == (64, 48, 6144)


def test_required_override_keys_exist():
    cfg = compose_cfg(
        "model.vocab_size=1000", "model.num_layers=6", "model.hidden_size=96", "model.num_heads=3",
        "model.seq_len=32", "layout.pp=3", "layout.dp=2", "layout.layers_per_stage=[1,2,3]", "method=baseline",
        "schedule=1f1b", "train.steps=7", "train.global_batch_size=12", "train.micro_batch_size=2",
        "train.seed=9", "precision=bf16", "logger=none",
    )
    validate(cfg)
    assert microbatches(cfg) == 3
    assert cfg.layout.layers_per_stage == [1, 2, 3] and cfg.precision == "bf16" and cfg.logger.name == "none"


def test_resolved_config_round_trips_through_yaml():
    cfg = compose_cfg("layout.pp=3", "model.num_layers=6", "method=vocab-2")
    cfg.run_dir = "/tmp/somewhere"
    again = from_yaml(to_yaml(cfg))
    assert again == cfg


def test_vocab_methods_pad_to_a_multiple_of_pp():
    cfg = compose_cfg("layout.pp=3", "model.vocab_size=100", "method=vocab-1")
    assert padded_vocab_size(cfg) == 102
    cfg = compose_cfg("layout.pp=3", "model.vocab_size=100", "method=vocab-1", "vocab.pad_to_multiple_of=8")
    assert padded_vocab_size(cfg) == 120
    assert padded_vocab_size(compose_cfg("model.vocab_size=100")) == 100


# (overrides, text the error must contain). Each is a distinct rule of validate.py or the schema.
BAD_CONFIGS = [
    (["model.num_heads=5"], "model.num_heads"),
    (["layout.pp=8"], "model.num_layers"),
    (["model.vocab_size=1", "model.num_layers=4"], "model.vocab_size"),
    (["train.global_batch_size=8", "train.micro_batch_size=3"], "train.global_batch_size"),
    (["layout.layers_per_stage=[1,2]"], "layout.layers_per_stage"),
    (["layout.layers_per_stage=[1,4]"], "layout.layers_per_stage"),
    (["precision=fp16"], "precision"),
    (["optim.zero_stage=2"], "optim.zero_stage"),
    (["data=memmap", "data.path=/nonexistent/tokens.bin"], "data.path"),
    (["train.steps=0"], "train.steps"),
    (["method=vocab-2", "layout.pp=1"], "method"),
    (["schedule=vhalf", "method=redis"], "method"),
    (["schedule=vhalf", "train.global_batch_size=2"], "train.global_batch_size"),
    (["model.tie_embeddings=true", "method=baseline"], "model.tie_embeddings"),
    (["layout.ppp=2"], "ppp"),  # unknown key: caught by the schema at composition
    (["layout.pp=two"], "layout.pp"),  # wrong type
    (["optim.lr=-1"], "optim.lr"),
]


@pytest.mark.parametrize(("overrides", "needle"), BAD_CONFIGS, ids=[" ".join(o) for o, _ in BAD_CONFIGS])
def test_bad_config_exits_2_with_a_clear_message_before_anything_starts(tmp_path, overrides, needle):
    run_dir = tmp_path / "run"
    proc = run_cli("train", f"hydra.run.dir={run_dir}", *overrides, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    # Nothing started: no resolved config, no worker logs.
    assert not (run_dir / "config.yaml").exists()
    assert not (run_dir / "logs").exists()
