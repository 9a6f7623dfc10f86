"""Evaluation (vptrain/evaluate.py) is exact in every layout and leaves training untouched.

One group of 4 CPU processes (_engine_matrix.py, handing each "eval" case to run_case here) takes every case
in turn: it trains the case's layout twice from the same seed, once plainly and once with an eval
after every step, then reloads the final checkpoint into a fresh trainer and evaluates again.
The tests hold
- the eval loss after each step to an fp64 recompute of the same windows with those weights, in one
  unpartitioned model (rel 1e-5: fp32 against fp64 on a 4-layer model is ~1e-6), with eval.sequences
  a multiple of the batch or not (the last batch filled up with padding microbatches);
- the losses and parameters of the run with evals to the plain run's, bitwise (an eval's optimizer
  step drops its gradients and changes nothing a training step reads);
- the reloaded checkpoint's eval loss to the trained model's, bitwise.
Then the CLI: `vptrain train train.eval_every=...` logs eval/loss and trains the same losses as
the group's plain run of that config, and `vptrain eval train.resume=auto` writes eval.json with
the loss its training run logged last.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.distributed

WORLD = 4
MATRIX_SCRIPT = Path(__file__).resolve().parent / "_engine_matrix.py"
S, V = 16, 509  # V not divisible by pp: padded rows exist
SGD = {"optim.name": "sgd", "optim.lr": 0.5, "optim.min_lr": 0.5, "optim.warmup_steps": 0, "optim.decay": "constant"}
RTOL = 1e-5  # fp32 eval against the fp64 recompute
BF16_RTOL = 2e-2  # bf16 matmuls: 8 mantissa bits, the loss in fp32 statistics


def case(name: str, method: str, pp: int, m: int, *, dp: int = 1, layers: int = 4, sequences: int = 0,
         **extra) -> dict:
    """sequences: eval windows (0: two full batches); others end in a batch filled up with padding."""
    g = m * dp
    overrides = {
        "method.name": method, "layout.pp": pp, "layout.dp": dp, "model.vocab_size": V, "model.num_layers": layers,
        "model.seq_len": S, "train.global_batch_size": g, "train.micro_batch_size": 1, "train.steps": 2,
        "train.checkpoint_at_end": False, "data.dtype": "uint16", "eval.sequences": sequences or 2 * g,
        **SGD, **extra,
    }
    return {"name": name, "overrides": overrides}


CASES = [
    case("pp1", "baseline", 1, 2),
    case("pp1-dp2", "baseline", 1, 2, dp=2, sequences=5),  # the last batch: one window, on dp rank 0
    case("baseline-1f1b-pp2-dp2", "baseline", 2, 2, dp=2, sequences=7),
    case("vocab-2-pp2", "vocab-2", 2, 4, sequences=6),
    case("interlaced-pp2", "interlaced", 2, 3, sequences=4),
    case("vocab-naive-pp4", "vocab-naive", 4, 4, sequences=6),
    case("vocab-1-vhalf-pp3", "vocab-1", 3, 6, layers=6, sequences=9, **{"schedule.name": "vhalf"}),
    case("baseline-vhalf-pp2", "baseline", 2, 4, sequences=5, **{"schedule.name": "vhalf"}),
    case("vocab-2-llama-pp2", "vocab-2", 2, 3, **{"model.arch": "llama", "model.num_kv_heads": 2,
                                                   "model.intermediate_size": 176}),
    case("vocab-2-bf16-pp2", "vocab-2", 2, 3, sequences=5, precision="bf16"),
]
CLI_CASE = "pp1"  # the CLI test trains this configuration (in the CLI's process: no ranks to start)


# --- the group (children) ---------------------------------------------------------------------------


def _global_params(trainer) -> dict:
    """Every stage's parameters (data-parallel replica 0) under their global names, on every rank."""
    import torch.distributed as dist

    mine = trainer.named_parameters_global() if trainer.dp_rank == 0 else {}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return {k: v for part in everyone for k, v in part.items()}


def _train(cfg, trainer, evaluator=None) -> tuple[list[float], list[float], list[dict]]:
    from vptrain.data import StepData

    data = StepData(cfg)
    losses, evals, params = [], [], []
    for step in range(cfg.train.steps):
        losses.append(trainer.train_step(data.microbatches(step, trainer.dp_rank)).loss)
        if evaluator is not None:
            evals.append(evaluator.run(trainer).loss)
            params.append(_global_params(trainer))
    return losses, evals, params


