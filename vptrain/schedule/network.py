"""Two-tier network: what a transfer or a vocabulary collective costs, given which devices share a node.

Devices on one node talk over the intra-node tier (NVLink/NVSwitch), devices on different nodes over
the inter-node tier (InfiniBand, one NIC per GPU). A message of B bytes over a tier costs
latency + B / bandwidth. A collective over a pipeline group is a ring or tree over all its devices:
once the group spans nodes, some hop of it crosses the inter-node tier and every byte of the ring
passes that hop, so its bandwidth term is the slowest tier's; its latency is one intra-node hop per
level of the tree inside a node plus one inter-node hop per level across nodes.

Which devices share a node follows the rank map (vptrain/layout.py): node = global rank // devices
per node. Pipeline-fastest ranks (rank = dp_index * pp + stage) put a pipeline of pp <= devices per
node on one node, and spread a longer one over ceil(pp / devices per node) nodes.

The simulator has one p2p cost for every transfer (PassCosts.p2p), so a pipeline is charged its
slowest hop: in the steady state every rank keeps the pace of the slowest rank, which is the one
sending and receiving across a node boundary. (This over-charges the fill and drain, where each hop
is paid once.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PATTERN_SHARE = {"allreduce": 2.0, "reduce": 1.0, "broadcast": 1.0}
"""Bytes each device moves over its slowest hop per payload byte, times (p-1)/p for the reductions
(ring: a reduce-scatter for reduce, plus an all-gather for all-reduce); a broadcast pipelines the
whole payload through every hop."""


@dataclass(frozen=True)
class Tier:
    bytes_per_s: float
    latency_s: float

    def seconds(self, size: float) -> float:
        return self.latency_s + size / self.bytes_per_s


@dataclass(frozen=True)
class Network:
    intra: Tier
    inter: Tier
    devices_per_node: int
    """0: every device on one node."""

    def node(self, rank: int) -> int:
        return rank // self.devices_per_node if self.devices_per_node > 0 else 0

    def tier(self, a: int, b: int) -> Tier:
        return self.intra if self.node(a) == self.node(b) else self.inter

    def p2p_seconds(self, groups: Sequence[Sequence[int]], size: float) -> float:
        """One stage-to-stage transfer of `size` bytes over the slowest hop of any pipeline group
        (stage order); a one-stage pipeline has no hop and is charged the intra-node tier."""
        hops = [self.tier(a, b) for g in groups for a, b in zip(g, g[1:], strict=False)]
        return max((t.seconds(size) for t in hops), default=self.intra.seconds(size))

    def collective_seconds(self, groups: Sequence[Sequence[int]], size: float, pattern: str) -> float:
        """A collective of `size` payload bytes over each pipeline group at once; the slowest group."""
        return max(self._group_seconds(g, size, pattern) for g in groups)

    def _group_seconds(self, group: Sequence[int], size: float, pattern: str) -> float:
        p = len(group)
        per_node: dict[int, int] = {}
        for rank in group:
            per_node[self.node(rank)] = per_node.get(self.node(rank), 0) + 1
        inside, across = max(per_node.values()), len(per_node)
        latency = _levels(inside) * self.intra.latency_s + _levels(across) * self.inter.latency_s
        share = PATTERN_SHARE[pattern] * ((p - 1) / p if pattern != "broadcast" else 1.0)
        bandwidth = self.inter.bytes_per_s if across > 1 else self.intra.bytes_per_s
        return max(latency, self.intra.latency_s) + share * size / bandwidth


def _levels(n: int) -> int:
    """Levels of a binary tree over n devices (0 for one)."""
    return max(0, (n - 1).bit_length())


def pipeline_groups(p: int, dp: int = 1) -> list[list[int]]:
    """Global ranks of each pipeline group in stage order under the pipeline-fastest rank map
    (rank = dp_index * pp + stage, vptrain/layout.py)."""
    return [[d * p + s for s in range(p)] for d in range(dp)]
