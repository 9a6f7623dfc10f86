"""Where a vocabulary pass puts a shard's weight gradient, under each of DeepSpeed's optimizers.

T and IB produce the fp32 gradient of one parameter (a vocabulary shard) outside any autograd graph.

* BF16_Optimizer keeps a high-precision gradient per bf16 parameter (`fp32_groups_gradients[group]
  [index]`, a view into one flat buffer; fp32 with data_types.grad_accum_dtype=fp32, which DeepSpeed
  0.19 allows with ZeRO-1 only, else bf16) and only ever reads that one: reduction, norm, clip and
  step. The gradient is added straight into it and the parameter is marked as having one (the norm
  skips unmarked parameters). Going through autograd instead would first round the fp32 gradient to
  a bf16 .grad and need DeepSpeed's bracket around it (clear_lp_grads, backward, update_hp_grads),
  which walks every parameter of the stage twice per pass (docs/engine.md, the bf16 trap).
* fp32 without ZeRO, and ZeRO-1: through autograd (`vocab.accumulate_grad`), with the engine's
  backward flag set, so ZeRO's gradient hooks see it. A leaf's backward touches only that leaf.
"""

from __future__ import annotations

import torch

from vptrain import vocab


class Bf16GradSlots:
    """The gradient slot BF16_Optimizer holds for each of its bf16 parameters."""

    def __init__(self, optimizer) -> None:
        self._optimizer = optimizer
        self._slot = {
            id(param): (group, index)
            for group, params in enumerate(optimizer.bf16_groups)
            for index, param in enumerate(params)
        }

    def add(self, param: torch.nn.Parameter, grad: torch.Tensor) -> None:
        """hp_grad(param) += grad (fp32, param's shape), as DeepSpeed's _update_hp_grad adds a .grad."""
        try:
            group, index = self._slot[id(param)]
        except KeyError:
            raise ValueError("the parameter is not one of BF16_Optimizer's (not trainable?)") from None
        opt = self._optimizer
        hp_grad = opt.fp32_groups_gradients[group][index]
        hp_grad.add_(grad.to(hp_grad.dtype).view(hp_grad.shape))
        param._hp_grad = hp_grad  # what DeepSpeed's tied-weight reduction reads under bf16
        opt.fp32_groups_has_gradients[group][index] = True


def accumulate_through_autograd(engine, param: torch.nn.Parameter, grad: torch.Tensor) -> None:
    """param.grad += grad via a leaf backward, flagged as the engine's own so ZeRO's hooks accept it."""
    engine._running_engine_backward = True
    try:
        vocab.accumulate_grad(param, grad)
    finally:
        engine._running_engine_backward = False