def run_case(index: int, case: dict, out_dir: str, rank: int, store) -> None:
    import torch.distributed as dist
    from _engine_matrix import make_config

    from vptrain import checkpoint
    from vptrain.evaluate import Evaluator
    from vptrain.train import build_trainer
    from vptrain.validate import validate

    run_dir = os.path.join(out_dir, f"case{index}")
    cfg = make_config(case["overrides"], run_dir)
    if rank >= cfg.layout.pp * cfg.layout.dp:
        return
    validate(cfg)
    os.makedirs(run_dir, exist_ok=True)
    dist.init_process_group("gloo", store=dist.PrefixStore(f"case{index}", store), rank=rank,
                            world_size=cfg.layout.pp * cfg.layout.dp, timeout=timedelta(seconds=120))
    try:
        device = torch.device("cpu")
        plain = build_trainer(cfg, device, rank)
        plain_losses, _, _ = _train(cfg, plain)
        plain_params = _global_params(plain)
        del plain
        trainer = build_trainer(cfg, device, rank)
        evaluator = Evaluator(cfg)
        losses, evals, params = _train(cfg, trainer, evaluator)
        path = checkpoint.save(cfg, trainer, step=cfg.train.steps, losses=losses)
        del trainer
        reloaded = build_trainer(cfg, device, rank)
        checkpoint.load(cfg, reloaded, path)
        reloaded_eval = evaluator.run(reloaded).loss
        if rank == 0:
            torch.save({"plain_losses": plain_losses, "plain_params": plain_params, "losses": losses,
                        "evals": evals, "params": params, "reloaded_eval": reloaded_eval},
                       os.path.join(run_dir, "result.pt"))
    finally:
        dist.destroy_process_group()
        gc.collect()


# --- the reference: one unpartitioned fp64 model ------------------------------------------------------


def eval_tokens(sequences: int, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, sequences * S + 1 + 37)  # a few tokens to spare


