"""Generators: validity, closed forms of PERF.md section 1.2 (exact Fractions), memory, phases."""

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardfn.schedules import (
    Kind,
    add_comms,
    dualpipev,
    dualpipev_phase_counts,
    gpipe,
    interleaved_1f1b,
    nanopipe,
    one_f_one_b,
    simulate,
    validate,
    zbv,
    zero_bubble_h1,
)
from shardfn.schedules.dualpipe import dualpipev_phases

ranks = st.integers(1, 8)
chunks = st.integers(2, 4)
costs = st.fractions(min_value=Fraction(1, 4), max_value=4, max_denominator=8)


def _check(schedule, **sim):
    """Every schedule must validate, simulate, and stay valid with communication actions."""
    validate(schedule)
    comms = add_comms(schedule)
    validate(comms)
    timeline = simulate(schedule, **sim)
    assert simulate(comms, **sim).makespan == timeline.makespan  # zero-cost messages change nothing
    return timeline


@given(ranks, st.integers(1, 16), costs, costs)
def test_gpipe_and_1f1b_bubble_closed_form(p, m, f, b):
    # PERF.md 1.2: (p-1)(T_F + T_B) per rank for every m, including m < p; any uniform F, B.
    for make in (gpipe, one_f_one_b):
        t = _check(make(p, m), cost={"F": f, "B": b})
        assert t.bubble == ((p - 1) * (f + b),) * p
        assert t.makespan == (m + p - 1) * (f + b)
        assert t.bubble_over_ideal == (Fraction(p - 1, m),) * p
        assert t.bubble_over_makespan == (Fraction(p - 1, m + p - 1),) * p


@given(ranks, st.integers(1, 16))
def test_peak_activations_gpipe_1f1b(p, m):
    assert simulate(gpipe(p, m)).peak_activations == (m,) * p
    # Narayanan'21 / FEATURES.md 1: rank r holds min(p - r, m) microbatches.
    assert simulate(one_f_one_b(p, m)).peak_activations == tuple(min(p - r, m) for r in range(p))


