"""Pipeline schedules as data: IR, builders, validator, simulator, renderer and cost model.

Nothing here imports torch: the engine, `vptrain plan` and the tests share these pure functions.

    s = build_schedule("vocab-2", "1f1b", p=4, m=8)
    validate_schedule(s)
    sim = simulate(s, PassCosts.uniform(s.p, s.chunks))
    print(render_ascii(s, sim=sim))
"""

from vptrain.schedule.builders import build_schedule
from vptrain.schedule.ir import (
    Action,
    Category,
    PassKind,
    Schedule,
    ScheduleError,
    collective_order,
    format_schedule,
    parse_action,
    parse_schedule,
    rank_actions,
)
from vptrain.schedule.render import render_ascii, render_order, render_png
from vptrain.schedule.rules import MethodRules, ScheduleRules, StageMap, method_rules
from vptrain.schedule.simulate import DeadlockError, PassCosts, SimResult, memory_profile, simulate
from vptrain.schedule.validate import validate_schedule

__all__ = [
    "Action",
    "Category",
    "DeadlockError",
    "MethodRules",
    "PassCosts",
    "PassKind",
    "Schedule",
    "ScheduleError",
    "ScheduleRules",
    "SimResult",
    "StageMap",
    "build_schedule",
    "collective_order",
    "format_schedule",
    "memory_profile",
    "method_rules",
    "parse_action",
    "parse_schedule",
    "rank_actions",
    "render_ascii",
    "render_order",
    "render_png",
    "simulate",
    "validate_schedule",
]
