"""The simulator against closed forms, and its semantics (blocking p2p, async/blocking collectives)."""

from __future__ import annotations

import pytest

from vptrain.schedule import (
    Action,
    PassCosts,
    PassKind,
    Schedule,
    build_schedule,
    simulate,
)

K = PassKind


@pytest.mark.parametrize("p,m", [(2, 2), (2, 7), (4, 4), (4, 8), (5, 13), (8, 32)])
def test_1f1b_bubble_closed_form(p: int, m: int) -> None:
    """Uniform F = B, free communication: bubble (p-1)/(m+p-1), makespan 2(m+p-1)."""
    sim = simulate(build_schedule("baseline", "1f1b", p, m), PassCosts.uniform(p))
    assert sim.makespan == pytest.approx(2 * (m + p - 1))
    assert sim.bubble_rate == pytest.approx((p - 1) / (m + p - 1))
    assert sim.busy == pytest.approx([2.0 * m] * p)


def test_1f1b_bubble_with_backward_twice_forward() -> None:
    p, m = 4, 12
    sim = simulate(build_schedule("baseline", "1f1b", p, m), PassCosts.uniform(p, f=1, b=2))
    assert sim.makespan == pytest.approx(3 * (m + p - 1))


@pytest.mark.parametrize("method,expected", [("baseline", 0), ("vocab-2", 1), ("vocab-1", 2)])
def test_peak_in_flight_on_the_first_stage(method: str, expected: int) -> None:
    p = 6
    sim = simulate(build_schedule(method, "1f1b", p, 4 * p), PassCosts.uniform(p, s=0.2, t=0.2))
    assert sim.peak_in_flight[0] == p + expected


def test_interlaced_peak_is_two_p_minus_one() -> None:
    sim = simulate(build_schedule("interlaced", "1f1b", 4, 16), PassCosts.uniform(4, s=0.2, t=0.2))
    assert sim.peak_in_flight[0] == 7


def test_vhalf_balances_memory_across_ranks() -> None:
    """Every rank within two chunks of the fullest (the vocabulary chain's waits fall on some
    ranks only: (6, 8, 8, 6, ...) at p=8), none above p chunks of half a stage, half of what
    1F1B + vocab-2 keeps on its first stage (p + 1 whole stages)."""
    p = 8
    sim = simulate(build_schedule("vocab-2", "vhalf", p, 32), PassCosts.uniform(p, 2, f=1, b=2, s=0.2, t=0.2))
    assert max(sim.peak_in_flight) - min(sim.peak_in_flight) <= 2
    assert max(sim.peak_in_flight) <= p
    assert max(sim.busy) == pytest.approx(min(sim.busy))


def test_vocab_passes_keep_the_1f1b_bubble() -> None:
    """With the vocabulary passes small next to F and B, VP costs (almost) no extra bubble."""
    p, m = 8, 64
    plain = simulate(build_schedule("baseline", "1f1b", p, m), PassCosts.uniform(p, f=1, b=2)).bubble_rate
    for method in ("vocab-1", "vocab-2"):
        costs = PassCosts.uniform(p, f=1, b=2, s=0.2, t=0.2, input_f=0.02, input_b=0.02)
        assert simulate(build_schedule(method, "1f1b", p, m), costs).bubble_rate <= plain + 0.01


def test_interlaced_collectives_do_not_overlap() -> None:
    """Interlaced: every rank is inside each output-layer barrier at the same time."""
    p = 4
    s = build_schedule("interlaced", "1f1b", p, 8)
    sim = simulate(s, PassCosts.uniform(p, s=0.3, t=0.3, collective=0.1))
    for i in range(8):
        starts = {sim.start[r][s.ranks[r].index(Action(K.S, i))] for r in range(p)}
        assert len(starts) == 1  # S(i) starts at the same moment everywhere


def test_collective_costs_delay_the_waiting_pass() -> None:
    s = build_schedule("vocab-2", "1f1b", 2, 2)
    free = simulate(s, PassCosts.uniform(2, s=0.1, t=0.1))
    slow = simulate(s, PassCosts.uniform(2, s=0.1, t=0.1, collective=0.5))
    assert slow.makespan > free.makespan
    x0 = slow.completion[(K.X_BCAST, 0)]
    s0 = s.ranks[0].index(Action(K.S, 0))
    assert slow.start[0][s0] >= x0


def test_p2p_is_a_rendezvous() -> None:
    """A send finishes only when the receiver has reached the matching receive."""
    s = build_schedule("baseline", "1f1b", 2, 1)
    sim = simulate(s, PassCosts.uniform(2, p2p=0.25))
    send = s.ranks[0].index(Action(K.SEND_F, 0))
    recv = s.ranks[1].index(Action(K.RECV_F, 0))
    assert sim.start[0][send] == sim.start[1][recv] == pytest.approx(1.0)
    assert sim.end[0][send] == sim.end[1][recv] == pytest.approx(1.25)


def test_memory_weights_scale_the_activation_peak() -> None:
    s = build_schedule("baseline", "1f1b", 2, 4)
    costs = PassCosts.uniform(2)
    weighted = PassCosts(costs.compute, activation=((3.0,), (5.0,)))
    sim = simulate(s, weighted)
    assert sim.peak_activation == (6.0, 5.0)
    assert sim.peak_in_flight == (2, 1)


def test_peak_vocab_in_flight_counts_s_to_t() -> None:
    s = build_schedule("vocab-2", "1f1b", 2, 4)
    sim = simulate(s, PassCosts.uniform(2, s=0.1, t=0.1))
    assert all(1 <= v <= 4 for v in sim.peak_vocab_in_flight)


def test_empty_ranks_are_harmless() -> None:
    s = Schedule(ranks=((),), method="baseline", name="1f1b", num_microbatches=1, chunks=1)
    assert simulate(s, PassCosts.uniform(1)).makespan == 0.0
