"""Cost model: FLOPs and seconds per pass, bytes per stage, device profiles.

FLOPs (training = forward + backward, vp_algorithms §1.2, paper Table 4; N = b*s tokens):
  transformer layer  N*h*(72h + 12s)   forward 1/3, backward 2/3  (4h MLP, full attention)
  output layer       6*N*h*V           forward (logits) 2NhV, backward 4NhV
      sharded over p ranks:  vocab-1 / naive / interlaced (Algorithm 1)  S = 2NhV/p, T = 4NhV/p
                             vocab-2 (Algorithm 2, dX in S)              S = 4NhV/p, T = 2NhV/p
  loss (softmax + CE)  8*N*V elementwise FLOPs, half forward, half backward (negligible, counted)
  input layer        3*N*h             forward 1/3, backward 2/3; sharded: every rank writes a full
                                       N x h partial, so IF = N*h and IB = 2*N*h on every rank
Split backward (zb-h1, vhalf: kinds.schedule_kind(name).split_backward): B is the input gradient, W the
weight gradients; per layer and token (gpt) F = 24h^2 + 4hs, B = 24h^2 + 8hs (the attention's backward
has no weights, so all of it is in B), W = 24h^2 = 2 FLOPs per weight (llama: the same with its
weights, layer_split_flops). The baseline's output layer keeps its whole backward (dX and dW, 4NhV,
with the loss) in B, as the engine runs it; the input layer's backward is its table's gradient (W).
B + W is the unsplit B exactly.
Seconds = FLOPs / (peak * efficiency) + a fixed launch overhead per pass; the overlapped methods'
F and B run longer by overlap_s_per_byte per byte their side-stream collectives move.
Communication: a transfer or collective of B bytes costs latency + B / bandwidth (all-reduce: 2(p-1)/p
of the bytes), over the intra-node tier, or the inter-node one where the pipeline group crosses nodes
(network.py).

Bytes per rank:
  parameters   12h^2 + 13h per layer; vocabulary rows * h per table; positions s*h on stage 0
               (llama: 2h^2 + 2h*kv + 3h*I + 2h per layer, no positions; FLOPs from the same weights)
  gradients    4 bytes per parameter (fp32 accumulation, as DeepSpeed's bf16 optimizer keeps them)
  optimizer    AdamW: 2 fp32 moments (8 B) plus an fp32 master copy under bf16 (4 B); SGD: master only;
               divided by dp under ZeRO-1
  activations  per in-flight microbatch, what each layer keeps under model.activation_checkpointing
               (gpt none: 16*N*h) plus the chunk's output N*h; recompute adds its forward FLOPs to B
               and one layer's rebuilt activations transiently (activations.py)
  vocabulary   baseline loss stage: fp32 logits N*V*4 per in-flight microbatch; vocab methods: every
               buffer of every microbatch timed over the schedule (vocab_buffer_sizes, memory.py)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vptrain.schedule.activations import (  # noqa: F401 (activation_bytes, recompute_transient_bytes re-exported)
    activation_bytes,
    pipeline_copies_bytes,
    recompute_flops,
    recompute_transient_bytes,
    weight_grad_input_bytes,
)
from vptrain.schedule.efficiency import gemm_efficiency, pass_seconds
from vptrain.schedule.ir import PassKind
from vptrain.schedule.network import PATTERN_SHARE, pipeline_groups
from vptrain.schedule.planner import NominalCosts
from vptrain.schedule.profiles import DeviceProfile, device_profile  # noqa: F401 (re-exported: callers import them from here)
from vptrain.schedule.rules import method_rules
from vptrain.schedule.simulate import PassCosts
from vptrain.schedule.vocab_bytes import ALGORITHM_2, vocab_buffer_bytes, vocab_buffer_sizes  # noqa: F401 (re-exported)

K = PassKind
LOSS_FLOPS_PER_LOGIT = 8.0


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs to know about the model and the microbatch."""

    vocab: int
    """Real tokens (the loss and MFU count these)."""
    vocab_rows: int
    """Padded rows of each vocabulary table (what is computed)."""
    layers: int
    hidden: int
    seq: int
    micro_batch: int
    act_bytes: int
    """Bytes per activation element (2 under bf16, 4 under fp32)."""
    tied: bool = False
    arch: str = "gpt"
    """gpt: 12h^2 weights per layer (4h GELU MLP), learned positions. llama: GQA attention
    (2h^2 + 2h*kv_dim), a SwiGLU MLP of 3h*intermediate, no biases, no position table."""
    kv_dim: int = 0
    """llama: key/value width, kv heads * head size (0: hidden)."""
    intermediate: int = 0
    """llama: SwiGLU width."""
    recompute: str = "none"
    """model.activation_checkpointing: none | full | selective (activations.py)."""

    @property
    def tokens(self) -> int:
        return self.seq * self.micro_batch

    @property
    def layer_weights(self) -> int:
        """Weights of one transformer layer's matrix multiplications."""
        h = self.hidden
        if self.arch == "llama":
            return 2 * h * h + 2 * h * (self.kv_dim or h) + 3 * h * self.intermediate
        return 12 * h * h


