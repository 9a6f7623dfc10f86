"""Interleaved 1F1B on DeepSpeed's DualPipeV machinery: v model chunks per rank in a loop (rank r
holds stages r, r+p, ..., r+(v-1)p), so a microbatch crosses the ranks v times; the hand-off from
one chunk to the next goes from rank p-1 to rank 0, and the loss is on rank p-1's last chunk.

DualPipeV's engine already runs several chunks per rank ("phases") with per-(microbatch, chunk)
buffer slots and batched p2p to any peer; what differs is where each chunk's neighbours are (the
next rank round the loop, never a turn-around on the same rank), which chunk is the last stage, and
that a loop needs only m a multiple of p microbatches (DualPipeV asks for 2p). The handlers are
V-Half's (vhalf_engine.py): they ask the placement through these overrides, never by rank number.
Interleaved runs the backward whole (kinds.py), as Megatron's does."""

from __future__ import annotations

from deepspeed.runtime.pipe import dualpipev
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.pipe.module import PipelineModule

from vptrain.engine.lowering import LoweredSchedule
from vptrain.engine.vhalf_engine import VHalfEngine


class StagedLoopModule(dualpipev.DualPipeVModule):
    """A PipelineModule cut into chunks * p stages given by `parts`; rank r builds stages r + c*p."""

    def __init__(self, layers, *, parts: list[int], chunks: int, **kwargs):
        self._explicit_parts, self.chunks = parts, chunks
        super().__init__(layers=layers, partition_method="uniform", **kwargs)

    def _partition_layers(self, method="uniform"):
        ranks = self.num_stages
        self.num_stages *= self.chunks
        rank = self._topo.get_coord(self.global_rank).pipe
        self.parts = list(self._explicit_parts)
        stages = [rank + c * ranks for c in range(self.chunks)]
        self.phase_bounds = [(self.parts[s], self.parts[s + 1]) for s in stages]
        self._set_bounds(*self.phase_bounds[0])

    def stage_owner(self, layer_idx):
        return PipelineModule.stage_owner(self, layer_idx) % (self.num_stages // self.chunks)

    # DualPipeVModule walks phases (0, 1); a loop has `chunks` of them.
    def _build(self):
        self.phase_funcs, self.phase_checkpointable = [], [[] for _ in self.phase_bounds]
        for start, stop in self.phase_bounds:
            self._set_bounds(start, stop)
            PipelineModule._build(self)
            self.phase_funcs.append(self.forward_funcs)
            self.forward_funcs = []
        self.activate_phase(0)

    def _each_chunk(self, method, *args, **kwargs):
        for chunk in range(self.chunks):
            self.activate_phase(chunk)
            method(self, *args, **kwargs)
        self.activate_phase(0)

    def _precompute_checkpointable_values(self):
        for chunk in range(self.chunks):
            self.activate_phase(chunk)
            self.is_checkpointable_results_interval = None  # the parent's cache is per chunk
            PipelineModule._precompute_checkpointable_values(self)
            self.phase_checkpointable[chunk] = self.is_checkpointable_results
        self.activate_phase(0)

    def save_state_dict(self, *args, **kwargs):
        self._each_chunk(PipelineModule.save_state_dict, *args, **kwargs)

    def load_state_dir(self, *args, **kwargs):
        self._each_chunk(PipelineModule.load_state_dir, *args, **kwargs)

    def compile(self, *args, **kwargs):
        self._each_chunk(PipelineModule.compile, *args, **kwargs)


class InterleavedEngine(VHalfEngine):
    def __init__(self, *args, plan, busy_timer, **kwargs):
        self._init_vocab_state(plan, busy_timer)
        # DualPipeVEngine.__init__ without its check of m >= 2p (a V's need; a loop needs m % p == 0,
        # which validate.py checks): the parent's init, then the state DualPipeV keeps per chunk.
        self._active_phase = dualpipev._INIT
        PipelineEngine.__init__(self, *args, **kwargs)
        assert isinstance(self.module, StagedLoopModule), "the interleaved engine runs a StagedLoopModule"
        assert not (self.is_pipe_partitioned or self.is_grad_partitioned or self.dynamic_shape)
        self._active_phase = None
        self._p2p_ops = []
        self.pipe_buffers["grads"] = []
        self.pipe_buffers["losses"] = []
        self.reset_activation_shape()

    @property
    def chunks(self) -> int:
        return self.module.chunks

    def reset_activation_shape(self):
        super().reset_activation_shape()
        self._first_send = [True] * self.chunks
        self._recv_specs = [None] * self.chunks

    def _train_schedule(self):
        return LoweredSchedule(self.plan.actions, micro_batches=self.micro_batches, stages=self.num_stages,
                               stage_id=self.stage_id, chunks=self.chunks)

    def is_last_stage(self):
        if self._as_middle or self._active_phase is dualpipev._INIT:
            return super().is_last_stage()
        # Outside a chunk (the loss's aggregation after the step) rank p-1 is the loss rank.
        return self.stage_id == self.num_stages - 1 and self._active_phase in (None, self.chunks - 1)

    def _is_loss_stage(self, phase):
        return self.stage_id == self.num_stages - 1 and phase == self.chunks - 1

    def _is_last_rank(self):
        """DualPipeV asks this for its turn-around on rank p-1 (chunk 0 feeding chunk 1 locally); a
        loop has none: rank p-1 sends chunk c's output to rank 0's chunk c+1."""
        return False

    def _downstream_stage(self, phase):
        return (self.stage_id + 1) % self.num_stages

    def _upstream_stage(self, phase):
        return (self.stage_id - 1) % self.num_stages

    def _loss_stage_global_rank(self):
        return self.grid.stage_to_global(self.num_stages - 1)
