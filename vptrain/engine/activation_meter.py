"""Live activation bytes of one rank during a step, counted from what autograd keeps for backward.

No device memory statistics: a `saved_tensors_hooks` pack wraps every tensor autograd saves in a
small holder that adds the tensor's storage bytes to a running total; when autograd drops the saved
tensor (its node ran with retain_graph=False, or the graph was freed) the holder is collected and
subtracts them. The total and its peak are exact at every pack and release, not sampled.

What is counted, and why:
  * storages, not tensors: a view (q, k, v split from one qkv output, a transpose) keeps its whole
    base storage alive, and two saves of one storage keep it once (reference counted per storage);
  * not parameters, nor tensors sharing a parameter's storage (a slice of the position table, a
    Linear's weight): they are weights, counted as parameters;
  * tensors a pipeline engine holds for backward outside autograd (DeepSpeed's `pipe_buffers`: the
    received input it differentiates into and the chunk output it calls backward on), through the
    optional `held` callable, re-read after every instruction (those buffers change only there);
  * not what autograd Functions stash as ctx attributes (they bypass the hooks: the plain output
    layer's softmax state) nor the vocabulary engines' own buffers: tests/distributed/_memory_matrix.py
    measures those against the plan's vocabulary column.

`instrument(engine)` names the instruction running at each pack (the action the engine records,
e.g. F3 or B1.1), so the report says where the peak was reached and which passes' saves make it up.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

HELD = "held by the pipeline"
"""Owner name of the bytes the `held` callable reports."""


@dataclass
class _Owner:
    """The instruction that saved some bytes; renamed once the engine has recorded its action."""

    name: str


class _Saved:
    """What autograd stores instead of a saved tensor: the tensor, and a release when dropped.

    It holds a detached alias (same storage, so the bytes are the same): the tensor itself would
    reference its grad_fn, which holds this object, a cycle that outlives a graph kept with
    retain_graph=True (the split backward's B) after every other reference is gone."""

    __slots__ = ("key", "meter", "tensor")

    def __init__(self, meter: ActivationMeter, key: int, tensor: torch.Tensor) -> None:
        self.meter, self.key, self.tensor = meter, key, tensor

    def __del__(self) -> None:
        self.meter._release(self.key)


@dataclass
class MeterReport:
    peak_bytes: int
    """Most live bytes (saved + held) at any moment of the metered span."""
    peak_at: str
    """The instruction running when the peak was reached ("" outside any)."""
    peak_by_owner: dict[str, int]
    """The peak's bytes by the instruction that saved them (HELD: the pipeline's own buffers)."""
    live_bytes: int
    """Live bytes now (after a step: what its graphs and the pipeline still keep)."""
    held_bytes: int
    """Of live_bytes, the pipeline's buffers (0 from the graphs means every backward ran)."""


@dataclass
class ActivationMeter:
    """Use as a context manager around forward/backward (a trainer's train_step); see the module
    docstring. `params`: the weights to leave out; `held`: tensors kept outside autograd."""

    params: Iterable[torch.Tensor] = ()
    held: Callable[[], Iterable[torch.Tensor]] | None = None
    record: bool = False
    """Also list every counted storage as (owner, shape, dtype, bytes): what makes up the bytes."""
    saves: list[tuple[_Owner, tuple[int, ...], str, int]] = field(default_factory=list, init=False)
    _param_keys: set[int] = field(default_factory=set, init=False)
    _excluded: set[int] = field(default_factory=set, init=False)
    _count: dict[int, int] = field(default_factory=dict, init=False)  # storage -> live saves
    _size: dict[int, int] = field(default_factory=dict, init=False)
    _owner_of: dict[int, _Owner] = field(default_factory=dict, init=False)
    _by_owner: dict[int, tuple[_Owner, int]] = field(default_factory=dict, init=False)  # id(owner) -> bytes
    _saved: int = field(default=0, init=False)
    _held: int = field(default=0, init=False)
    _peak: int = field(default=0, init=False)
    _peak_at: _Owner = field(default_factory=lambda: _Owner(""), init=False)
    _peak_split: list[tuple[_Owner, int]] = field(default_factory=list, init=False)
    _current: _Owner = field(default_factory=lambda: _Owner(""), init=False)
    _hooks: object = field(default=None, init=False)

    def __enter__(self) -> ActivationMeter:
        self.params = list(self.params)
        self._param_keys = {_key(p) for p in self.params}
        self.reset()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None
        self._excluded = set()

    @property
    def live_bytes(self) -> int:
        return self._saved + self._held

    def exclude(self, tensors: Iterable[torch.Tensor]) -> None:
        """Leave these storages out too, like weights: e.g. the step's input batch (its labels are
        views of the loader's storage, which lives whether or not autograd saves them). Until the
        metered span ends: a storage freed later may see its key reused."""
        self._excluded |= {_key(t) for t in tensors}

    def reset(self) -> None:
        """Start a new peak from what is live now (e.g. at the start of each step)."""
        self._peak, self._peak_at = self.live_bytes, self._current
        self._peak_split = list(self._by_owner.values())
        self.saves.clear()

    def saved_kinds(self) -> dict[str, int]:
        """With record=True: bytes counted per (owner, shape, dtype), as "F0 (1, 16, 64) float32"."""
        out: dict[str, int] = {}
        for owner, shape, dtype, size in self.saves:
            key = f"{owner.name} {shape} {dtype}"
            out[key] = out.get(key, 0) + size
        return out

    def report(self) -> MeterReport:
        split: dict[str, int] = {}
        for owner, nbytes in self._peak_split:
            split[owner.name] = split.get(owner.name, 0) + nbytes
        return MeterReport(self._peak, self._peak_at.name, split, self.live_bytes, self._held)

    # ---- autograd's side ---------------------------------------------------------------------
    def _pack(self, tensor: torch.Tensor):
        try:
            key = _key(tensor)
        except (RuntimeError, NotImplementedError):  # no storage (e.g. a sparse or nested tensor)
            return tensor
        if key in self._param_keys or key in self._excluded:
            return tensor
        count = self._count.get(key, 0)
        self._count[key] = count + 1
        if count == 0:
            size = tensor.untyped_storage().nbytes()
            self._size[key] = size
            self._owner_of[key] = owner = self._current
            self._add(owner, size)
            if self.record:
                self.saves.append((owner, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), size))
        return _Saved(self, key, tensor.detach())

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Saved) else packed

    def _release(self, key: int) -> None:
        count = self._count[key] - 1
        if count:
            self._count[key] = count
            return
        del self._count[key]
        self._add(self._owner_of.pop(key), -self._size.pop(key))

    def _add(self, owner: _Owner, nbytes: int) -> None:
        held = self._by_owner.get(id(owner), (owner, 0))[1] + nbytes
        if held:
            self._by_owner[id(owner)] = (owner, held)
        else:
            self._by_owner.pop(id(owner), None)
        if owner.name == HELD:
            self._held += nbytes
        else:
            self._saved += nbytes
        if self.live_bytes > self._peak:
            self._peak, self._peak_at = self.live_bytes, self._current
            self._peak_split = list(self._by_owner.values())

    # ---- the engine's side -------------------------------------------------------------------
    def refresh_held(self) -> None:
        """Re-read the `held` tensors: bytes of their storages that no saved tensor already counts."""
        if self.held is None:
            return
        sizes = {}
        for t in self.held():
            key = _key(t)
            if key not in self._param_keys and key not in self._excluded and key not in self._count:
                sizes[key] = t.untyped_storage().nbytes()
        held_owner = self._held_owner()
        self._add(held_owner, sum(sizes.values()) - self._held)

    def _held_owner(self) -> _Owner:
        for owner, _ in self._by_owner.values():
            if owner.name == HELD:
                return owner
        return _Owner(HELD)

    def running(self, name: str) -> _Owner:
        """Name what runs from now on (the owner of the next saves); returns it, for renaming."""
        self._current = _Owner(name)
        return self._current

    def instrument(self, engine) -> None:
        """Wrap every handler of a DeepSpeed pipeline engine's (instance-level) instruction map, so
        each save is owned by the instruction that made it and `held` is re-read after each one.
        The name is the action the engine records (its `executed` list), else the instruction's."""
        handlers = dict(engine._INSTRUCTION_MAP)

        def wrap(cls: type, fn: Callable) -> Callable:
            @functools.wraps(fn)
            def metered(engine_self, *args, **kwargs):
                executed = getattr(engine_self, "executed", [])
                before = len(executed)
                owner = self.running(cls.__name__ + "".join(f" {k}={v}" for k, v in kwargs.items()))
                try:
                    return fn(engine_self, *args, **kwargs)
                finally:
                    if len(executed) > before:
                        owner.name = str(executed[before])
                    self.refresh_held()
                    self._current = _Owner("")

            return metered

        engine._INSTRUCTION_MAP = {cls: wrap(cls, fn) for cls, fn in handlers.items()}


