"""The schedule IR: one enum, a text form that round-trips, golden schedules for every builder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vptrain.schedule import (
    Action,
    PassKind,
    Schedule,
    build_schedule,
    collective_order,
    format_schedule,
    parse_action,
    parse_schedule,
    rank_actions,
)

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "schedules"
# Every builder at small sizes; regenerate with VPTRAIN_UPDATE_GOLDEN=1 after an intended change.
GOLDEN_CASES = [
    (method, "1f1b", p, m)
    for method in ("baseline", "redis", "interlaced", "vocab-naive", "vocab-1", "vocab-2")
    for p, m in ((2, 4), (4, 8))
]
GOLDEN_CASES += [
    (method, "zb-h1", p, m)
    for method in ("baseline", "redis", "vocab-naive", "vocab-1", "vocab-2")
    for p, m in ((2, 4), (4, 8))
]
GOLDEN_CASES += [
    (method, "interleaved", p, m) for method in ("baseline", "vocab-1", "vocab-2") for p, m in ((2, 4), (4, 8))
]
GOLDEN_CASES += [
    (method, "vhalf", p, m) for method in ("baseline", "vocab-naive", "vocab-1", "vocab-2") for p, m in ((2, 4), (3, 6))
]

K = PassKind


@pytest.mark.parametrize("text", ["F3", "B3", "F3.1", "B0.1", "S2", "T2", "IF0", "IB1", "SEND_F12.1",
                                  "RECV_B0", "X_BCAST4", "DXHAT7", "EMB_REDUCE0", "DEMB_BCAST3", "W5.1"])
def test_action_text_round_trips(text: str) -> None:
    assert str(parse_action(text)) == text


def test_action_fields() -> None:
    assert parse_action("F3.1") == Action(K.F, 3, 1)
    assert parse_action("IF12") == Action(K.IF, 12)
    assert parse_action("X_BCAST2").kind.is_collective
    assert parse_action("SEND_F0").kind.is_p2p
    assert parse_action("IB0").kind.is_compute


@pytest.mark.parametrize("bad", ["", "F", "3F", "Q3", "F3.x", "S2.1", "STATS0.1", "f3"])
def test_bad_action_text_is_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_action(bad)


def test_schedule_text_round_trips_and_keeps_metadata() -> None:
    s = build_schedule("vocab-1", "vhalf", 2, 4)
    text = format_schedule(s)
    assert text.splitlines()[1] == "# method=vocab-1 schedule=vhalf p=2 m=4 chunks=2"
    assert parse_schedule(text) == s


def test_parse_schedule_reports_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="metadata"):
        parse_schedule("0: F0 B0\n")
    with pytest.raises(ValueError, match="rank lines"):
        parse_schedule("# method=baseline schedule=1f1b p=2 m=1 chunks=1\n0: F0 B0\n")
    with pytest.raises(ValueError, match="line 2"):
        parse_schedule("# method=baseline schedule=1f1b p=1 m=1 chunks=1\nrank zero F0\n")


def test_collective_order_and_rank_actions() -> None:
    s = build_schedule("vocab-2", "1f1b", 2, 3)
    order = collective_order(s)
    for r in range(s.p):
        assert [a for a in rank_actions(s, r) if a.kind.is_collective] == order
    assert {a.kind for a in order} == {K.X_BCAST, K.STATS, K.DXHAT, K.G_BCAST, K.EMB_REDUCE, K.DEMB_BCAST}


@pytest.mark.parametrize("method,schedule,p,m", GOLDEN_CASES)
def test_golden_schedules(method: str, schedule: str, p: int, m: int) -> None:
    path = GOLDEN / f"{method}_{schedule}_p{p}_m{m}.txt"
    text = format_schedule(build_schedule(method, schedule, p, m))
    if os.environ.get("VPTRAIN_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with VPTRAIN_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{path.name} changed; if intended, regenerate with VPTRAIN_UPDATE_GOLDEN=1"
    assert parse_schedule(path.read_text()) == build_schedule(method, schedule, p, m)


def test_schedule_is_plain_data() -> None:
    s = build_schedule("baseline", "1f1b", 2, 2)
    assert isinstance(s, Schedule)
    assert s.compute_only() == ((Action(K.F, 0), Action(K.F, 1), Action(K.B, 0), Action(K.B, 1)),
                                (Action(K.F, 0), Action(K.B, 0), Action(K.F, 1), Action(K.B, 1)))


def test_schedule_package_does_not_import_torch() -> None:
    """The planner, the engine and the tests share these modules; they must stay torch-free."""
    import subprocess
    import sys

    code = "import sys, vptrain.schedule, vptrain.layout, vptrain.plan; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
