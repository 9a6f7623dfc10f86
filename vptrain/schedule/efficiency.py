"""How close to peak a pass runs, from the shape of its GEMMs (GPU profiles).

A flat fraction of peak cannot be right for both a 4-layer h=3072 chunk and a 2-layer h=5120 one,
nor for an output-layer shard of 32000 rows and one of 4000: a GEMM pays a roughly fixed cost
(launch, tile tail, prologue) on top of its FLOPs, so its efficiency saturates with its work W:

    efficiency(W) = ceiling * W / (W + half_work)          (time = (W + half_work) / (ceiling * peak))

W is the FLOPs of one kernel of the pass: a transformer layer runs 5 kernels forward (QKV, attention,
projection, two MLP GEMMs) and 10 backward, so W = layer FLOPs / 15 whatever the direction; an
output-layer shard of R rows runs GEMMs of W = 2 * N * h * R (S one, T two), and its fp32 softmax
makes it a different kernel class with its own curve. The input layer is a lookup of negligible
FLOPs (3Nh against a layer's Nh(72h + 12s)); it is charged at the layer rate.

The constants (A100, bf16) come from the VP repository's artifact and the paper (benchmarks/calibrate.py
re-fits and tabulates them; docs/BENCHMARKS.md, "Cost-model calibration"):
  * output-layer shards: the artifact's per-pass throughput of S + T (`artifact/exp_one_host.csv`,
    8 GPUs, h=3072): 104 / 121 / 132-139 / 144-152 TFLOP/s at W = 1.0 / 2.0 / 2.0-4.0 / 4.0e11
    FLOPs, i.e. 33 % rising to 46 % of 312 TFLOP/s;
  * transformer layers: the end-to-end MFU of vocab-1 (balanced stages, so MFU over the simulated
    1 - bubble is the pass efficiency) at 8 / 16 / 32 GPUs (h = 3072 / 4096 / 5120, s = 2048): about
    0.565 / 0.60 / 0.62 of peak at W = 1.03 / 1.79 / 2.75e11 (the paper's and the artifact's 8-GPU runs
    differ by 2.3 MFU points; the fit sits between them), which gave ceiling 0.66 and half_work
    1.7e10. vocab-1 overlaps its collectives with these passes, so that fit measured contended passes;
    the curve here is the uncontended one, and costs.pass_costs adds the overlap cost below to the
    overlapped methods' F and B. `benchmarks/calibrate.py --fit` on the same points gives 0.676 /
    2.07e10 without the overlap cost and 0.713 / 2.33e10 with it; the curve is the earlier one scaled
    by that ratio (0.696, 1.92e10), so it keeps the earlier compromise between the two sources.
    The artifact's per-pass CUDA-event rates at h = 3072 (~62 %) are higher: they omit the p2p and
    launch gaps between passes that the iteration time includes.
  * overlap cost: in the same artifact runs (benchmarks/data/vp_artifact_pass_times.csv, per-stage
    F and B times), vocab-1's and vocab-2's transformer F + B take 3.2 % longer than interlaced's on
    the same stages, layers and shapes (2.6-3.7 % over the 16 runs, V = 32k-256k, s = 2k/4k, both
    algorithms; independent of V, a little smaller at s = 4k, where the passes grow faster than the
    collectives). The overlapped methods run their vocabulary collectives on a side stream during F
    and B (vp_algorithms §2.3, §4.3: the NCCL kernels take SMs and memory bandwidth from the
    concurrent GEMMs); interlaced runs its collectives blocking, between passes (§2.7, §5), so its
    passes run alone. Per byte a rank moves in the overlapped collectives per microbatch
    (costs.overlapped_collective_bytes) that is 1.87e-11 s (1.6-2.2e-11 over the runs), as if the
    GEMMs stopped while the bytes crossed a 53 GB/s link. Charged per byte, not as a fraction of the
    pass, it shrinks where a stage holds more layers per collective (pp = 2) and does not grow when
    the collectives cross a slower inter-node tier (no published per-pass time covers that: an
    assumption). benchmarks/calibrate.py --fit re-derives it.
H100: no published VP measurement; the A100 curves with half_work scaled by the peak ratio (the
same fixed time per kernel) and the A100's overlap cost per byte, which are assumptions, not fits.
Profiles without a curve (cpu) keep their flat DeviceProfile.efficiency.
"""

from __future__ import annotations

from dataclasses import dataclass

from vptrain.schedule.ir import PassKind

K = PassKind
KERNELS_PER_LAYER = 15
"""Kernels of one transformer layer, forward (5) and backward (10): W = layer FLOPs / 15."""


