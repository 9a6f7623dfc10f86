"""What `vptrain plan --search` knows about a candidate before simulating it: an estimate of its
iteration time and peak memory from the cost model alone, and the data-parallel gradient sync that
the pipeline simulation does not include.

The estimate orders the candidates so that only the promising ones are simulated (make_plan):
  1F1B    (m - 1) * max_r c_r + sum_r c_r + 2(p - 1) * p2p      c_r: rank r's compute per microbatch
          (exact for 1F1B with unequal stages and free transfers; the vocabulary methods' extra
          barriers and the schedule's own stalls are what the simulation adds)
  V-Half  the same (its smaller fill is offset by its extra stage hand-offs: the estimate ran within
          7 % of the simulation on the paper's 8-GPU model, 1F1B within 1.5 %)
  interlaced  + every microbatch's synchronous collectives, which stop the whole pipeline
Memory: parameters, gradients and optimizer state per rank (exact), plus activations for the in-flight
microbatches the builders keep (schedule/builders.py: p - r, + 1 for vocab-2, + 2 for vocab-1 and
naive, 1.5p - r interlaced; V-Half about 0.7 p stages' worth), plus the baseline's fp32 logits on the
loss stage or one shard's softmax per in-flight vocabulary microbatch.
"""

from __future__ import annotations

from dataclasses import dataclass

from vptrain.config import RunConfig, microbatches
from vptrain.layout import model_shape, rank_layouts, stage_map
from vptrain.schedule import PassKind
from vptrain.schedule.costs import activation_bytes, device_profile, parameter_count, pass_costs, state_bytes
from vptrain.schedule.kinds import schedule_kind

K = PassKind
SYNCHRONOUS = (K.X_BCAST, K.MAX, K.SUM, K.G_BCAST, K.DX_REDUCE, K.EMB_REDUCE, K.DEMB_BCAST)
EXTRA_IN_FLIGHT = {"vocab-2": 1, "vocab-1": 2, "vocab-naive": 2}
INTER_NODE_BYTES_PER_S = 25e9
"""Per-GPU inter-node bandwidth for the gradient all-reduce when the device profile gives none
(one 200 Gb/s HDR InfiniBand port per GPU)."""
INTER_NODE_LATENCY_S = 5e-6


@dataclass(frozen=True)
class Estimate:
    pipeline_seconds: float
    busy_seconds: tuple[float, ...]
    """Compute per rank per step (m microbatches): exact, from the cost model."""
    peak_memory_bytes: float
    static_memory_bytes: float
    """Parameters, gradients and optimizer state of the fullest rank (a lower bound on its peak)."""
    grad_bytes: float
    """Gradient bytes of the fullest rank: what its data-parallel all-reduce moves."""

    @property
    def imbalance(self) -> float:
        mean = sum(self.busy_seconds) / len(self.busy_seconds)
        return max(self.busy_seconds) / mean if mean > 0 else 1.0


def estimate(cfg: RunConfig) -> Estimate:
    method, p, m = cfg.method.name, cfg.layout.pp, microbatches(cfg)
    shape, ranks, stages = model_shape(cfg), rank_layouts(cfg), stage_map(cfg)
    device = device_profile(cfg.cluster.profile)
    kind = schedule_kind(cfg.schedule.name)
    costs = pass_costs(
        shape, method=method, p=p, chunk_layers=[r.layers for r in ranks], loss_place=stages.loss_place,
        precision=cfg.precision, device=device, store_softmax=cfg.vocab.store_softmax, split=kind.split_backward,
    )
    per_mb = [sum(table.values()) for table in costs.compute]
    pipeline = (m - 1) * max(per_mb) + sum(per_mb) + 2 * (p - 1) * costs.p2p
    if method == "interlaced":
        pipeline += m * sum(costs.collective.get(k, 0.0) for k in SYNCHRONOUS)
    peak, static, grads = 0.0, 0.0, 0.0
    for r, lay in enumerate(ranks):
        params = parameter_count(
            shape, layers=lay.num_layers, embedding_rows=lay.embedding_rows[1] - lay.embedding_rows[0],
            output_rows=lay.output_rows[1] - lay.output_rows[0], positions=lay.position_embedding,
            final_norm=lay.final_norm,
        )
        state = sum(state_bytes(params, precision=cfg.precision, optimizer=cfg.optim.name,
                                zero_stage=cfg.optim.zero_stage, dp=cfg.layout.dp).values())
        rows = lay.output_rows[1] - lay.output_rows[0]
        if kind.placement == "v":  # V-Half: about 0.7 p chunks-worth with B whole, half of p with B / W
            share = 0.5 if kind.split_backward else 0.7
            in_flight = min(m, round(share * p) + EXTRA_IN_FLIGHT.get(method, 0))
            act = in_flight * sum(activation_bytes(shape, n) for n in lay.layers)
        else:
            total = 3 * p // 2 - r if method == "interlaced" else p - r + EXTRA_IN_FLIGHT.get(method, 0)
            in_flight = min(m, total)
            act = in_flight * activation_bytes(shape, lay.num_layers)
        # fp32 logits of the loss microbatch (baseline), or one shard's softmax per vocabulary microbatch held.
        logits = shape.tokens * rows * 4.0 * (1 + EXTRA_IN_FLIGHT.get(method, 0))
        static, grads = max(static, state), max(grads, params * 4.0)
        peak = max(peak, state + act + logits)
    return Estimate(pipeline, tuple(m * c for c in per_mb), peak, static, grads)


def dp_sync_seconds(cfg: RunConfig, grad_bytes: float) -> float:
    """Ring all-reduce of the fullest rank's gradients over the dp replicas, after the pipeline
    drains (DeepSpeed's pipeline engine reduces gradients once per step, not overlapped).

    A data-parallel group holds ranks pp apart (rank = dp_index * pp + pp_index): it stays inside a
    node when pp * dp <= cluster.gpus_per_node, else its ring crosses nodes."""
    dp = cfg.layout.dp
    if dp <= 1:
        return 0.0
    device = device_profile(cfg.cluster.profile)
    per_node = cfg.cluster.gpus_per_node
    in_node = per_node > 0 and cfg.layout.pp * dp <= per_node
    # The profile's inter-node tier (costs.DeviceProfile.inter_*) where it has one, else HDR.
    if in_node:
        bandwidth, latency = device.link_bytes_per_s, device.link_latency_s
    else:
        bandwidth = getattr(device, "inter_bytes_per_s", 0.0) or INTER_NODE_BYTES_PER_S
        latency = getattr(device, "inter_latency_s", 0.0) or INTER_NODE_LATENCY_S
    return 2.0 * (dp - 1) * latency + 2.0 * (dp - 1) / dp * grad_bytes / bandwidth
