"""Trainer for every run driven by a vptrain schedule: the vocabulary-parallel methods (interlaced,
vocab-naive, vocab-1, vocab-2) on every schedule, and the plain methods (baseline, redis) on every
schedule but 1F1B (which DeepSpeed's own engine runs, engine/pipeline.py).

Under a vocabulary method the pipeline layer list holds only the position embedding (first stage),
the transformer blocks and the final norm (last stage); every rank also holds V/p rows of the input
embedding and of the output layer beside the layer list (one tensor when tied).
"""

from __future__ import annotations

import contextlib
import functools
import io
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from vptrain import vocab
from vptrain.config import VOCAB_METHODS, RunConfig
from vptrain.engine.common import BusyTimer, Microbatch, StepResult, gpt_shape
from vptrain.engine.deepspeed_setup import import_deepspeed
from vptrain.engine.param_names import GlobalSlice, global_slices, named_parameters_global
from vptrain.engine.pipeline import (
    PipelineTrainer,
    construct_engine,
    discarding_step,
    layer_boundaries,
    make_topology,
    plain_loss_fn,
)
from vptrain.engine.strict_order import OrderChecker, StrictComm
from vptrain.init_from import apply_init_from, restore_fp32_masters
from vptrain.model import layer_list, output_weight_rows, token_embedding_rows
from vptrain.optim import build_optimizer, build_scheduler
from vptrain.resolved import ResolvedPlan, resolve
from vptrain.schedule.kinds import schedule_kind
from vptrain.schedule.memory import release_points

ALGO_OF_METHOD = {"interlaced": "interlaced", "vocab-naive": "naive", "vocab-1": "alg1", "vocab-2": "alg2"}


@dataclass(frozen=True)
class VocabStagePlan:
    """Everything an engine needs to run its rank's part of the schedule."""

    actions: tuple
    shard: vocab.VocabShard | None
    comm: vocab.Communicator | None
    algo: str | None  # None: the plain method (no vocabulary passes)
    loss_stage: int
    embed_stage: int
    act_shape: tuple[int, int, int]
    act_dtype: torch.dtype
    chunk_tokens: int
    store_softmax: bool
    num_microbatches: int
    loss_chunk: int = 0  # the chunk whose output feeds the output layer (1 on V-Half's rank 0)
    # position -> the reduces this rank only sends to, completed after that action (schedule/memory.py)
    releases: dict = field(default_factory=dict)
    order_check: OrderChecker | None = None  # train.strict_comm_order
    split_backward: bool = False  # B computes the input gradient only, W the weight gradients (zb-h1, vhalf)

    @property
    def tokens(self) -> int:
        return self.act_shape[0] * self.act_shape[1]

    def buffer(self, mb: int, chunk: int) -> int:
        """DeepSpeed buffer slot of (microbatch, chunk): chunk 1 uses the slots after the first m."""
        return mb + chunk * self.num_microbatches


def vocab_groups(cfg: RunConfig, timeout: timedelta) -> list:
    """One process group per pipeline (its pp ranks); every rank must create all of them."""
    pp, dp = cfg.layout.pp, cfg.layout.dp
    return [dist.new_group([d * pp + s for s in range(pp)], timeout=timeout) for d in range(dp)]


