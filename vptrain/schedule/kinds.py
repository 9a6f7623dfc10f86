"""The schedules vptrain builds, as data: where each rank's stages sit and whether the backward is
split into B (input gradient) and W (weight gradients).

    1f1b         line  stage r on rank r                          B whole
    zb-h1        line  stage r on rank r                          B / W (Qi et al. 2024, ZB-H1)
    vhalf        v     stages r and 2p-1-r on rank r              B / W (the V-Half of Qi et al. 2024b)
    interleaved  loop  stages r, r+p, ..., r+(v-1)p on rank r     B whole (Megatron's interleaved 1F1B)

Every consumer (rules, builders, layout, engine selection) asks this table instead of testing a
schedule's name, so adding a schedule is one row here plus its builder.
"""

from __future__ import annotations

from dataclasses import dataclass

ALL_METHODS = ("baseline", "redis", "interlaced", "vocab-naive", "vocab-1", "vocab-2")


@dataclass(frozen=True)
class ScheduleKind:
    name: str
    placement: str
    """line | v | loop (module docstring)."""
    split_backward: bool
    """B computes and sends the input gradient only; W (per microbatch and chunk) the weight
    gradients, at a time of the schedule's choosing after its B."""
    methods: tuple[str, ...]
    """The methods this schedule runs."""
    fixed_chunks: int | None
    """Model chunks per rank; None: `schedule.virtual_stages` decides (interleaved)."""

    def chunks(self, virtual_stages: int = 2) -> int:
        return self.fixed_chunks if self.fixed_chunks is not None else virtual_stages


SCHEDULE_KINDS: dict[str, ScheduleKind] = {
    k.name: k
    for k in (
        ScheduleKind("1f1b", "line", False, ALL_METHODS, 1),
        ScheduleKind("zb-h1", "line", True, ("baseline", "redis", "vocab-naive", "vocab-1", "vocab-2"), 1),
        ScheduleKind("vhalf", "v", True, ("baseline", "vocab-naive", "vocab-1", "vocab-2"), 2),
        ScheduleKind("interleaved", "loop", False, ("baseline", "vocab-naive", "vocab-1", "vocab-2"), None),
    )
}
SCHEDULE_NAMES = tuple(SCHEDULE_KINDS)


def schedule_kind(name: str) -> ScheduleKind:
    try:
        return SCHEDULE_KINDS[name]
    except KeyError:
        raise ValueError(f"schedule: unknown '{name}'; choose one of {', '.join(SCHEDULE_NAMES)}") from None