def reference_eval_loss(cfg, params: dict, tokens: np.ndarray) -> float:
    """The mean token loss of the first eval.sequences windows tokens[i*S : i*S + S + 1], computed in
    fp64 over all windows at once by the single-process model holding `params` (shards stitched)."""
    import torch.nn.functional as F

    from vptrain.engine.common import gpt_shape
    from vptrain.model import build_model
    from vptrain.resolved import resolve_layout

    one = copy.deepcopy(cfg)
    one.layout.pp, one.layout.dp, one.method.name, one.schedule.name = 1, 1, "baseline", "1f1b"
    model = build_model(gpt_shape(one, vocab_rows=resolve_layout(one).vocab.rows)).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in params:
                value = params[name]
            else:
                shards = sorted((int(a), v) for k, v in params.items()
                                for a in re.findall(rf"^{re.escape(name)}\[(\d+):\d+\]$", k))
                assert shards, f"no parameter {name} in the run's dump"
                value = torch.cat([v for _, v in shards])
            rows = min(p.shape[0], value.shape[0])  # the tables' padded rows never reach the loss
            p.zero_()
            p[:rows] = value[:rows].double()
        n = cfg.eval.sequences
        windows = torch.from_numpy(np.stack([tokens[i * S : i * S + S + 1] for i in range(n)]).astype(np.int64))
        logits = model(windows[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).item()


# --- the tests ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def group(tmp_path_factory) -> dict:
    from conftest import REPO, cli_env

    from vptrain.data import write_token_file
    from vptrain.launch.local import free_port

    out = tmp_path_factory.mktemp("eval-group")
    biggest = max(c["overrides"]["eval.sequences"] for c in CASES)
    eval_path = write_token_file(str(out / "eval.bin"), eval_tokens(biggest))
    # Run by _engine_matrix.py, which hands each "eval" case to this module's run_case.
    cases = [{**c, "kind": "eval", "overrides": {**c["overrides"], "data.eval_path": eval_path}} for c in CASES]
    (out / "cases.json").write_text(json.dumps(cases))
    port = str(free_port())
    procs = []
    for r in range(WORLD):
        env = cli_env(RANK=str(r), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        argv = [sys.executable, str(MATRIX_SCRIPT), str(out / "cases.json"), str(out), str(WORLD)]
        procs.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    (out / "rank0.log").write_text(logs[0])
    results = {}
    for i, c in enumerate(cases):
        errors = sorted((out / f"case{i}").glob("error_rank*.txt"))
        results[c["name"]] = {"errors": [e.read_text()[-4000:] for e in errors], "case": c,
                              **({} if errors else torch.load(out / f"case{i}" / "result.pt"))}
    return {"results": results, "eval_path": eval_path}


def _result(group: dict, name: str) -> dict:
    res = group["results"][name]
    assert not res["errors"], res["errors"][0]
    return res


@pytest.mark.parametrize("name", [c["name"] for c in CASES])
def test_eval_equals_the_fp64_recompute_of_the_same_windows(group, name):
    from _engine_matrix import make_config

    res = _result(group, name)
    cfg = make_config(res["case"]["overrides"], "/tmp/unused")
    tokens = np.fromfile(group["eval_path"], dtype=np.uint16).astype(np.int64)
    rtol = BF16_RTOL if cfg.precision == "bf16" else RTOL
    for step, (got, params) in enumerate(zip(res["evals"], res["params"], strict=True)):
        want = reference_eval_loss(cfg, params, tokens)
        assert got == pytest.approx(want, rel=rtol), f"step {step + 1}: eval {got} vs fp64 recompute {want}"
    assert res["evals"][0] != res["evals"][1], "the eval must see the trained weights of each step"


@pytest.mark.parametrize("name", [c["name"] for c in CASES])
def test_evaluating_between_steps_changes_no_training_loss_or_parameter(group, name):
    res = _result(group, name)
    assert res["losses"] == res["plain_losses"]
    final = res["params"][-1]
    assert final.keys() == res["plain_params"].keys()
    for key, value in res["plain_params"].items():
        assert torch.equal(final[key], value), f"{key} differs after training with evals"


@pytest.mark.parametrize("name", [c["name"] for c in CASES])
def test_a_reloaded_checkpoint_evaluates_to_the_trained_models_loss(group, name):
    res = _result(group, name)
    assert res["reloaded_eval"] == res["evals"][-1]


def test_cli_train_logs_eval_loss_and_vptrain_eval_scores_its_checkpoint(group, tmp_path):
    from _engine_matrix import make_config
    from conftest import load_params, run_cli, train_run

    res = _result(group, CLI_CASE)
    o = {**res["case"]["overrides"], "train.steps": 3, "train.eval_every": 2, "train.checkpoint_at_end": True,
         "train.dump_params": True}
    overrides = ["logger=none", "launcher.threads_per_rank=1",
                 *(f"{k.replace('.name', '') if k in ('method.name', 'optim.name') else k}={v}" for k, v in o.items())]
    run = tmp_path / "run"
    summary = train_run(run, *overrides)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/loss" in r] == [2, 3]  # every 2 steps, and after the last
    assert summary["eval_losses"] == [[r["step"], r["eval/loss"]] for r in rows if "eval/loss" in r]
    assert summary["losses"][:2] == res["plain_losses"], "the evals changed the training losses"

    run_cli("eval", f"hydra.run.dir={run}", *overrides, "train.resume=auto", check=True)
    result = json.loads((run / "eval.json").read_text())
    assert result["loss"] == summary["final_eval_loss"] and result["step"] == 3
    assert result["sequences"] == o["eval.sequences"] and result["tokens"] == o["eval.sequences"] * S
    cfg = make_config(o, str(run))
    tokens = np.fromfile(group["eval_path"], dtype=np.uint16).astype(np.int64)
    assert result["loss"] == pytest.approx(reference_eval_loss(cfg, load_params(run), tokens), rel=RTOL)
    # The eval's config is its own file: the training run's config.yaml (train.resume=never) stays.
    assert "resume: never" in (run / "config.yaml").read_text()
    assert "resume: auto" in (run / "eval_config.yaml").read_text()


# --- a Hugging Face Llama, evaluated by vptrain in three layouts against transformers -----------------

HF_SEQUENCES, HF_BATCH = 20, 6  # V-Half at pp=3 needs m >= 2p = 6 microbatches; the last batch holds 2
HF_LAYOUTS = {
    "pp1": ["layout.pp=1", "method=baseline"],
    "pp2-vocab-2": ["layout.pp=2", "method=vocab-2"],
    "pp3-vhalf-vocab-2": ["layout.pp=3", "method=vocab-2", "schedule=vhalf"],
}


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory) -> tuple[Path, str, float]:
    """A random LlamaForCausalLM saved with save_pretrained, an eval file, and the loss transformers
    computes on its windows (labels = the window: transformers shifts them itself)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vptrain.data import write_token_file

    out = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    # initializer_range well above the default 0.02, so the loss (~8.1) is far from a uniform
    # guess (ln 1001 = 6.9) and every tensor's mapping shows in it.
    config = LlamaConfig(vocab_size=1001, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=176, max_position_embeddings=64,
                         tie_word_embeddings=False, initializer_range=0.2)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out / "model")
    tokens = np.random.default_rng(1).integers(0, 1001, HF_SEQUENCES * S + 1 + 11)
    eval_path = write_token_file(str(out / "eval.bin"), tokens)
    windows = torch.from_numpy(np.stack([tokens[i * S : i * S + S + 1] for i in range(HF_SEQUENCES)]))
    with torch.no_grad():
        loss = model(input_ids=windows, labels=windows).loss.item()
    assert abs(loss - np.log(1001)) > 0.5
    return out / "model", eval_path, loss


@pytest.mark.parametrize("layout", list(HF_LAYOUTS))
def test_vptrain_eval_of_a_hugging_face_llama_gives_the_loss_transformers_computes(hf_llama, tmp_path, layout):
    from conftest import run_cli

    model_dir, eval_path, want = hf_llama
    run = tmp_path / "run"
    run_cli("eval", f"hydra.run.dir={run}", "logger=none", f"model.init_from=hf:{model_dir}",
            f"data.eval_path={eval_path}", f"eval.sequences={HF_SEQUENCES}", f"train.global_batch_size={HF_BATCH}",
            f"model.seq_len={S}", *HF_LAYOUTS[layout], check=True)
    result = json.loads((run / "eval.json").read_text())
    assert result["init_from"] == f"hf:{model_dir}" and result["checkpoint"] is None
    assert result["loss"] == pytest.approx(want, rel=1e-5)
