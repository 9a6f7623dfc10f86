"""Validated schedules kept for the length of one `vptrain plan --search` (or any loop of plans).

A schedule is a function of (method, schedule, p, m, nominal costs) alone (builders.py): the
nominal costs are quantised (costs.nominal_costs), so candidates that differ only in where the
layers sit (redis's final-stage splits) or in the device often build the very same schedule.
The memo builds and validates each once and hands back the same `Schedule` and `ScheduleRules`
(whose per-action needs the simulator then reads from its memo). Held by the caller, never global:
a plan made with it is bit for bit the plan made without.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vptrain.schedule.builders import build_schedule
from vptrain.schedule.ir import Schedule
from vptrain.schedule.planner import NominalCosts
from vptrain.schedule.rules import ScheduleRules
from vptrain.schedule.validate import validate_schedule

Key = tuple[str, str, int, int, NominalCosts, bool, int, str]


@dataclass
class ScheduleMemo:
    built: dict[Key, tuple[Schedule, ScheduleRules]] = field(default_factory=dict)
    rules: dict[tuple[str, str, int, int], ScheduleRules] = field(default_factory=dict)
    """One per (method, schedule, p, chunks): an action's needs do not depend on m or on the costs, so
    the memo of needs the validator fills serves every schedule of that shape."""
    hits: int = 0

    def validated(
        self, method: str, name: str, p: int, m: int, nominal: NominalCosts, *, check_deadlock: bool = True,
        chunks: int = 0, w_reserve: str = "auto",
    ) -> tuple[Schedule, ScheduleRules]:
        """The schedule build_schedule(method, name, p, m, nominal=nominal, chunks=chunks,
        w_reserve=w_reserve) validated, and its rules."""
        key = (method, name, p, m, nominal, check_deadlock, chunks, w_reserve)
        found = self.built.get(key)
        if found is not None:
            self.hits += 1
            return found
        schedule = build_schedule(method, name, p, m, nominal=nominal, chunks=chunks, w_reserve=w_reserve)
        shape = (method, name, p, schedule.chunks)
        rules = self.rules.setdefault(shape, ScheduleRules.of(method=method, name=name, p=p, chunks=schedule.chunks))
        validate_schedule(schedule, check_deadlock=check_deadlock, rules=rules)
        self.built[key] = (schedule, rules)
        return schedule, rules
