"""model.activation_checkpointing=none|full|selective: recompute changes no number, keeps what the plan
says, and the plan charges its memory and time (vptrain/models/recompute.py, schedule/activations.py).

The pipeline engines run the same layers; the equivalence matrix (tests/distributed/test_vocab_engine.py)
has recompute rows for each engine family."""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import validated_config
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vptrain.config import RunConfig
from vptrain.data import StepData
from vptrain.engine.common import gpt_shape
from vptrain.engine.single import SingleProcessTrainer
from vptrain.host_sync import forbid_host_sync
from vptrain.model import layer_list
from vptrain.models.recompute import RecomputedLayer
from vptrain.plan import make_plan
from vptrain.resolved import resolve_layout
from vptrain.schedule.activations import (
    activation_bytes,
    pipeline_copies_bytes,
    recompute_flops,
    recompute_transient_bytes,
)
from vptrain.schedule.costs import K, ModelShape, device_profile, pass_costs
from vptrain.validate import validate

MODES = ("none", "full", "selective")
SMALL = {"model.vocab_size": 97, "model.num_layers": 2, "model.hidden_size": 32, "model.num_heads": 4,
         "model.seq_len": 16, "train.micro_batch_size": 2, "train.global_batch_size": 4, "layout.pp": 1,
         "method.name": "baseline",
         "optim.name": "sgd", "optim.lr": 0.5, "optim.warmup_steps": 0, "optim.decay": "constant"}
LLAMA = {"model.arch": "llama", "model.num_kv_heads": 2, "model.intermediate_size": 88}
ARCHS = {"gpt": {}, "llama": LLAMA}


def _cfg(**overrides) -> RunConfig:
    return validated_config(**overrides)


