"""Device profiles for the cost model: peak FLOP/s per precision, the two network tiers, the
overlap cost of side-stream collectives (costs.py turns them into seconds per pass)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vptrain.schedule.efficiency import A100_OVERLAP_S_PER_BYTE
from vptrain.schedule.network import Network, Tier


@dataclass(frozen=True)
class DeviceProfile:
    """Peak dense FLOP/s per precision and the fraction a well-tuned transformer reaches."""

    name: str
    peak_flops: dict[str, float]
    efficiency: float
    link_bytes_per_s: float
    """Intra-node tier (NVLink): effective bytes/s of one device's transfers."""
    link_latency_s: float
    pass_overhead_s: float
    devices_per_node: int = 0
    """0: a single node holds every device."""
    inter_bytes_per_s: float = 0.0
    """Inter-node tier (InfiniBand, one NIC per device): effective bytes/s per device."""
    inter_latency_s: float = 0.0
    overlap_s_per_byte: float = 0.0
    """Seconds an overlapped method's F and B lose per byte its side-stream collectives move
    (efficiency.A100_OVERLAP_S_PER_BYTE, measured in the VP artifact)."""

    @property
    def network(self) -> Network:
        inter = Tier(self.inter_bytes_per_s or self.link_bytes_per_s, self.inter_latency_s or self.link_latency_s)
        return Network(Tier(self.link_bytes_per_s, self.link_latency_s), inter, self.devices_per_node)


def device_profile(name: str, devices_per_node: int = 0) -> DeviceProfile:
    """a100: 312 TFLOP/s bf16 (the paper artifact's MFU basis), 19.5 fp32; h100 SXM: 989 bf16,
    67 fp32; cpu: 0.1 TFLOP/s, the order of a many-core server (a laptop core reaches ~0.05).
    Links (network.py): intra-node, the effective NVLink bandwidth of one device's transfer
    (a100 NVLink 3: 300 GB/s per direction peak, 100 GB/s effective here; h100 NVLink 4: 450 / 200);
    inter-node, one 200 Gb/s HDR (a100) or 400 Gb/s NDR (h100) InfiniBand NIC per GPU, about
    25 / 50 GB/s, with a few microseconds more latency per hop; 8 GPUs per node (DGX/HGX).
    cpu: one node. Overlap cost per byte: a100 measured (efficiency.py), h100 assumed the same, cpu
    none (no measurement). `devices_per_node` > 0 (cluster.gpus_per_node) overrides the profile's."""
    profiles = {
        "a100": DeviceProfile("a100", {"bf16": 312e12, "fp32": 19.5e12}, 0.55, 100e9, 10e-6, 10e-6,
                              devices_per_node=8, inter_bytes_per_s=25e9, inter_latency_s=20e-6,
                              overlap_s_per_byte=A100_OVERLAP_S_PER_BYTE),
        "h100": DeviceProfile("h100", {"bf16": 989e12, "fp32": 67e12}, 0.55, 200e9, 8e-6, 8e-6,
                              devices_per_node=8, inter_bytes_per_s=50e9, inter_latency_s=15e-6,
                              overlap_s_per_byte=A100_OVERLAP_S_PER_BYTE),
        "cpu": DeviceProfile("cpu", {"bf16": 1e11, "fp32": 1e11}, 0.5, 5e9, 50e-6, 0.0),
    }
    if name not in profiles:
        raise ValueError(f"cluster.profile: unknown '{name}'; choose one of {', '.join(profiles)}")
    if devices_per_node < 0:
        raise ValueError(f"cluster.gpus_per_node={devices_per_node}: use 0 (the profile's) or a positive count")
    if devices_per_node:
        return dataclasses.replace(profiles[name], devices_per_node=devices_per_node)
    return profiles[name]