@dataclass(frozen=True)
class SaturatingEfficiency:
    """ceiling * W / (W + half_work): monotone in W, 0 at W = 0, below `ceiling` always."""

    ceiling: float
    half_work: float
    """FLOPs of one kernel at which it reaches half the ceiling."""

    def __call__(self, kernel_flops: float) -> float:
        w = max(0.0, kernel_flops)
        return self.ceiling * w / (w + self.half_work)


@dataclass(frozen=True)
class GemmEfficiency:
    """One device's curves: transformer-layer kernels and output-layer (vocabulary) kernels."""

    layer: SaturatingEfficiency
    vocab: SaturatingEfficiency


A100_OVERLAP_S_PER_BYTE = 1.87e-11
"""Seconds an overlapped method's F and B lose per byte of its side-stream vocabulary collectives (A100,
one node; the artifact's per-pass times, see the module docstring). DeviceProfile.overlap_s_per_byte."""

A100_BF16 = GemmEfficiency(
    layer=SaturatingEfficiency(ceiling=0.696, half_work=1.92e10),
    vocab=SaturatingEfficiency(ceiling=0.52, half_work=0.58e11),
)
H100_PEAK_RATIO = 989e12 / 312e12


def gemm_efficiency(device_name: str, precision: str = "bf16") -> GemmEfficiency | None:
    """The shape-dependent curves of a device profile, or None where the flat constant applies
    (the cpu profile, and fp32, which no published point measures)."""
    if precision != "bf16":
        return None
    if device_name == "a100":
        return A100_BF16
    if device_name == "h100":
        scale = H100_PEAK_RATIO
        return GemmEfficiency(
            layer=SaturatingEfficiency(A100_BF16.layer.ceiling, A100_BF16.layer.half_work * scale),
            vocab=SaturatingEfficiency(A100_BF16.vocab.ceiling, A100_BF16.vocab.half_work * scale),
        )
    return None


def pass_seconds(
    flops: list[dict[tuple[PassKind, int], float]],
    *,
    tokens: int,
    hidden: int,
    layer_flops: float,
    chunk_layers: list[tuple[int, ...]],
    output_rows: list[int],
    peak: float,
    flat_efficiency: float,
    curves: GemmEfficiency | None,
    layer_shares: dict[PassKind, tuple[float, int]] | None = None,
) -> tuple[dict[tuple[PassKind, int], float], ...]:
    """Seconds of every compute pass (without the per-pass launch overhead).

    `flops[rank]` is costs.pass_flops' table; `output_rows[rank]` the output-layer rows the rank's
    vocabulary work covers (its shard, the whole table on the baseline's loss stage, else 0). A
    pass's transformer-layer FLOPs (layers x layer_flops x 1/3 forward, 2/3 backward) run on the
    layer curve; the rest runs on the vocabulary curve where the rank holds output rows (S, T, the
    baseline's output layer), else at the layer rate (the input layer).

    `layer_shares[kind]` = (share of layer_flops, kernels per layer) where the backward is split
    (costs.layer_shares): each of F, B and W then runs at the rate of its own kernels' mean work
    (W's weight-gradient GEMMs are as large as the forward's; B's include the attention backward)."""
    if curves is None:
        rate = peak * flat_efficiency
        return tuple({key: f / rate for key, f in table.items()} for table in flops)
    layer_rate = peak * curves.layer(layer_flops / KERNELS_PER_LAYER)
    shares = layer_shares or {K.F: (1.0 / 3.0, 5), K.B: (2.0 / 3.0, 10)}
    kind_rate = {kind: (peak * curves.layer(share * layer_flops / kernels) if layer_shares else layer_rate)
                 for kind, (share, kernels) in shares.items()}
    out = []
    for rank, table in enumerate(flops):
        rows = output_rows[rank]
        vocab_rate = peak * curves.vocab(2.0 * tokens * hidden * rows) if rows > 0 else layer_rate
        seconds = {}
        for (kind, chunk), f in table.items():
            share = shares.get(kind, (0.0, 1))[0]
            layers = chunk_layers[rank][chunk] if chunk < len(chunk_layers[rank]) else 0
            in_layers = min(f, share * layers * layer_flops)
            rest_rate = layer_rate if kind in (K.IF, K.IB) else vocab_rate
            seconds[(kind, chunk)] = in_layers / kind_rate.get(kind, layer_rate) + (f - in_layers) / rest_rate
        out.append(seconds)
    return tuple(out)