def _train(cfg: RunConfig, steps: int = 2) -> tuple[list[float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-step losses, then the gradients of one more forward/backward, and the parameters."""
    trainer = SingleProcessTrainer(cfg, device=torch.device("cpu"))
    data = StepData(cfg)
    losses = [trainer.train_step(data.microbatches(step, 0)).loss for step in range(steps)]
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.forward_backward(data.microbatches(steps, 0))
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    return losses, grads, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize(("arch", "precision"), [("gpt", "fp32"), ("llama", "fp32"), ("llama", "bf16")])
def test_recompute_changes_no_number(arch: str, precision: str) -> None:
    """Recompute re-runs the same kernels on the same inputs in the graph the forward built: losses,
    gradients and updated parameters are bitwise those of `none` (no tolerance is needed: any
    difference would be a different computation)."""
    runs = {mode: _train(_cfg(**SMALL, **ARCHS[arch], precision=precision,
                              **{"model.activation_checkpointing": mode})) for mode in MODES}
    base_losses, base_grads, base_params = runs["none"]
    for mode in ("full", "selective"):
        losses, grads, params = runs[mode]
        assert losses == base_losses, mode
        for name in base_params:
            assert torch.equal(grads[name], base_grads[name]), (mode, name)
            assert torch.equal(params[name], base_params[name]), (mode, name)
    assert base_losses[-1] != base_losses[0]  # the steps moved the model: not a comparison of untouched ones


class _Created(TorchDispatchMode):
    """Every storage created inside it, weakly referenced: what survives the forward is what the
    autograd graph (and checkpoint's inputs, which it holds outside saved_tensors_hooks) keeps."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                self.storages.setdefault(s._cdata, (StorageWeakRef(s), s.nbytes()))
        return out

    def alive(self, exclude: set[int]) -> dict[int, int]:
        gc.collect()
        return {k: n for k, (ref, n) in self.storages.items() if not ref.expired() and k not in exclude}


def _chunk(cfg: RunConfig) -> tuple[torch.nn.Sequential, ModelShape]:
    """The transformer layers of a vocab-method pipeline chunk (no vocabulary), and the plan's shape."""
    layout = resolve_layout(cfg)
    blocks = [cls(*args) for cls, args in layer_list(gpt_shape(cfg, vocab_rows=layout.vocab.rows), with_vocab=False)]
    blocks = [b for b in blocks if isinstance(b, RecomputedLayer)]
    assert len(blocks) == cfg.model.num_layers
    return torch.nn.Sequential(*blocks), layout.shape


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_layers_keep_what_the_plan_says(arch: str, mode: str) -> None:
    cfg = _cfg(**SMALL, **ARCHS[arch], **{"model.activation_checkpointing": mode})
    chunk, shape = _chunk(cfg)
    m = cfg.model
    leaf = torch.randn(cfg.train.micro_batch_size, m.seq_len, m.hidden_size, requires_grad=True)
    params = {p.untyped_storage()._cdata for p in chunk.parameters()}
    created = _Created()
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), created:
        x = leaf * 1.0  # the chunk's input, created in the measurement like every activation
        out = chunk(x)
    kept = created.alive(params | {out.untyped_storage()._cdata})
    # The plan: L layers' worth plus the chunk output (which the pipeline holds; here `out`).
    planned = activation_bytes(shape, m.num_layers) - shape.hidden * shape.tokens * shape.act_bytes
    # Left out by the plan: per-token statistics (norms' mean/rstd: <= 4, log-sum-exp: nh) and the
    # rotary cos/sin tables (2 x T x hs), per layer, in fp32. Recompute keeps none of them.
    small = m.num_layers * 4 * (shape.tokens * (4 + m.num_heads) + 2 * m.seq_len * (m.hidden_size // m.num_heads))
    assert planned <= sum(kept.values()) <= planned + (small if mode == "none" else 0), kept
    if mode == "none":  # the measurement counts exactly what autograd saved (and nothing else)
        assert set(kept) == set(saved) - params - {leaf.untyped_storage()._cdata}
    out.sum().backward()  # the graph is whole: the backward runs
    assert leaf.grad is not None


def test_plan_shows_less_activation_memory() -> None:
    """`vptrain plan model.activation_checkpointing=...`: per stage, the in-flight microbatches'
    activations follow the mode, plus what one recomputation rebuilds during a backward."""
    base = {**SMALL, "layout.pp": 2, "model.num_layers": 4, "train.global_batch_size": 8, "method.name": "vocab-1"}
    per_rank = {}
    for mode in MODES:
        cfg = _cfg(**base, **{"model.activation_checkpointing": mode})
        plan = make_plan(cfg)
        shape = plan.resolved.layout.shape
        for stage in plan.stages:
            copies = pipeline_copies_bytes(shape, hidden_input=True, loss_chunk=stage.layout.loss)
            expected = stage.peak_in_flight * (activation_bytes(shape, stage.layout.num_layers) + copies)
            assert stage.memory["activations"] == pytest.approx(expected + recompute_transient_bytes(shape))
        per_rank[mode] = [stage.memory["activations"] for stage in plan.stages]
    for r in range(2):
        assert per_rank["full"][r] < per_rank["selective"][r] < per_rank["none"][r]


def test_recompute_costs_its_forward_in_the_backward() -> None:
    """B grows by the recomputed FLOPs (full: a whole forward); F and the vocabulary passes do not."""
    dev = device_profile("cpu")
    rate = dev.peak_flops["fp32"] * dev.efficiency
    costs = {}
    for mode in MODES:
        m = ModelShape(vocab=512, vocab_rows=512, layers=4, hidden=64, seq=32, micro_batch=2, act_bytes=4,
                       recompute=mode)
        costs[mode] = pass_costs(m, method="vocab-2", p=2, chunk_layers=[(2,), (2,)], loss_place=(1, 0),
                                 precision="fp32", device=dev).compute
        assert recompute_flops(m) <= recompute_flops(ModelShape(**{**m.__dict__, "recompute": "full"}))
    for rank in range(2):
        none, full, sel = (costs[mode][rank] for mode in MODES)
        forward = none[(K.F, 0)] - dev.pass_overhead_s
        assert full[(K.B, 0)] - none[(K.B, 0)] == pytest.approx(forward)
        m = ModelShape(vocab=512, vocab_rows=512, layers=4, hidden=64, seq=32, micro_batch=2, act_bytes=4,
                       recompute="selective")
        assert sel[(K.B, 0)] - none[(K.B, 0)] == pytest.approx(2 * recompute_flops(m) / rate)
        assert 0 < sel[(K.B, 0)] - none[(K.B, 0)] < forward
        for key in none:
            if key[0] is not K.B:
                assert full[key] == none[key] == sel[key]


def test_unknown_mode_is_a_clear_error() -> None:
    cfg = _cfg(**SMALL)
    cfg.model.activation_checkpointing = "some"
    with pytest.raises(ValueError, match="model.activation_checkpointing"):
        validate(cfg)
    with pytest.raises(ValueError, match="model.activation_checkpointing: 'some'"):
        _chunk(cfg)


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_recompute_adds_no_host_sync(arch: str, mode: str) -> None:
    """DESIGN.md invariant 6 holds inside F and inside B, where the recomputation runs."""
    cfg = _cfg(**SMALL, **ARCHS[arch], **{"model.activation_checkpointing": mode})
    chunk, _ = _chunk(cfg)
    x = torch.randn(cfg.train.micro_batch_size, cfg.model.seq_len, cfg.model.hidden_size, requires_grad=True)
    with forbid_host_sync("F"):
        out = chunk(x)
    with forbid_host_sync("B"):
        torch.autograd.backward(out, torch.ones_like(out))
    assert x.grad is not None
