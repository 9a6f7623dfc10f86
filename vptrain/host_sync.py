"""Fail on the operations that make the host wait for the device (DESIGN.md invariant 6).

On a GPU the host queues kernels and runs ahead. An operation that needs a tensor's value on the
host stops it until the queue has drained: reading a value (.item(), int(), float(), bool(),
`if tensor:`, .tolist(), .numpy(), .cpu()), and every op whose output size depends on the data
(nonzero, masked_select, unique, boolean-mask indexing, repeat_interleave without output_size,
bincount, histc). A tensor made from host data (torch.tensor(...)) is a synchronous host-to-device
copy. Inside a microbatch pass any of these serialises the pipeline.

`torch.cuda.set_sync_debug_mode("error")` catches them on a GPU only. `forbid_host_sync()` catches
them at the dispatcher (and, for the methods that never reach it on CPU, at the torch-function
level) on any device, so the CPU tests hold the invariant. Both modes are thread-local: enter it in
the thread that runs the pass.

Deliberately allowed: masked_scatter (CUDA sizes it with a device-side prefix sum and an
asynchronous size check), torch._assert_async (checked on the device), the three-argument
torch.where, masked_fill, index_add/scatter_add with integer indices, collectives (c10d ops).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

SYNCING_OPS = {
    aten._local_scalar_dense: "reads a tensor's value on the host (.item(), int(), float(), bool(), `if t:`)",
    aten.nonzero: "has a data-dependent output size (use a mask with torch.where / scatter instead)",
    aten.masked_select: "has a data-dependent output size",
    aten._unique: "has a data-dependent output size",
    aten._unique2: "has a data-dependent output size",
    aten.unique_dim: "has a data-dependent output size",
    aten.unique_consecutive: "has a data-dependent output size",
    aten.unique_dim_consecutive: "has a data-dependent output size",
    aten.bincount: "sizes its output from the data's maximum",
    aten.histc: "reads the data's range on the host when min == max",
    aten.equal: "returns a Python bool",
    aten.allclose: "returns a Python bool",
    aten.is_nonzero: "returns a Python bool",
    aten.lift_fresh: "makes a tensor from host data (on a GPU, a synchronous host-to-device copy)",
}
BOOL_INDEXED = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
HOST_METHODS = {
    torch.Tensor.tolist: "copies the tensor to host memory",
    torch.Tensor.numpy: "copies the tensor to host memory",
    torch.Tensor.cpu: "copies the tensor to host memory",
}


class HostSyncError(RuntimeError):
    """An operation that synchronises the host with the device ran where none may."""


def _bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices or ())


class _SyncingOpGuard(TorchDispatchMode):
    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        why = SYNCING_OPS.get(packet)
        if why is None and packet in BOOL_INDEXED and _bool_index(args):
            why = "indexes with a boolean mask (a data-dependent size)"
        if why is None and packet is aten.repeat_interleave and kwargs.get("output_size") is None:
            why = "sizes its output from the data unless given output_size"
        if why is not None:
            raise HostSyncError(f"{func} {why}: it makes the host wait for the device, in {self.where}")
        return func(*args, **kwargs)


class _HostMethodGuard(TorchFunctionMode):
    """Tensor methods that read data to the host without a dispatcher op on a CPU tensor."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def __torch_function__(self, func, types, args=(), kwargs=None):
        why = HOST_METHODS.get(func)
        if why is not None:
            raise HostSyncError(f"Tensor.{func.__name__} {why}: it makes the host wait for the device, in {self.where}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def forbid_host_sync(where: str = "a pass") -> Iterator[None]:
    """Raise HostSyncError from any host-synchronising operation run in this thread meanwhile."""
    with _HostMethodGuard(where), _SyncingOpGuard(where):
        yield