def layer_flops(m: ModelShape) -> float:
    """One transformer layer, forward + backward, one microbatch."""
    if m.arch == "llama":  # 6 FLOPs per weight and token, attention scores as the GPT's
        return m.tokens * (6.0 * m.layer_weights + 12.0 * m.hidden * m.seq)
    return m.tokens * m.hidden * (72.0 * m.hidden + 12.0 * m.seq)


def output_flops(m: ModelShape, rows: int) -> float:
    """Output projection over `rows` vocabulary rows plus its share of the loss, fwd + bwd."""
    return 6.0 * m.tokens * m.hidden * rows + LOSS_FLOPS_PER_LOGIT * m.tokens * rows


def input_flops(m: ModelShape) -> float:
    return 3.0 * m.tokens * m.hidden


def layer_split_flops(m: ModelShape) -> tuple[float, float, float]:
    """(F, B input gradient, W weight gradients) of one transformer layer, one microbatch: W runs one
    GEMM per weight GEMM of the forward (2 FLOPs per weight and token); B the other input-gradient
    GEMM per weight and the whole attention backward. They add up to layer_flops."""
    total = layer_flops(m)
    forward, weight = total / 3.0, 2.0 * m.tokens * m.layer_weights
    return forward, total - forward - weight, weight


def vocab_layer_units(m: ModelShape) -> tuple[float, float]:
    """(input layer, output layer + loss) in transformer-layer units of compute."""
    unit = layer_flops(m)
    return input_flops(m) / unit, output_flops(m, m.vocab_rows) / unit


def model_flops(m: ModelShape) -> float:
    """Training FLOPs of one microbatch as MFU counts them (the artifact's formula: transformer
    layers and output layer over the real vocabulary; the input layer is not counted)."""
    return m.layers * layer_flops(m) + 6.0 * m.tokens * m.hidden * m.vocab


def pass_flops(
    m: ModelShape, *, method: str, p: int, chunk_layers: list[tuple[int, ...]], loss_place: tuple[int, int],
    split: bool = False,
) -> list[dict[tuple[PassKind, int], float]]:
    """FLOPs of each compute pass on each rank: {(kind, chunk): flops}; `split`: the backward is
    B (input gradient) + W (weight gradients), each chunk then has a (W, chunk) entry."""
    vocab_sharded = method not in ("baseline", "redis")
    unsplit = (layer_flops(m) / 3.0, 2.0 * layer_flops(m) / 3.0, 0.0)
    layer_f, layer_b, layer_w = layer_split_flops(m) if split else unsplit
    gemm = m.tokens * m.hidden * m.vocab_rows
    loss_half = LOSS_FLOPS_PER_LOGIT / 2 * m.tokens * m.vocab_rows
    out: list[dict[tuple[PassKind, int], float]] = []
    for rank, layers in enumerate(chunk_layers):
        table: dict[tuple[PassKind, int], float] = {}
        for chunk, n in enumerate(layers):
            fwd, bwd, wgt = n * layer_f, n * layer_b, n * layer_w
            if not vocab_sharded and (rank, chunk) == (0, 0):
                fwd += input_flops(m) / 3.0
                if split:
                    wgt += 2.0 * input_flops(m) / 3.0  # the table's gradient: a weight gradient
                else:
                    bwd += 2.0 * input_flops(m) / 3.0
            if not vocab_sharded and (rank, chunk) == loss_place:
                fwd += 2.0 * gemm + loss_half
                # Split or not, B forms dX and dW in one sweep over the logits (and adds dW at once:
                # engine/split_backward.engine_input_backward), so W has none of the output layer.
                bwd += 4.0 * gemm + loss_half
            table[(K.F, chunk)], table[(K.B, chunk)] = fwd, bwd
            if split:
                table[(K.W, chunk)] = wgt
        if vocab_sharded:
            rows = m.vocab_rows // p
            gemm = m.tokens * m.hidden * rows
            elementwise = LOSS_FLOPS_PER_LOGIT / 2 * m.tokens * rows
            s_gemm, t_gemm = (4.0, 2.0) if method in ALGORITHM_2 else (2.0, 4.0)
            table[(K.S, 0)] = s_gemm * gemm + elementwise
            table[(K.T, 0)] = t_gemm * gemm + elementwise
            table[(K.IF, 0)] = m.tokens * m.hidden
            table[(K.IB, 0)] = 2.0 * m.tokens * m.hidden
        out.append(table)
    return out


