"""One engine step per configuration, with checks wrapped around the real passes.

Runs inside one spawned gloo group (test_engine_passes.py). For each configuration the ranks build
the real trainer and replace their engine's instruction map (an instance attribute shadows the
class's) by one whose per-microbatch handlers run under vptrain.host_sync.forbid_host_sync; a
handler that synchronises raises HostSyncError on its rank and the error text is returned. Under
bf16 the vocabulary gradients each pass hands to `_accumulate` are also summed in fp64, and
BF16_Optimizer's gradient buffer of each shard is read just before the optimizer step.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist

from vptrain.host_sync import forbid_host_sync

SGD = {"optim.name": "sgd", "optim.lr": 0.5, "optim.min_lr": 0.5, "optim.warmup_steps": 0, "optim.decay": "constant"}


def case(method: str, m: int = 2, **extra) -> dict:
    name = method + "".join(f"-{k.split('.')[-1]}{v}" for k, v in extra.items())
    overrides = {
        "method.name": method, "layout.pp": 2, "layout.dp": 1, "model.vocab_size": 61, "model.num_layers": 4,
        "model.hidden_size": 16, "model.num_heads": 2, "model.seq_len": 8, "train.global_batch_size": m,
        "train.micro_batch_size": 1, "train.steps": 1, "train.checkpoint_at_end": False, **SGD, **extra,
    }
    return {"name": name, "overrides": overrides}


VHALF = {"schedule.name": "vhalf"}
ZB_H1 = {"schedule.name": "zb-h1"}
INTERLEAVED = {"schedule.name": "interleaved"}
SPLIT = ("vhalf", "zb-h1")  # schedules whose backward is split: their W passes run under the guard too
CHUNKED = {"vocab.chunk_tokens": 3}
CASES = [
    case("interlaced"),
    case("vocab-naive", **CHUNKED),
    case("vocab-1", **CHUNKED, **{"vocab.store_softmax": False}),
    case("vocab-2", **{"model.tie_embeddings": True, "vocab.store_softmax": False}),
    case("vocab-1", precision="bf16"),
    case("vocab-naive", m=4, **VHALF),
    case("vocab-1", m=4, **VHALF, **{"model.tie_embeddings": True}),
    case("vocab-2", m=4, **VHALF, **CHUNKED, **{"model.tie_embeddings": True}, precision="bf16"),
    case("baseline"),
    case("baseline", m=4, **VHALF),
    case("vocab-2", m=3, **ZB_H1),
    case("vocab-1", m=3, **ZB_H1, precision="bf16"),
    case("baseline", m=3, **ZB_H1),
    case("vocab-2", m=2, **INTERLEAVED, **CHUNKED),
    case("baseline", m=4, **INTERLEAVED),
]

# Per-microbatch instructions: the compute passes and the vocabulary collectives' issue (their
# waits run inside the passes that consume them). Left out: LoadMicroBatch and the p2p transfers
# (DeepSpeed's, shape metadata exchanged once per run) and the once-per-step reductions/step.
PER_MICROBATCH = ("ForwardPass", "BackwardPass", "WeightPass", "InputForward", "InputBackward", "OutputForward",
                  "OutputBackward", "VocabCollective")


def guard_passes(engine, ran: list[str]) -> None:
    """Shadow engine's instruction map with one that runs each per-microbatch handler under the
    guard, appending the instruction's name to `ran` once it completed there."""
    guarded = dict(type(engine)._INSTRUCTION_MAP)
    for kind, handler in guarded.items():
        if kind.__name__ not in PER_MICROBATCH:
            continue

        def run(self, *args, _handler=handler, _kind=kind.__name__, **kwargs):
            with forbid_host_sync(f"{_kind}({kwargs or args}) on rank {self.global_rank}"):
                out = _handler(self, *args, **kwargs)
            ran.append(_kind)
            return out

        guarded[kind] = run
    engine._INSTRUCTION_MAP = guarded


