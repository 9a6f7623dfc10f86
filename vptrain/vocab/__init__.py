"""Vocabulary-parallel input and output layers (Yeung et al., MLSys 2025), as pure functions.

Each rank owns a contiguous shard of the padded vocabulary (shard.py). The output layer is split
into an S pass, collective phases and a T pass with explicit per-microbatch state (output.py,
output_phases.py); the input layer into IF/IB plus a reduce and a broadcast (embedding.py).
Collectives go through an injectable Communicator (comm.py). reference.py is the same math shard by
shard in one process. Nothing here imports deepspeed or keeps global state.
"""

from vptrain.vocab.comm import Communicator, CountingComm, Done, Pending, ProcessGroupComm
from vptrain.vocab.embedding import embed_reduce, grad_broadcast, input_backward, input_forward
from vptrain.vocab.grads import accumulate_grad, apply_token_grad, token_grad
from vptrain.vocab.output import ALGOS, OutputState, output_s_pass, output_t_pass, per_token_loss
from vptrain.vocab.output_phases import (
    OutputStepResult,
    c1_phase,
    dx_phase,
    grad_input_phase,
    interlaced_step,
    naive_max_phase,
    naive_sum_phase,
    output_layer_step,
    stats_phase,
)
from vptrain.vocab.shard import IGNORE_INDEX, VocabShard, padded_vocab_rows, shard_range

__all__ = [
    "ALGOS",
    "IGNORE_INDEX",
    "Communicator",
    "CountingComm",
    "Done",
    "OutputState",
    "OutputStepResult",
    "Pending",
    "ProcessGroupComm",
    "VocabShard",
    "accumulate_grad",
    "apply_token_grad",
    "c1_phase",
    "dx_phase",
    "embed_reduce",
    "grad_broadcast",
    "grad_input_phase",
    "input_backward",
    "input_forward",
    "interlaced_step",
    "naive_max_phase",
    "naive_sum_phase",
    "output_layer_step",
    "output_s_pass",
    "output_t_pass",
    "padded_vocab_rows",
    "per_token_loss",
    "shard_range",
    "stats_phase",
    "token_grad",
]