def collective_bytes(m: ModelShape, kind: PassKind) -> tuple[float, str]:
    """Payload of one vocabulary collective and its pattern (broadcast | allreduce | reduce)."""
    n, h, a = m.tokens, m.hidden, m.act_bytes
    table = {
        K.X_BCAST: (n * h * a, "broadcast"),  # the final hidden state
        K.MAX: (n * 4.0, "allreduce"),
        K.SUM: (2 * n * 4.0, "allreduce"),  # sum of exp and the target logit
        K.STATS: (3 * n * 4.0, "allreduce"),  # max, rescaled sum, target logit
        K.G_BCAST: (n * 4.0, "broadcast"),
        K.DXHAT: (n * h * 4.0, "reduce"),  # onto the loss rank
        K.DX_REDUCE: (n * h * 4.0, "reduce"),  # fp32 partial ∇X, onto the loss rank
        K.EMB_REDUCE: (n * h * a, "reduce"),
        K.DEMB_BCAST: (n * h * a, "broadcast"),
    }
    return table[kind]


def overlapped_collective_bytes(m: ModelShape, method: str, p: int) -> float:
    """Bytes each rank moves per microbatch in the vocabulary collectives it overlaps with F and B
    (a ring's share of each payload, as network.py charges them); 0 for interlaced, whose collectives
    block between passes, and for the methods without vocabulary collectives."""
    rules = method_rules(method)
    if not rules.vocab or rules.blocking or p < 2:
        return 0.0
    total = 0.0
    for kind in rules.collectives:
        size, pattern = collective_bytes(m, kind)
        total += size * PATTERN_SHARE[pattern] * ((p - 1) / p if pattern != "broadcast" else 1.0)
    return total


def collective_seconds(
    m: ModelShape, kind: PassKind, p: int, dev: DeviceProfile, groups: Sequence[Sequence[int]] | None = None
) -> float:
    """One vocabulary collective over the pipeline group(s) (global ranks in stage order; default
    the first p ranks): the inter-node tier bounds it once a group spans nodes (network.py)."""
    size, pattern = collective_bytes(m, kind)
    return dev.network.collective_seconds(groups or pipeline_groups(p), size, pattern)


