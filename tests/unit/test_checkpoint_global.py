"""A checkpoint read as the single-process model (vptrain/checkpoint_global.py), resharding into
another layout in-process (vptrain/reshard.py, single-process trainer), and the checks before launch
(vptrain/preflight_resume.py): another model shape or optimizer is refused, another layout is not.
The pipeline layouts' resharding runs in tests/distributed/test_reshard_resume.py."""

from __future__ import annotations

import json
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from test_checkpoint_safety import make_cfg

from vptrain import checkpoint, cli, reshard
from vptrain.checkpoint_global import global_optimizer_state, global_params
from vptrain.data import StepData
from vptrain.engine.single import SingleProcessTrainer
from vptrain.launch.env import LaunchEnv
from vptrain.train import train_worker

CPU = torch.device("cpu")
ONE_RANK = LaunchEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=0)
TINY = ("model.vocab_size=501", "model.num_layers=2", "train.global_batch_size=2", "method=baseline")


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()  # train_worker sets launcher.threads_per_rank
    yield
    torch.set_num_threads(threads)


def trained(tmp_path: Path, *overrides: str, steps: int = 2) -> tuple[SingleProcessTrainer, str]:
    cfg = make_cfg(tmp_path, *TINY, *overrides)
    trainer, data = SingleProcessTrainer(cfg, device=CPU), StepData(cfg)
    losses = [trainer.train_step(data.microbatches(step, 0)).loss for step in range(steps)]
    return trainer, checkpoint.save(cfg, trainer, step=steps, losses=losses)


def train(run_dir: Path, *overrides: str) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    return train_worker(make_cfg(run_dir, *overrides), ONE_RANK)


@pytest.mark.parametrize("overrides", [(), ("model=llama-tiny", "model.tie_embeddings=true")],
                         ids=["gpt", "llama-tied"])
def test_global_params_and_optimizer_state_are_the_trainers(tmp_path, overrides):
    trainer, path = trained(tmp_path, *overrides)
    params = global_params(path)
    mine = dict(trainer.model.named_parameters())
    assert params.keys() == mine.keys()
    tied = trainer.cfg.model.tie_embeddings
    assert (f"{trainer.cfg.model.num_layers + 2}.weight" in params) is not tied, "a tied output layer is 0.wte"
    for name, p in mine.items():
        assert params[name].dtype == torch.float32 and torch.equal(params[name], p.detach()), name
    state = global_optimizer_state(path)
    assert state.name == "adamw" and state.scheduler == trainer.scheduler.state_dict()
    for name, p in mine.items():
        ours = trainer.optimizer.state[p]
        assert state.per_param[name]["step"] == float(ours["step"]) == 2.0
        for kind in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state.per_param[name][kind], ours[kind]), (name, kind)


def _deepspeed_rank_file(params: list[tuple[str, str, list | None, torch.Tensor]], *, dp: int, stage: int,
                         step: float, gap: int) -> list[dict]:
    """The rank files of one stage as DeepSpeed's BF16_Optimizer writes them (bf16 module, fp32 master
    partitions, fragment addresses), with `gap` padding elements between parameters and at the end,
    so a parameter spans two partitions."""
    from deepspeed.utils.tensor_fragment import fragment_address

    chunks, offsets = [], []
    for _, _, _, value in params:
        offsets.append(sum(c.numel() for c in chunks))
        chunks += [value.reshape(-1), torch.full((gap,), 7.0)]
    flat = torch.cat(chunks)
    flat = torch.cat([flat, torch.zeros((-flat.numel()) % dp)])
    size = flat.numel() // dp
    files = []
    for d in range(dp):
        lo, hi = d * size, (d + 1) * size
        mapping = OrderedDict()
        for (local, _, _, value), offset in zip(params, offsets, strict=True):
            start, end = max(lo, offset), min(hi, offset + value.numel())
            if start < end:
                mapping[local] = fragment_address(numel=end - start, start=start - lo)
        part = flat[lo:hi].clone()
        files.append({
            "module": {local: value.to(torch.bfloat16) for local, _, _, value in params},
            "optimizer": {"base_optimizer_state": {"state": {0: {"step": torch.tensor(step), "exp_avg": part * 2,
                                                                 "exp_avg_sq": part * 3}},
                                                   "param_groups": [{"params": [0]}]},
                          "single_partition_of_fp32_groups": [part], "partition_count": [dp],
                          "group_paddings": [0], "param_slice_mappings": [mapping]},
            "scheduler": {"last_epoch": int(step)}, "rng": {"torch": torch.get_rng_state()},
            "param_slices": [[local, name, rows] for local, name, rows, _ in params],
            "coord": {"stage": stage, "dp_rank": d},
        })
    return files


