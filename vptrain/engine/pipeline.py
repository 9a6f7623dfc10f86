"""The plain pipeline (method=baseline / redis) on DeepSpeed's PipelineEngine.

Stage 0 holds the input embedding, the last stage the final norm, output layer and loss; the
transformer layers are split as the resolved plan says (vptrain/resolved.py). Ranks are
laid out pipeline-fastest: rank = dp_index * pp + stage.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os

import torch
import torch.distributed as dist

from vptrain.config import RunConfig
from vptrain.engine.common import (
    BusyTimer,
    Microbatch,
    StepResult,
    gpt_shape,
    gradient_bytes,
    optimizer_state_bytes,
    tensor_bytes,
)
from vptrain.engine.deepspeed_setup import deepspeed_config, import_deepspeed
from vptrain.engine.param_names import GlobalSlice, global_slices, named_parameters_global
from vptrain.engine.step_clock import install_step_clock
from vptrain.init_from import apply_init_from, restore_fp32_masters
from vptrain.model import layer_list
from vptrain.optim import build_optimizer, build_scheduler
from vptrain.resolved import ResolvedPlan, resolve
from vptrain.vocab.one_shard import OneShardLoss


def layer_boundaries(counts: list[int], *, leading: int, trailing: int) -> list[int]:
    """Pipeline-module part boundaries: `leading` layers (embedding) join stage 0 and `trailing`
    layers (final norm, output head) join the last stage."""
    bounds = [0]
    for i, n in enumerate(counts):
        bounds.append(bounds[-1] + n + (leading if i == 0 else 0))
    bounds[-1] += trailing
    return bounds


def plain_loss_fn(cfg: RunConfig, plan: ResolvedPlan) -> OneShardLoss:
    """The last stage's loss for baseline and redis: the vocabulary kernel on one shard (the same
    kernel as the vocabulary methods, DESIGN.md invariant 9), with the plan's chunking and the run's
    softmax option. Its input is the last layer's (hidden state, output weight) pair (model.OutputLayer)."""
    return OneShardLoss(cfg.model.vocab_size, chunk_tokens=plan.layout.chunk_tokens,
                        store_softmax=cfg.vocab.store_softmax)


def make_topology(cfg: RunConfig):
    from deepspeed.runtime.pipe.topology import ProcessTopology

    # The last axis varies fastest: consecutive ranks are consecutive pipeline stages.
    return ProcessTopology(axes=["data", "pipe"], dims=[cfg.layout.dp, cfg.layout.pp])


def build_engine_classes(ds):
    """Subclasses defined lazily so importing this module does not import deepspeed."""
    from deepspeed.runtime.pipe import schedule
    from deepspeed.runtime.pipe.engine import PipelineEngine
    from deepspeed.runtime.pipe.module import PipelineModule

    class StagedPipelineModule(PipelineModule):
        """PipelineModule whose stage boundaries are given explicitly."""

        def __init__(self, layers, *, parts: list[int], **kwargs):
            self._explicit_parts = parts
            super().__init__(layers=layers, partition_method="uniform", **kwargs)

        def _partition_layers(self, method="uniform"):
            stage_id = self._topo.get_coord(self.global_rank).pipe
            self.parts = list(self._explicit_parts)
            self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

    class TimedPipelineEngine(PipelineEngine):
        """DeepSpeed's 1F1B engine, timing its compute passes (per-stage busy time) and recording
        their order as the plan names them: DeepSpeed runs forwards and backwards in microbatch
        order, so the k-th ForwardPass of a step is F<k> (its transfers are DeepSpeed's own)."""

        discard_step = False  # an eval batch: the optimizer step drops the gradients (discarding_step)

        def __init__(self, *args, busy_timer: BusyTimer, **kwargs):
            self.busy_timer = busy_timer
            self.executed: list[str] = []
            self._passes_run = {"F": 0, "B": 0}
            super().__init__(*args, **kwargs)

        def train_batch(self, *args, **kwargs):
            self.executed, self._passes_run = [], {"F": 0, "B": 0}
            return super().train_batch(*args, **kwargs)

        def _timed_pass(self, kind: str, run, buffer_id) -> None:
            self.executed.append(f"{kind}{self._passes_run[kind]}")
            self._passes_run[kind] += 1
            token = self.busy_timer.start()
            try:
                run(buffer_id)
            finally:
                self.busy_timer.stop(token)

        def _exec_forward_pass(self, buffer_id):
            self._timed_pass("F", super()._exec_forward_pass, buffer_id)

        def _exec_backward_pass(self, buffer_id):
            self._timed_pass("B", super()._exec_backward_pass, buffer_id)

        def clip_fp32_gradients(self):
            # DeepSpeed's clip with the norm in fp64 (see engine/grad_norm.py); kept for logging.
            from vptrain.engine.grad_norm import clip_fp32_engine

            self._global_grad_norm = clip_fp32_engine(self)

        def _exec_optimizer_step(self, lr_kwargs=None):
            if self.discard_step:
                discard_gradients(self)
                return
            super()._exec_optimizer_step(lr_kwargs)

        # The map holds function objects, so overridden handlers must be re-registered.
        _INSTRUCTION_MAP = {
            **PipelineEngine._INSTRUCTION_MAP,
            schedule.ForwardPass: _exec_forward_pass,
            schedule.BackwardPass: _exec_backward_pass,
            schedule.OptimizerStep: _exec_optimizer_step,
        }

    return StagedPipelineModule, TimedPipelineEngine