def _key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


PIPE_BUFFERS = ("inputs", "outputs", "output_tensors")


def pipeline_buffers(engine) -> list[torch.Tensor]:
    """The floating-point tensors a DeepSpeed pipeline engine holds for its backwards: received
    inputs (it differentiates into them), chunk outputs (it calls backward on them)."""
    out: list[torch.Tensor] = []
    stack = [engine.pipe_buffers.get(k) for k in PIPE_BUFFERS]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point():
                out.append(obj)
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
    return out


def state_tensors(engine, names: tuple[str, ...]) -> list[torch.Tensor]:
    """The tensors of a vocabulary engine's per-microbatch state entries named `names` (e.g. what a
    split backward keeps from B for W, where it keeps it outside autograd)."""
    found = [v for (what, _), v in getattr(engine, "state", {}).items() if what in names]
    # A WeightWork keeps its tensors in its own structure (split_backward.py) and names them.
    found = [v.held_tensors() if hasattr(v, "held_tensors") else v for v in found]
    return [t for t in torch.utils._pytree.tree_leaves(found) if isinstance(t, torch.Tensor)]


def meter_for(trainer, *, record: bool = False, state: tuple[str, ...] = ("weight_work",)) -> ActivationMeter:
    """A meter of a pipeline trainer's rank: its parameters left out, its engine's buffers and the
    `state` entries named (by default what a split backward's B keeps for W) held, its instructions
    named. Enter it around `trainer.train_step`."""
    engine = trainer.engine

    def held() -> list[torch.Tensor]:
        return pipeline_buffers(engine) + (state_tensors(engine, state) if state else [])

    meter = ActivationMeter(params=list(engine.module.parameters()), held=held, record=record)
    meter.instrument(engine)
    return meter
