"""The activation meter (vptrain/engine/activation_meter.py) counts exactly what autograd saves."""

from __future__ import annotations

import torch

from vptrain.engine.activation_meter import HELD, ActivationMeter

B, D_IN, D_HID, D_OUT = 5, 4, 8, 3
F32 = 4


def _mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, D_HID), torch.nn.GELU(), torch.nn.Linear(D_HID, D_OUT))


def test_live_bytes_are_the_saved_tensors_and_none_after_backward() -> None:
    """Linear -> GELU -> Linear saves, besides its weights: the first Linear's input x, GELU's input
    (the first Linear's output) and the second Linear's input (GELU's output). Nothing else."""
    model = _mlp()
    x = torch.randn(B, D_IN, requires_grad=True)
    by_hand = F32 * B * (D_IN + D_HID + D_HID)
    with ActivationMeter(params=model.parameters()) as meter:
        out = model(x)
        assert meter.live_bytes == by_hand
        out.sum().backward()
    assert meter.live_bytes == 0
    report = meter.report()
    assert report.peak_bytes == by_hand and report.live_bytes == 0
    assert x.grad is not None and all(p.grad is not None for p in model.parameters())


def test_weights_are_not_activations() -> None:
    """Without `params` the weights autograd saves (two Linear weights) count too: the exclusion is real."""
    model = _mlp()
    x = torch.randn(B, D_IN, requires_grad=True)
    with ActivationMeter() as meter:
        model(x).sum().backward()
    weights = F32 * (D_IN * D_HID + D_HID * D_OUT)
    assert meter.report().peak_bytes == F32 * B * (D_IN + 2 * D_HID) + weights


def test_views_keep_their_whole_storage_once() -> None:
    """Three views of one (B, 3D) storage saved by three products keep that storage, counted once;
    a slice of a parameter is a weight."""
    table = torch.nn.Parameter(torch.randn(10, D_IN))
    x = torch.randn(B, 3 * D_IN, requires_grad=True)
    with ActivationMeter(params=[table]) as meter:
        qkv = x * 2.0
        q, k, v = qkv.split(D_IN, dim=1)
        y = (q * k) * v + table[:B] * q  # saves q, k, v, q*k (B, D) and table[:B] (a weight view)
        assert meter.live_bytes == F32 * B * (3 * D_IN + D_IN)
        y.sum().backward()
    assert meter.live_bytes == 0


def test_graph_dropped_without_backward_releases_its_bytes() -> None:
    model = _mlp()
    with ActivationMeter(params=model.parameters()) as meter:
        out = model(torch.randn(B, D_IN))
        assert meter.live_bytes > 0
        del out  # the graph goes with its output
    assert meter.live_bytes == 0


def test_peak_is_split_by_the_instruction_that_saved() -> None:
    """Two forwards then their backwards in 1F1B's drain order: the peak is both forwards' saves,
    reached in the second, and held buffers add to it under their own name."""
    model = _mlp()
    kept: list[torch.Tensor] = []
    meter = ActivationMeter(params=model.parameters(), held=lambda: kept)
    per_forward = F32 * B * (D_IN + 2 * D_HID)
    with meter:
        outs = []
        for name in ("F0", "F1"):
            meter.running(name)
            outs.append(model(torch.randn(B, D_IN)))
            kept.append(outs[-1])  # the pipeline holds each output until its backward
            meter.refresh_held()
        for out in outs:
            meter.running("B")
            out.sum().backward()
        kept.clear()
        meter.refresh_held()
    report = meter.report()
    assert report.peak_bytes == 2 * per_forward + 2 * F32 * B * D_OUT
    assert report.peak_by_owner == {"F0": per_forward, "F1": per_forward, HELD: 2 * F32 * B * D_OUT}
    assert report.live_bytes == 0


class _Forward:
    """Stands in for a DeepSpeed instruction class."""


class _FakeEngine:
    """The part of a DeepSpeed pipeline engine the meter touches: an instruction map whose handlers
    record their action and fill pipe_buffers, as the vocabulary engines' do."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.executed = model, []
        self.pipe_buffers = {"inputs": [None, None], "outputs": [None, None]}
        self._INSTRUCTION_MAP = {_Forward: _FakeEngine.forward}

    def forward(self, buffer_id: int) -> None:
        self.executed.append(f"F{buffer_id}")
        x = torch.randn(B, D_IN, requires_grad=True)  # the received input the engine keeps
        self.pipe_buffers["inputs"][buffer_id] = x
        self.pipe_buffers["outputs"][buffer_id] = self.model(x.clone())

    def run(self, buffer_id: int) -> None:
        self._INSTRUCTION_MAP[_Forward](self, buffer_id=buffer_id)


def test_instrumented_engine_names_the_actions_and_counts_its_buffers() -> None:
    """Saves are owned by the action the engine recorded; the held buffers (input and output, not
    saved by autograd) are re-read after each instruction and dropped with the engine's references."""
    from vptrain.engine.activation_meter import pipeline_buffers

    model = _mlp()
    engine = _FakeEngine(model)
    meter = ActivationMeter(params=model.parameters(), held=lambda: pipeline_buffers(engine))
    meter.instrument(engine)
    saved = F32 * B * (D_IN + 2 * D_HID)  # the clone of x (first Linear's input), as in the first test
    buffers = F32 * B * (D_IN + D_OUT)
    with meter:
        engine.run(0)
        engine.run(1)
        assert meter.live_bytes == 2 * (saved + buffers)
        for buffer_id in (0, 1):
            engine.pipe_buffers["outputs"][buffer_id].sum().backward()
            engine.pipe_buffers["inputs"][buffer_id] = engine.pipe_buffers["outputs"][buffer_id] = None
        meter.refresh_held()
    report = meter.report()
    assert report.peak_bytes == 2 * (saved + buffers)
    assert report.peak_at == "F1"
    assert report.peak_by_owner == {"F0": saved, "F1": saved, HELD: 2 * buffers}
    assert report.live_bytes == report.held_bytes == 0