def pass_costs(
    m: ModelShape,
    *,
    method: str,
    p: int,
    chunk_layers: list[tuple[int, ...]],
    loss_place: tuple[int, int],
    precision: str,
    device: DeviceProfile,
    store_softmax: bool = True,
    groups: Sequence[Sequence[int]] | None = None,
    split: bool = False,
) -> PassCosts:
    """Seconds per action for the simulator, with per-chunk activation bytes and the vocabulary
    buffers' sizes as memory weights. `split`: the schedule splits the backward into B and W
    (kinds.ScheduleKind.split_backward); then each chunk has W seconds and weight_grad_inputs."""
    flops = pass_flops(m, method=method, p=p, chunk_layers=chunk_layers, loss_place=loss_place, split=split)
    # GPU profiles: efficiency from each pass's GEMM shape (efficiency.py); cpu: the flat constant.
    sharded = method not in ("baseline", "redis")
    rows = [m.vocab_rows // p if sharded else (m.vocab_rows if r == loss_place[0] else 0) for r in range(p)]
    rates = dict(tokens=m.tokens, hidden=m.hidden, layer_flops=layer_flops(m), chunk_layers=chunk_layers,
                 output_rows=rows, peak=device.peak_flops[precision], flat_efficiency=device.efficiency,
                 curves=gemm_efficiency(device.name, precision), layer_shares=layer_shares(m, split))
    seconds = pass_seconds(flops, **rates)
    if m.recompute != "none":  # B first re-runs (part of) each layer's forward, at the layer GEMMs' rate
        redo = pass_seconds([{(K.F, c): n * recompute_flops(m) for c, n in enumerate(layers)}
                             for layers in chunk_layers], **{**rates, "layer_shares": None})
        seconds = tuple({(kind, c): t + (redo[r][(K.F, c)] if kind is K.B else 0.0) for (kind, c), t in table.items()}
                        for r, table in enumerate(seconds))
    # The overlapped methods' F and B share the device with their side-stream collectives: each rank's
    # F and B of one microbatch stretch, in proportion to their length, by the collectives' traffic.
    extra = device.overlap_s_per_byte * overlapped_collective_bytes(m, method, p)
    compute = []
    for table in seconds:
        busy = sum(t for (kind, _), t in table.items() if kind in (K.F, K.B, K.W))
        slow = 1.0 + (extra / busy if busy > 0 else 0.0)
        compute.append({(kind, c): t * (slow if kind in (K.F, K.B, K.W) else 1.0) + device.pass_overhead_s
                        for (kind, c), t in table.items()})
    # `groups`: global ranks of each pipeline group in stage order (rank map), for the network tiers.
    groups = groups or pipeline_groups(p)
    p2p = device.network.p2p_seconds(groups, m.tokens * m.hidden * m.act_bytes)
    collective = {k: collective_seconds(m, k, p, device, groups) for k in PassKind if k.is_collective}
    activation = tuple(tuple(activation_bytes(m, n) + pipeline_copies_bytes(
        m, hidden_input=sharded or (r, c) != (0, 0), loss_chunk=(r, c) == tuple(loss_place))
        for c, n in enumerate(layers)) for r, layers in enumerate(chunk_layers))
    # Under a split backward the engine keeps each microbatch-chunk's whole autograd graph (its saved
    # activations) until W, and B adds the output gradients W needs (activations.weight_grad_input_bytes).
    # The plain method's first chunk takes token ids: its B computes nothing and W runs the whole
    # backward from the chunk output's gradient, which is what it keeps.
    output_grad = float(m.tokens * m.hidden * m.act_bytes)
    kept = tuple(tuple(output_grad if not sharded and (r, c) == (0, 0) else weight_grad_input_bytes(m, n)
                       for c, n in enumerate(layers)) for r, layers in enumerate(chunk_layers)) if split else None
    vocab = None if method in ("baseline", "redis") else vocab_buffer_sizes(
        m, method=method, p=p, store_softmax=store_softmax)
    return PassCosts(compute=tuple(compute), p2p=p2p, collective=collective, activation=activation,
                     vocab_buffers=vocab, weight_grad_inputs=kept)


def layer_shares(m: ModelShape, split: bool) -> dict[PassKind, tuple[float, int]] | None:
    """Per compute kind, (share of layer_flops, kernels it runs per layer) for efficiency.pass_seconds;
    None: the unsplit default (F 1/3, B 2/3, 15 kernels a layer). Split: F runs the forward's weight
    GEMMs plus the attention (gpt 4 + 1, llama 7 + 1), W one weight-gradient GEMM per weight GEMM,
    B one input-gradient GEMM per weight GEMM plus the attention backward (2 kernels)."""
    if not split:
        return None
    gemms = 7 if m.arch == "llama" else 4
    total = layer_flops(m)
    f, b, w = layer_split_flops(m)
    return {K.F: (f / total, gemms + 1), K.B: (b / total, gemms + 2), K.W: (w / total, gemms)}


NOMINAL_QUANTUM = 1 / 64
"""Relative pass costs are rounded to multiples of this share of a forward, so that float noise
between machines (or a last-digit change in a profile) cannot move a vocabulary pass in the schedule."""


COMMUNICATION_QUANTUM = 1 / 1024
"""The same for transfers and collectives in the nominal timeline (nominal_costs)."""


HOLD_WINDOW = 0.25
"""Forwards a rank may idle for vocab-2's chain (vocab.OverlappedVocab.hold). Scanned 0..1 at the
paper's 8-GPU size and the small grid of tests/unit/test_schedule_bubble.py: 0.1-0.3 cut vocab-2's bubble
at V=32k from 13.5% to 7.4%; from 0.4 on the idle costs more than the stall it saves."""


def nominal_costs(costs: PassCosts) -> NominalCosts:
    """The relative costs the builders place passes with, from the cost model's seconds: each compute
    kind's mean over ranks (chunk 0), in units of the mean forward, quantised (NOMINAL_QUANTUM).
    `vptrain plan` and the trainer both build from this, so they run the same schedule."""

    def mean(kind: PassKind) -> float:
        return sum(rank.get((kind, 0), 0.0) for rank in costs.compute) / len(costs.compute)

    forward = mean(K.F)
    if forward <= 0:
        return NominalCosts()

    def relative(kind: PassKind) -> float:
        # At least one quantum: a pass of zero nominal length would end at its own start, and the
        # lowering would put the collective it feeds before it.
        return max(1, round(mean(kind) / forward / NOMINAL_QUANTUM)) * NOMINAL_QUANTUM

    def communication(seconds: float) -> float:
        # Finer: a transfer is often a few thousandths of a forward, four of them per microbatch.
        # May round to 0: a free transfer or collective is placed like the others, only earlier.
        return round(seconds / forward / COMMUNICATION_QUANTUM) * COMMUNICATION_QUANTUM

    collective = tuple((kind, communication(seconds)) for kind, seconds in costs.collective.items())
    # A split backward's W (present in every chunk's table then); b is then B's input-gradient part.
    w = relative(K.W) if any((K.W, 0) in rank for rank in costs.compute) else 0.0
    return NominalCosts(f=1.0, b=relative(K.B), w=w, s=relative(K.S), t=relative(K.T),
                        input_f=relative(K.IF), input_b=relative(K.IB), hold_window=HOLD_WINDOW,
                        p2p=communication(costs.p2p), collective=tuple(x for x in collective if x[1] > 0))


def parameter_count(
    m: ModelShape, *, layers: int, embedding_rows: int, output_rows: int, positions: bool, final_norm: bool
) -> int:
    """Parameters on one rank. A tied table (vocab methods only) is counted once."""
    h = m.hidden
    tables = embedding_rows + (0 if m.tied and embedding_rows == output_rows else output_rows)
    if m.arch == "llama":  # two RMSNorm weights per layer, no biases, no position table
        return layers * (m.layer_weights + 2 * h) + tables * h + (h if final_norm else 0)
    return layers * (12 * h * h + 13 * h) + tables * h + (m.seq * h if positions else 0) + (2 * h if final_norm else 0)


def state_bytes(params: int, *, precision: str, optimizer: str, zero_stage: int, dp: int) -> dict[str, float]:
    """Parameter, gradient and optimizer bytes for `params` parameters."""
    weight = 2.0 if precision == "bf16" else 4.0
    master = 4.0 if precision == "bf16" else 0.0
    moments = 8.0 if optimizer == "adamw" else 0.0
    shard = dp if zero_stage >= 1 else 1
    return {"params": params * weight, "grads": params * 4.0, "optimizer": params * (master + moments) / shard}


CHUNK_TRANSIENT_SHARE = 1 / 16
"""Share of a device's memory the output layer's per-chunk transients may take when vocab.chunk_tokens
is left unset: they live only while S, the naive sum phase or T runs, beside everything the plan holds."""
CHUNK_MULTIPLE = 128
"""An automatic chunk is a multiple of this many tokens (a GEMM tile multiple)."""


def default_chunk_tokens(m: ModelShape, *, p: int, act_bytes: int, memory_bytes: float) -> int:
    """The tokens per output-layer chunk when the user leaves vocab.chunk_tokens unset; 0: one chunk.

    A chunk of c tokens creates, at most, c x R fp32 logits (R = V/p rows: recomputed logits or the
    softmax's gradient D) and, where the weights are bf16, their c x R bf16 copy as a GEMM operand:
    c * R * (4 + (2 if bf16)) bytes. The chunk is the largest multiple of CHUNK_MULTIPLE tokens whose
    transients fit in CHUNK_TRANSIENT_SHARE of the device's memory (at least CHUNK_MULTIPLE), or the
    whole microbatch (0) when that fits.
    """
    rows = -(-m.vocab_rows // p)
    per_token = rows * (4 + (2 if act_bytes == 2 else 0))
    fit = int(memory_bytes * CHUNK_TRANSIENT_SHARE // per_token)
    if fit >= m.tokens:
        return 0
    return max(CHUNK_MULTIPLE, fit // CHUNK_MULTIPLE * CHUNK_MULTIPLE)