class VocabTrainer(PipelineTrainer):
    """Executes its rank's part of the resolved plan (vptrain/resolved.py): the stage layers, the
    vocabulary rows and the action list of `plan`, which `vptrain plan` prints for the same config."""

    def __init__(self, cfg: RunConfig, *, device: torch.device, plan: ResolvedPlan | None = None):
        ds = import_deepspeed(device.type)
        ds.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
        from deepspeed.pipe import LayerSpec

        self.cfg, self.device = cfg, device
        pp = cfg.layout.pp
        with_vocab = cfg.method.name in VOCAB_METHODS
        rank = dist.get_rank()
        self.resolved = plan = plan or resolve(cfg)
        coord = plan.layout.rank_map[rank]
        stage, dp_rank = coord.pp, coord.dp
        held = plan.rank(stage)
        shape = gpt_shape(cfg, vocab_rows=plan.layout.vocab.rows)
        groups = vocab_groups(cfg, timedelta(seconds=cfg.train.collective_timeout_s)) if with_vocab else None
        self.schedule = plan.schedule

        self.counts = list(plan.layout.stage_layers)  # chunks * p entries on V-Half and interleaved
        parts = layer_boundaries(self.counts, leading=1, trailing=1 if with_vocab else 2)
        specs = [LayerSpec(cls, *args) for cls, args in layer_list(shape, with_vocab=not with_vocab)]
        module_cls, engine_cls = self._classes(ds, plan.layout.stages)
        with contextlib.redirect_stdout(io.StringIO()):  # PipelineModule prints its topology on rank 0
            self.module = module_cls(specs, parts=parts, topology=make_topology(cfg),
                                     loss_fn=None if with_vocab else plain_loss_fn(cfg, plan))
        shard = None
        if with_vocab:
            start, end = held.output_rows  # this rank's rows of both tables
            shard = vocab.VocabShard(start, end, cfg.model.vocab_size)
            # Beside the layer list: in the optimizer, the data-parallel reduction and the norms,
            # but not in DeepSpeed's stage partitioning.
            self.module.vocab_input = torch.nn.Parameter(token_embedding_rows(shape, start, end).to(device))
            if cfg.model.tie_embeddings:
                self.module.vocab_output = self.module.vocab_input
            else:
                self.module.vocab_output = torch.nn.Parameter(output_weight_rows(shape, start, end).to(device))
        for p in self.module.parameters():
            p.model_parallel = True  # unique per stage: DeepSpeed's own norms (bf16 overflow check) count it once
            p.ds_pipe_replicated = False

        apply_init_from(cfg, self.module, global_slices(
            self.module, num_layers=cfg.model.num_layers, vocab_rows=plan.layout.vocab.rows,
            shard=None if shard is None else (shard.start, shard.end), position_at_root=with_vocab))
        self.optimizer = build_optimizer(self.module.parameters(), cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)
        self.timer = BusyTimer(device)
        comm = vocab.ProcessGroupComm(groups[dp_rank]) if with_vocab else None
        order_check = self._order_checker(plan, stage, dp_rank) if cfg.train.strict_comm_order else None
        if order_check is not None and comm is not None:
            comm = StrictComm(comm, order_check)
        self.plan = VocabStagePlan(
            actions=plan.actions(stage),
            shard=shard,
            comm=comm,
            algo=ALGO_OF_METHOD.get(cfg.method.name),
            loss_stage=plan.layout.stages.loss_place[0],
            embed_stage=plan.layout.stages.embed_place[0],
            act_shape=(cfg.train.micro_batch_size, cfg.model.seq_len, cfg.model.hidden_size),
            act_dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float32,
            chunk_tokens=plan.layout.chunk_tokens,  # the plan's choice when vocab.chunk_tokens is unset
            store_softmax=cfg.vocab.store_softmax,
            num_microbatches=plan.layout.num_microbatches,
            loss_chunk=plan.layout.stages.loss_place[1],
            releases=release_points(plan.schedule)[stage],
            order_check=order_check,
            split_backward=schedule_kind(cfg.schedule.name).split_backward,
        )
        self.engine = construct_engine(engine_cls, cfg, self.module, self.optimizer, self.scheduler,
                                       plan=self.plan, busy_timer=self.timer)
        restore_fp32_masters(cfg, self.module, self.global_slices())  # bf16: masters from the import
        self.stage, self.num_stages, self.dp_rank = stage, pp, dp_rank
        assert self.engine.stage_id == stage and self.engine.grid.data_parallel_id == dp_rank

    @staticmethod
    def _order_checker(plan: ResolvedPlan, stage: int, dp_rank: int) -> OrderChecker:
        pipeline = tuple(c.rank for c in plan.layout.rank_map if c.dp == dp_rank)
        return OrderChecker.for_default_group(
            rank=pipeline[stage], stage=stage, pipeline=pipeline, rules=plan.rules,
            timeout_s=plan.cfg.train.collective_timeout_s,
        )

    @staticmethod
    def _classes(ds, stages):
        """(module, engine) classes for the placement of `stages` (a StageMap; kinds.py: line, v or loop)."""
        if stages.placement == "v":
            from vptrain.engine.vhalf_engine import StagedDualPipeVModule, VHalfEngine

            return StagedDualPipeVModule, VHalfEngine
        if stages.placement == "loop":
            from vptrain.engine.interleaved_engine import InterleavedEngine, StagedLoopModule

            return functools.partial(StagedLoopModule, chunks=stages.chunks), InterleavedEngine
        from vptrain.engine.pipeline import build_engine_classes
        from vptrain.engine.vocab_engine import VocabPipelineEngine

        return build_engine_classes(ds)[0], VocabPipelineEngine

    def train_step(self, micro: list[Microbatch]) -> StepResult:
        loss = self.engine.run_step(micro)
        if self.cfg.train.record_passes:
            self._record_passes()
        norm = self.engine.get_global_grad_norm()
        return StepResult(loss=float(loss), grad_norm=None if norm is None else float(norm))

    def eval_step(self, micro: list[Microbatch]) -> float:
        """The mean token loss of one batch through this rank's schedule (every pass, collective and
        barrier as in training), the gradients discarded at the optimizer step."""
        with discarding_step(self.engine):
            loss = self.engine.run_step(micro)
        return float(loss)

    def global_slices(self) -> dict[str, GlobalSlice]:
        shard = self.plan.shard
        return global_slices(self.module, num_layers=self.cfg.model.num_layers,
                             vocab_rows=self.resolved.layout.vocab.rows,
                             shard=None if shard is None else (shard.start, shard.end),
                             position_at_root=self.plan.algo is not None)

    def named_parameters_global(self) -> dict[str, torch.Tensor]:
        """Transformer params under the single-process names; shards as `<table>[start:end]`."""
        return named_parameters_global(self.module, self.global_slices())