def capture_bf16_shard_grads(engine, record: dict) -> None:
    """Sum, in fp64, the gradients `_accumulate` receives for each vocabulary shard, and copy
    BF16_Optimizer's gradient of each shard (and whether autograd left a .grad) before the step.

    That gradient buffer is fp32 only with data_types.grad_accum_dtype=fp32, which DeepSpeed 0.19
    accepts with ZeRO-1 only; by default (ZeRO-0) it is bf16. The check takes its dtype as it is."""
    from deepspeed.runtime.pipe.schedule import OptimizerStep

    shards = {id(engine.module.vocab_input): engine.module.vocab_input, id(engine.module.vocab_output):
              engine.module.vocab_output}
    for key, param in shards.items():
        zeros = torch.zeros(param.shape, dtype=torch.float64)
        record[key] = {"sum": zeros, "abs_sum": zeros.clone(), "terms": 0}
    accumulate = engine._accumulate

    def recording_accumulate(param, grad):
        entry = record[id(param)]
        entry["sum"] += grad.double()
        entry["abs_sum"] += grad.double().abs()
        entry["terms"] += 1
        accumulate(param, grad)

    engine._accumulate = recording_accumulate
    step = engine._INSTRUCTION_MAP[OptimizerStep]
    slots = {id(p): (g, i) for g, group in enumerate(engine.optimizer.bf16_groups) for i, p in enumerate(group)}

    def snapshot_then_step(self, *args, **kwargs):
        for key, param in shards.items():
            g, i = slots[key]
            hp_grad = self.optimizer.fp32_groups_gradients[g][i]
            record[key]["hp_grad"] = hp_grad.view(param.shape).double()
            record[key]["hp_dtype"] = hp_grad.dtype
            record[key]["has_grad"] = self.optimizer.fp32_groups_has_gradients[g][i]
            record[key]["lp_grad_is_none"] = param.grad is None
        return step(self, *args, **kwargs)

    engine._INSTRUCTION_MAP = {**engine._INSTRUCTION_MAP, OptimizerStep: snapshot_then_step}


def _bf16_summary(record: dict) -> list[dict]:
    """Per shard: the largest |hp_grad - Σ grads| over the bound of summing `terms` gradients into
    a buffer of the hp gradient's dtype (terms * eps * Σ|grads| elementwise: each add rounds the
    term and the partial sum by eps/2 each), and the flags."""
    out = []
    for entry in record.values():
        dtype = entry["hp_dtype"]
        bound = entry["terms"] * torch.finfo(dtype).eps * entry["abs_sum"] + torch.finfo(dtype).tiny
        out.append({
            "terms": entry["terms"],
            "hp_dtype": str(dtype),
            "ratio": ((entry["hp_grad"] - entry["sum"]).abs() / bound).max().item(),
            "nonzero": bool(entry["sum"].abs().sum() > 0),
            "has_grad": entry["has_grad"],
            "lp_grad_is_none": entry["lp_grad_is_none"],
        })
    return out


def _config(overrides: dict, run_dir: str):
    from omegaconf import OmegaConf

    from vptrain.config import RunConfig

    dotlist = [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in overrides.items()]
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.from_dotlist(dotlist),
                             {"run_dir": run_dir, "logger": {"name": "none"}})
    return OmegaConf.to_object(merged)


def worker(rank: int, world: int) -> dict[str, dict]:
    """{case name: {"error": traceback or "", "ran": instructions run under the guard, "loss": float,
    "bf16_shards": per-shard gradient checks (bf16 vocabulary cases)}}."""
    from vptrain.data import StepData
    from vptrain.train import build_trainer
    from vptrain.validate import validate

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))  # DeepSpeed reads them
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as run_dir:
        for spec in CASES:
            cfg = _config(spec["overrides"], os.path.join(run_dir, spec["name"]))
            ran: list[str] = []
            bf16: dict = {}
            result = {"error": "", "ran": ran, "loss": float("nan"), "bf16_shards": []}
            try:
                validate(cfg)
                trainer = build_trainer(cfg, torch.device("cpu"), rank)
                guard_passes(trainer.engine, ran)
                if cfg.precision == "bf16" and cfg.method.name != "baseline":
                    capture_bf16_shard_grads(trainer.engine, bf16)
                result["loss"] = trainer.train_step(StepData(cfg).microbatches(0, trainer.dp_rank)).loss
                result["bf16_shards"] = _bf16_summary(bf16)
            except Exception:  # noqa: BLE001 - reported per case; the peers time out or fail alike
                result["error"] = traceback.format_exc()[-3000:]
                # Printed now too: a peer left waiting in a collective may end the group before the
                # results are collected, and then this log is where the cause shows.
                print(f"rank {rank}, {spec['name']}:\n{result['error']}", file=sys.stderr, flush=True)
            out[spec["name"]] = result
            dist.barrier()
    return out