def discard_gradients(engine) -> None:
    """The optimizer step of an eval batch: drop the step's gradients exactly as DeepSpeed's
    _take_model_step clears them after a real step (bf16: its fp32 gradient buffers too), and
    change nothing else: parameters, optimizer state, LR schedule and step counters stay."""
    if engine.bfloat16_enabled():
        if hasattr(engine.optimizer, "zero_grad"):
            engine.optimizer.zero_grad()
        else:
            engine.zero_grad()
    elif engine.zero_optimization() or engine.fp16_enabled():
        engine.optimizer.zero_grad()
    else:
        engine.zero_grad()


@contextlib.contextmanager
def discarding_step(engine):
    """While active, the schedule's optimizer step discards the gradients (eval batches)."""
    engine.discard_step = True
    # DeepSpeed prints its progress line when global_steps % steps_per_print == 0, which holds
    # before the first real step (global_steps=0): an eval batch of an untrained model would print it.
    steps_per_print, engine._config.steps_per_print = engine._config.steps_per_print, None
    try:
        yield
    finally:
        engine.discard_step = False
        engine._config.steps_per_print = steps_per_print


def construct_engine(engine_cls, cfg: RunConfig, module, optimizer, scheduler, **extra):
    """Build a DeepSpeed pipeline engine of our class directly: deepspeed.initialize() hard-codes
    PipelineEngine / DualPipeVEngine."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from vptrain.engine.grad_norm import route_clipping_through_fp64

    ds_cfg = deepspeed_config(cfg)
    engine = engine_cls(
        args=None,
        model=module,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        mpu=module.mpu(),
        dist_init_required=False,
        config=ds_cfg,
        config_class=DeepSpeedConfig(ds_cfg, module.mpu()),
        **extra,
    )
    route_clipping_through_fp64(engine)  # bf16 and ZeRO clip with the fp64 norm too
    engine.step_clock = install_step_clock(engine)  # where each rank's step goes (benchmarks)
    return engine


class PipelineTrainer:
    def __init__(self, cfg: RunConfig, *, device: torch.device, plan: ResolvedPlan | None = None):
        ds = import_deepspeed(device.type)
        # Wraps the process group vptrain already created (no new rendezvous).
        ds.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
        from deepspeed.pipe import LayerSpec

        self.cfg, self.device = cfg, device
        self.resolved = plan = plan or resolve(cfg)  # the layers per stage and the rows `vptrain plan` prints
        module_cls, engine_cls = build_engine_classes(ds)
        shape = gpt_shape(cfg, vocab_rows=plan.layout.vocab.rows)
        specs = [LayerSpec(cls, *args) for cls, args in layer_list(shape, with_vocab=True)]
        self.counts = list(plan.layout.stage_layers)
        parts = layer_boundaries(self.counts, leading=1, trailing=2)
        torch.manual_seed(cfg.train.seed)  # layers init from their own seeds; this only fixes the rest
        with contextlib.redirect_stdout(io.StringIO()):  # PipelineModule prints its topology on rank 0
            self.module = module_cls(specs, parts=parts, topology=make_topology(cfg),
                                     loss_fn=plain_loss_fn(cfg, plan))
        for p in self.module.parameters():
            # DeepSpeed's fp32 clip norm keeps only pipe-rank-0 params unless they are tagged
            # model-parallel; our layer params are never replicated across stages.
            p.model_parallel = True
        apply_init_from(cfg, self.module, global_slices(self.module, num_layers=cfg.model.num_layers,
                                                        vocab_rows=plan.layout.vocab.rows))
        self.optimizer = build_optimizer(self.module.parameters(), cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)
        self.timer = BusyTimer(device)
        self.engine = construct_engine(engine_cls, cfg, self.module, self.optimizer, self.scheduler,
                                       busy_timer=self.timer)
        restore_fp32_masters(cfg, self.module, self.global_slices())  # bf16: masters from the import
        self.stage = self.engine.stage_id
        self.num_stages = self.engine.num_stages
        self.dp_rank = self.engine.grid.data_parallel_id

    def train_step(self, micro: list[Microbatch]) -> StepResult:
        loss = self.engine.train_batch(data_iter=iter(micro))
        if self.cfg.train.record_passes:
            self._record_passes()
        norm = self.engine.get_global_grad_norm()
        return StepResult(loss=float(loss), grad_norm=None if norm is None else float(norm))

    def eval_step(self, micro: list[Microbatch]) -> float:
        """The mean token loss of one batch through the training schedule, its gradients discarded
        (discard_gradients): exact in every layout, and no state a training step reads changes."""
        with discarding_step(self.engine):
            loss = self.engine.train_batch(data_iter=iter(micro))
        return float(loss)

    def _record_passes(self) -> None:
        """Append this step's executed pass order to run_dir/passes/stage<s>_dp<d>.txt, one line per
        step, in the plan's action names (the test holds it to `vptrain plan`'s schedule.txt)."""
        out = os.path.join(self.cfg.run_dir, "passes")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"stage{self.stage}_dp{self.dp_rank}.txt"), "a") as f:
            f.write(" ".join(self.engine.executed) + "\n")

    def current_lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def memory_bytes(self) -> dict[str, int]:
        params = list(self.module.parameters())
        opt = self.engine.optimizer
        inner = getattr(opt, "optimizer", opt)
        out = {
            "params": tensor_bytes(params),
            "grads": gradient_bytes(params),
            "optimizer": optimizer_state_bytes(inner),
        }
        if self.cfg.precision == "bf16":
            # BF16_Optimizer keeps fp32 master weights and fp32 gradient buffers of its own.
            out["master"] = tensor_bytes(itertools.chain.from_iterable(getattr(opt, "fp32_groups_flat_partition", [])))
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def global_slices(self) -> dict[str, GlobalSlice]:
        # Layers are registered under their global index, so names match the single-process model.
        return global_slices(self.module, num_layers=self.cfg.model.num_layers,
                             vocab_rows=self.resolved.layout.vocab.rows)

    def named_parameters_global(self) -> dict[str, torch.Tensor]:
        return named_parameters_global(self.module, self.global_slices())

    def checkpoint_state(self) -> dict:
        # Our own format: DeepSpeed's save_checkpoint skips modules outside the layer list
        # (vocabulary shards), and every rank's state is one file here.
        return {
            "module": self.module.state_dict(),
            "optimizer": self.engine.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "global_steps": self.engine.global_steps,
            "global_samples": self.engine.global_samples,
        }

    def load_checkpoint_state(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        opt = self.engine.optimizer
        if isinstance(opt, torch.optim.Optimizer):
            opt.load_state_dict(state["optimizer"])
        else:
            # BF16_Optimizer / ZeRO take one state per data-parallel rank and restore the fp32
            # master weights from it.
            dp = self.cfg.layout.dp
            per_rank = [state["optimizer"]] * dp
            opt.load_state_dict(per_rank, load_from_fp32_weights=True)
        self.scheduler.load_state_dict(state["scheduler"])
        self.engine.global_steps = state["global_steps"]
        self.engine.global_samples = state["global_samples"]

    def take_busy_seconds(self) -> float:
        return self.timer.take()

    def take_instruction_seconds(self) -> dict[str, float]:
        """Host seconds per instruction kind since the last call (engine/step_clock.py)."""
        return self.engine.step_clock.take()

    def barrier(self) -> None:
        dist.barrier()