@st.composite
def interleaved_sizes(draw):
    p = draw(ranks)
    v = draw(chunks)
    m = p * draw(st.integers(1, max(1, 16 // p)))
    return p, m, v


@given(interleaved_sizes(), costs, costs)
def test_interleaved_closed_form(sizes, f, b):
    p, m, v = sizes
    # Per-chunk costs are 1/v of a rank's stage, so the bubble is (p-1)(F+B)/v (PERF.md 1.2).
    t = _check(interleaved_1f1b(p, m, num_chunks=v), cost={"F": f / v, "B": b / v})
    assert t.bubble == ((p - 1) * (f + b) / v,) * p
    assert t.bubble_over_ideal == (Fraction(p - 1, v * m),) * p
    # Megatron's warmup (p-r-1)*2 + (v-1)*p forwards plus one in steady state, 1/v each.
    expected = tuple(Fraction(min((p - r - 1) * 2 + (v - 1) * p + 1, m * v), v) for r in range(p))
    assert t.peak_activations == expected
    if m * v > (p - 1) * 2 + (v - 1) * p:  # rank 0 is not all-warmup: the penalty formula applies
        assert t.peak_activations[0] == p * (1 + Fraction(p - 1, p * v))


def test_interleaved_worked_numbers():
    # PERF.md 1.3, p=4, m=8 with per-chunk costs 1/v: makespan 28.5 (v=2) and 26.25 (v=4).
    t2 = simulate(interleaved_1f1b(4, 8, num_chunks=2), {"F": Fraction(1, 2), "B": 1})
    assert t2.makespan == Fraction(57, 2)
    assert t2.peak_activations == (Fraction(11, 2), Fraction(9, 2), Fraction(7, 2), Fraction(5, 2))
    t4 = simulate(interleaved_1f1b(4, 8, num_chunks=4), {"F": Fraction(1, 4), "B": Fraction(1, 2)})
    assert t4.makespan == Fraction(105, 4) and t4.peak_activations[0] == Fraction(19, 4)


@given(ranks, st.integers(0, 8), costs, costs, st.data())
def test_zero_bubble_h1_closed_form(p, extra, f, i, data):
    m = p + extra  # the closed form needs m >= p
    w = data.draw(st.fractions(min_value=Fraction(1, 8), max_value=min(f, i), max_denominator=8))
    # ZB paper 2.1, PERF.md 1.2: (p-1)(T_F + T_I - T_W) per rank, given T_W <= T_F, T_I.
    t = _check(zero_bubble_h1(p, m), cost={"F": f, "I": i, "W": w})
    assert t.bubble == ((p - 1) * (f + i - w),) * p
    # Memory: p - r full forwards and r pending W holding `weight_memory` each (ZB-H1 <= p).
    h = Fraction(3, 7)
    peaks = simulate(zero_bubble_h1(p, m), weight_memory=h).peak_activations
    assert peaks == tuple(p - r + r * h for r in range(p))
    assert max(peaks) <= p


@given(ranks, st.integers(1, 16))
def test_zero_bubble_h1_small_m(p, m):
    # m < p included: still valid and never worse than 1F1B with B = I + W.
    t = _check(zero_bubble_h1(p, m))
    assert t.makespan <= simulate(one_f_one_b(p, m)).makespan


@given(interleaved_sizes())
def test_nanopipe(sizes):
    p, m, v = sizes
    schedule = nanopipe(p, m, num_chunks=v)
    t = _check(schedule)
    base = simulate(interleaved_1f1b(p, m, num_chunks=v))
    assert t.makespan <= base.makespan
    for r, program in enumerate(schedule.programs):
        # FEATURES.md 4: the first 2r steady backwards are input-only, W drained at the end in order.
        warmup_r = min((p - r - 1) * 2 + (v - 1) * p, m * v)
        deferred = [a for a in program if a.kind is Kind.I]
        assert len(deferred) == min(2 * r, m * v - warmup_r)
        tail = program[len(program) - len(deferred):]
        assert [(a.kind, a.stage, a.microbatch) for a in tail] == [(Kind.W, a.stage, a.microbatch) for a in deferred]


@given(ranks, st.integers(1, 16))
def test_zbv(p, m):
    schedule = zbv(p, m)
    assert schedule.placement == "v" and schedule.num_stages == 2 * p
    t = _check(schedule)
    # Peak of 1F1B (p microbatches of a rank's layers) and, with T_F = T_I = T_W and m >= 2p,
    # zero rank-local bubble; the global bubble is only the start-up skew (p-1) T_F.
    assert max(t.peak_activations) <= p
    if m >= 2 * p:
        assert t.span_bubble == (0,) * p
        assert t.bubble == (p - 1,) * p


@st.composite
def dualpipev_sizes(draw):
    p = draw(st.integers(1, 8))
    return p, draw(st.integers(2 * p - 1, 16))


@settings(max_examples=6)
@given(dualpipev_sizes(), st.booleans())
def test_dualpipev_phases_and_validity(sizes, dw_detach):
    p, m = sizes
    schedule = dualpipev(p, m, dw_detach=dw_detach)
    _check(schedule)
    for r, program in enumerate(schedule.programs):
        phases = dualpipev_phases(p, m, r, dw_detach=dw_detach)
        expected = dualpipev_phase_counts(p, m, r)
        master, slave = r, 2 * p - 1 - r
        got = {name: [a for a, ph in zip(program, phases) if ph == name] for name in expected}
        # FEATURES.md 52 table, counted from the generated program.
        assert len(got["warmup"]) == 2 * p - 2 - 2 * r
        assert all(a.kind is Kind.F and a.stage == master for a in got["warmup"])
        assert len(got["interleaved_forward"]) == 2 * (r + 1)
        assert len(got["1b1w1f"]) == 3 * (p - r - 1)
        assert [a.kind for a in got["1b1w1f"]] == [Kind.I, Kind.W, Kind.F] * (p - r - 1)
        overlap_ops = sum(len(a.computes) for a in got["overlap"])
        assert overlap_ops == 2 * (2 * m - 4 * p + 2 * r + 2)  # each step: one F and one B
        assert sum(len(a.computes) for a in got["1b1overlap"]) == 3 * (p - r - 1)
        assert len(got["interleaved_backward"]) == 2 * (r + 1)
        cooldown_backwards = [a for a in got["cooldown"] if a.kind in (Kind.B, Kind.I)]
        assert len(cooldown_backwards) == p - r - 1
        assert all(a.stage == master for a in cooldown_backwards)
        if dw_detach:
            assert len(got["drain"]) == r + 1 and all(a.kind is Kind.W for a in got["drain"])
        else:
            assert not got["drain"] and all(a.kind is Kind.B for a in got["cooldown"])
        assert {c.stage for a in program for c in a.computes} == {master, slave}


@pytest.mark.parametrize("p", [2, 3, 4, 8])
@pytest.mark.parametrize("fb", [Fraction(2), Fraction(5, 2), Fraction(3)])
def test_dualpipev_bubble_formulas(p, fb):
    m = 2 * p
    cost = {"F": 1, "B": 2, "I": 1, "W": 1, "F&B": fb}
    f, b, w = 1, 2, 1
    # DeepSeek's DualPipeV (dw_detach=True, their reference order) on p ranks = 2p stages:
    # (PP/2 - 1)(F&B + B - 3W) with PP = 2p, exactly (the largest per-rank bubble).
    deepseek = simulate(dualpipev(p, m, dw_detach=True), cost)
    assert max(deepseek.bubble) == (p - 1) * (fb + b - 3 * w)
    # MindSpeed-default DualPipeV (full B in cooldown): MindSpeed's docs give
    # (P-1)(F&B + B - W) - F; our simulation is exactly one T_F above it (the +-1-op
    # tolerance PERF.md B1 allows for DualPipeV).
    mindspeed = simulate(dualpipev(p, m), cost)
    mindspeed_formula = (p - 1) * (fb + b - w) - f
    assert max(mindspeed.bubble) - mindspeed_formula == f
    # Peak activations, in chunks: DualPipe's PP + 1 (PP = 2p stages) on the last rank.
    assert max(deepseek.peak_activations) * 2 == 2 * p + 1


def test_generator_errors_name_the_rule():
    with pytest.raises(ValueError, match=r"2 \* num_ranks - 1"):
        dualpipev(4, 6)
    with pytest.raises(ValueError, match="multiple of num_ranks"):
        interleaved_1f1b(4, 6, num_chunks=2)
    with pytest.raises(ValueError, match="num_chunks=1 must be >= 2"):
        nanopipe(4, 8, num_chunks=1)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_ranks"):
            one_f_one_b(bad, 4)
    with pytest.raises(ValueError, match="num_microbatches"):
        gpipe(2, 0)


def test_worked_numbers_p4_m8():
    # PERF.md 1.3 table (unit costs F = I = W = 1, B = 2).
    assert simulate(gpipe(4, 8)).makespan == 33
    assert simulate(one_f_one_b(4, 8)).bubble == (9, 9, 9, 9)
    zb = simulate(zero_bubble_h1(4, 8))
    assert zb.makespan == 27 and zb.bubble_over_ideal == (Fraction(1, 8),) * 4