def test_deepspeed_partitions_and_vocabulary_shards_are_reassembled(tmp_path):
    """Two stages × two data-parallel partitions of a flat fp32 master, the input embedding sharded by
    rows over the stages: each global tensor comes back whole, from the fp32 master (values a bf16
    module cannot hold), and its Adam moments with it."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(6, 4, generator=g, dtype=torch.float32) / 3
    w1, w2 = torch.randn(5, generator=g) / 3, torch.randn(3, 3, generator=g) / 3
    stage0 = [("vocab_input", "0.wte", [0, 3], table[:3]), ("1.w", "1.w", None, w1)]
    stage1 = [("vocab_input", "0.wte", [3, 6], table[3:]), ("2.w", "2.w", None, w2)]
    files = [*_deepspeed_rank_file(stage0, dp=2, stage=0, step=5.0, gap=3),
             *_deepspeed_rank_file(stage1, dp=2, stage=1, step=5.0, gap=1)]
    ckpt = tmp_path / "step_00000005"
    ckpt.mkdir()
    for rank, state in enumerate([files[0], files[2], files[1], files[3]]):  # rank = dp * pp + stage
        torch.save(state, ckpt / f"rank_{rank}.pt")
    (ckpt / "meta.json").write_text(json.dumps({"step": 5, "losses": [], "pp": 2, "dp": 2, "world_size": 4,
                                                "vocab_rows": 6, "model": {}, "optim": {"name": "adamw"}}))
    params = global_params(str(ckpt))
    assert params.keys() == {"0.wte", "1.w", "2.w"}
    for name, want in (("0.wte", table), ("1.w", w1), ("2.w", w2)):
        assert params[name].dtype == torch.float32 and torch.equal(params[name], want), name
    assert not torch.equal(table.to(torch.bfloat16).float(), table), "the values must tell master from module"
    state = global_optimizer_state(str(ckpt))
    assert torch.equal(state.per_param["0.wte"]["exp_avg"], table * 2)
    assert torch.equal(state.per_param["2.w"]["exp_avg_sq"], w2 * 3)
    assert state.per_param["1.w"]["step"] == 5.0 and state.scheduler == {"last_epoch": 5}


@pytest.mark.parametrize("optim", ["adamw", "sgd"])
def test_resharded_resume_continues_the_same_losses(tmp_path, optim, monkeypatch):
    """A checkpoint of 501 vocabulary rows resumed with vocab.pad_to_multiple_of=8 (504 rows: another
    layout, so the reshard path, its padding rows zero) continues the uninterrupted run's losses."""
    run = (*TINY, f"optim={optim}", "train.steps=4", "logger=none")
    full = train(tmp_path / "full", *run)
    train(tmp_path / "split", *run, "train.stop_at_step=2")
    real, resharded = reshard.load_resharded, []

    def spy(*args):
        resharded.append(args)
        return real(*args)

    monkeypatch.setattr(reshard, "load_resharded", spy)
    ckpt = tmp_path / "split" / "checkpoints" / "step_00000002"
    resumed = train(tmp_path / "other", *run, "vocab.pad_to_multiple_of=8", f"train.resume={ckpt}")
    assert len(resharded) == 1, "another vocabulary padding must take the reshard path"
    assert resumed["losses"][:2] == full["losses"][:2], "the checkpoint's losses come with it"
    for got, want in zip(resumed["losses"][2:], full["losses"][2:], strict=True):
        assert abs(got - want) <= 1e-5 * abs(want), (resumed["losses"], full["losses"])


@pytest.fixture
def no_launch(monkeypatch):
    def reached(command):
        raise AssertionError("got past the checks")

    monkeypatch.setattr(cli, "_handler", reached)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the CLI rewrites it for Hydra


def _cli_train(*overrides: str, capsys) -> tuple[int | None, list[str]]:
    try:
        cli.main(["train", "logger=none", *overrides])
        code = None
    except SystemExit as exc:
        code = exc.code
    except AssertionError as err:
        assert "got past the checks" in str(err)
        code = None
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_another_model_shape_or_optimizer_is_refused_before_launch_another_layout_is_not(tmp_path, capsys,
                                                                                         no_launch):
    _, path = trained(tmp_path / "written")
    capsys.readouterr()
    base = (f"hydra.run.dir={tmp_path / 'new'}", f"train.resume={path}", *TINY)
    code, lines = _cli_train(*base, "model.hidden_size=32", "model.num_heads=2", capsys=capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("vptrain train: config error: model.hidden_size: checkpoint "), lines[0]
    assert "model.hidden_size=64 (this run: 32)" in lines[0] and "model.num_heads=4 (this run: 2)" in lines[0]
    code, lines = _cli_train(*base, "optim=sgd", capsys=capsys)
    assert code == 2 and lines[0].startswith("vptrain train: config error: optim.name:"), lines
    assert not (tmp_path / "new").exists(), "a refused resume writes nothing"
    code, lines = _cli_train(*base, "layout.pp=2", "method=vocab-2", "precision=bf16", capsys=capsys)
    assert code is None, f"another layout must pass the checks: {lines}"
