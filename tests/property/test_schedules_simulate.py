"""Simulator against an independent longest-path oracle; deadlocks; validation errors; plots."""

import subprocess
import sys
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardfn.schedules import (
    Action,
    DeadlockError,
    Event,
    Kind,
    Schedule,
    add_comms,
    deps,
    dualpipev,
    gpipe,
    interleaved_1f1b,
    nanopipe,
    one_f_one_b,
    plot,
    ready,
    simulate,
    validate,
    zbv,
    zero_bubble_h1,
)

FRACTIONS = st.fractions(min_value=Fraction(1, 4), max_value=3, max_denominator=6)


def _oracle_makespan(schedule, cost, latency):
    """Longest path over (program order + data dependency) edges, written from the issue's rules.

    Each node is a compute or communication action; a node starts at the latest of its
    predecessor on the same rank and its data producers (+latency across ranks).
    """
    to_rank, last = schedule.stage_to_rank, schedule.num_stages - 1
    where = {}  # (kind, stage, microbatch) of each compute/comm piece -> (rank, step)
    for r, program in enumerate(schedule.programs):
        for k, action in enumerate(program):
            pieces = action.sub_actions or (action,)
            for a in pieces:
                where[(a.kind.value, a.stage, a.microbatch)] = (r, k)

    def find(*options):
        for key in options:
            if key in where:
                return where[key]
        raise AssertionError(f"oracle: none of {options} is scheduled")

    def producers(a, r):
        s, m = a.stage, a.microbatch
        comms = schedule.has_comms
        out = []
        if a.kind is Kind.F and s > 0:
            remote = to_rank[s - 1] != r
            out.append(find(("RECV_F", s, m)) if remote and comms else find(("F", s - 1, m)))
        if a.kind in (Kind.B, Kind.I):
            out.append(find(("F", s, m)))
            if s < last:
                remote = to_rank[s + 1] != r
                out.append(find(("RECV_B", s, m)) if remote and comms else find(("B", s + 1, m), ("I", s + 1, m)))
        if a.kind is Kind.W:
            out.append(find(("I", s, m)))
        if a.kind is Kind.SEND_F:
            out.append(find(("F", s, m)))
        if a.kind is Kind.SEND_B:
            out.append(find(("B", s, m), ("I", s, m)))
        if a.kind is Kind.RECV_F:
            out.append(find(("SEND_F", s - 1, m)))
        if a.kind is Kind.RECV_B:
            out.append(find(("SEND_B", s + 1, m)))
        return out

    def one(a):
        value = cost.get(a.kind.value, 0)
        return value[a.stage] if isinstance(value, (list, dict)) else value

    def duration(action):
        return sum(one(a) for a in action.sub_actions or (action,))

    end = {}

    def finish(r, k):
        if (r, k) in end:
            return end[(r, k)]
        action = schedule.programs[r][k]
        start = finish(r, k - 1) if k > 0 else 0
        for a in action.sub_actions or (action,):
            for pr, pk in producers(a, r):
                if (pr, pk) != (r, k):
                    start = max(start, finish(pr, pk) + (latency if pr != r else 0))
        end[(r, k)] = start + duration(action)
        return end[(r, k)]

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20000))
    try:
        return max(finish(r, len(p) - 1) for r, p in enumerate(schedule.programs) if p)
    finally:
        sys.setrecursionlimit(limit)


MAKERS = {
    "gpipe": lambda p, m: gpipe(p, m),
    "1f1b": lambda p, m: one_f_one_b(p, m),
    "interleaved": lambda p, m: interleaved_1f1b(p, p * ((m + p - 1) // p), num_chunks=2),
    "zbh1": lambda p, m: zero_bubble_h1(p, m),
    "nanopipe": lambda p, m: nanopipe(p, p * ((m + p - 1) // p), num_chunks=3),
    "zbv": lambda p, m: zbv(p, m),
    "dualpipev": lambda p, m: dualpipev(p, max(m, 2 * p - 1), dw_detach=True),
}


@settings(max_examples=10)
@given(
    st.sampled_from(sorted(MAKERS)),
    st.integers(1, 5),
    st.integers(1, 10),
    FRACTIONS, FRACTIONS, FRACTIONS, FRACTIONS,
    st.sampled_from([0, Fraction(1, 3), 1]),
    st.booleans(),
)
def test_simulate_matches_longest_path_oracle(name, p, m, f, b, i, w, latency, comms):
    schedule = MAKERS[name](p, m)
    if comms:
        schedule = add_comms(schedule)
    cost = {"F": f, "B": b, "I": i, "W": w}
    timeline = simulate(schedule, cost, latency=latency)
    assert timeline.makespan == _oracle_makespan(schedule, cost, latency)
    # Internal consistency: no rank runs two actions at once, and busy time adds up.
    for r in range(p):
        entries = timeline.rank_entries(r)
        assert all(x.end <= y.start for x, y in zip(entries, entries[1:]))
        assert timeline.bubble[r] == timeline.makespan - timeline.busy[r]


def test_per_stage_costs_and_overlap_cost():
    # A slow last stage dominates 1F1B: with F = B = 1 elsewhere and 3 on stage 2 (of 3),
    # the steady state runs at stage 2's pace: makespan = sum over stages of mb 0 + (m-1)*6.
    schedule = one_f_one_b(3, 4)
    cost = {"F": [1, 1, 3], "B": {0: 1, 1: 1, 2: 3}}
    t = simulate(schedule, cost)
    assert t.makespan == _oracle_makespan(schedule, cost, 0)
    # Stage 2 runs back to back: first forward arrives at 2, then 4 x (3 + 3), then B goes back 1 + 1.
    assert t.makespan == 2 + 4 * 6 + 2
    # F&B cost replaces the sum of the halves.
    dual = dualpipev(2, 4)
    fb = simulate(dual, {"F&B": 2})
    plain = simulate(dual)
    overlaps = sum(1 for prog in dual.programs for a in prog if a.kind is Kind.OVERLAP_F_B)
    assert sum(plain.busy) - sum(fb.busy) == overlaps * (1 + 2 - 2)


def test_simulate_rejects_unknown_cost_key():
    with pytest.raises(ValueError, match="not kinds"):
        simulate(one_f_one_b(2, 2), {"X": 1})


def _swap(schedule, rank, i, j):
    programs = [list(p) for p in schedule.programs]
    programs[rank][i], programs[rank][j] = programs[rank][j], programs[rank][i]
    return Schedule(programs, schedule.num_stages, schedule.num_microbatches, schedule.placement, "broken")


def test_deadlock_names_ranks_and_events():
    # Rank 0 runs its backward of microbatch 0 before the forward of microbatch 1 arrives at
    # rank 1... but rank 0's B0 needs rank 1's input gradient, which needs F(1,0) <- F(0,0).
    broken = _swap(one_f_one_b(2, 2), 0, 0, 2)  # rank 0: B0 first
    with pytest.raises(DeadlockError) as info:
        simulate(broken)
    err = info.value
    assert set(err.waiting) == {0, 1}
    step, action, missing = err.waiting[0]
    assert action == Action(0, Kind.B, 0) and Event("F", 0, 0) in missing
    assert Event("F", 0, 0) in err.waiting[1][2]
    message = str(err)
    assert "ranks [0, 1] are stuck" in message and "F(0,0) (from rank 0)" in message
    assert "0B0*" in message and "<--" in message
    with pytest.raises(ValueError, match="deadlocks"):
        validate(broken)


def test_ready_is_the_shared_rule():
    schedule = add_comms(one_f_one_b(2, 2))
    f10 = Action(1, Kind.F, 0)
    assert ready(f10, set(), schedule) == (Event("RECV_F", 1, 0),)
    assert ready(f10, {Event("RECV_F", 1, 0)}, schedule) == ()
    assert deps.producer_rank(Event("SEND_F", 0, 0), schedule) == 0
    plain = one_f_one_b(2, 2)
    assert ready(Action(0, Kind.B, 1), {Event("F", 0, 1)}, plain) == (Event("DX", 1, 1),)
    # A full B provides both gradients; W waits for the input gradient only.
    assert set(deps.provides(Action(1, Kind.B, 0))) == {Event("DX", 1, 0), Event("DW", 1, 0)}
    assert ready(Action(1, Kind.W, 0), {Event("DX", 1, 0)}, plain) == ()
    # Communication peers, as the executor needs them (V placement: stage 2 of zbv(2) is rank 1).
    v = add_comms(zbv(2, 2))
    sends = [a for a in v.programs[1] if a.kind is Kind.SEND_F]
    assert {(a.stage, deps.peer_stage(a), deps.peer_rank(a, v)) for a in sends} == {(2, 3, 0)}
    with pytest.raises(ValueError, match="peer_stage"):
        deps.peer_stage(Action(0, Kind.F, 0))


def _edit(schedule, rank, new_program):
    programs = [list(p) for p in schedule.programs]
    programs[rank] = new_program
    return Schedule(programs, schedule.num_stages, schedule.num_microbatches, schedule.placement, "edited")


def test_validate_reports_every_problem():
    base = zero_bubble_h1(2, 2)
    missing_w = _edit(base, 1, [a for a in base.programs[1] if a != Action(1, Kind.W, 1)])
    with pytest.raises(ValueError, match=r"stage 1 microbatch 1 has B=0, I=1, W=0"):
        validate(missing_w)
    double_f = _edit(base, 0, list(base.programs[0]) + [Action(0, Kind.F, 0)])
    with pytest.raises(ValueError, match="has 2 forwards"):
        validate(double_f)
    wrong_rank = _edit(base, 0, list(base.programs[0]) + [Action(1, Kind.F, 1)])
    with pytest.raises(ValueError) as info:
        validate(wrong_rank)
    assert "lives on rank 1" in str(info.value) and "1F1*" in str(info.value)
    comms = add_comms(one_f_one_b(2, 2))
    no_recv = _edit(comms, 1, [a for a in comms.programs[1] if a != Action(1, Kind.RECV_F, 1)])
    with pytest.raises(ValueError, match="1RECV_F1 appears 0 times"):
        validate(no_recv)
    # The V's turn (stages p-1 and p on rank p-1) must not communicate.
    v = add_comms(zbv(2, 2))
    assert not any(a.kind is Kind.SEND_F and a.stage == 1 for a in v.programs[1])
    bad_v = _edit(v, 1, list(v.programs[1]) + [Action(1, Kind.SEND_F, 0)])
    with pytest.raises(ValueError, match="not a stage on another rank"):
        validate(bad_v)
    with pytest.raises(TypeError):
        validate("0F0")
    with pytest.raises(ValueError, match="already has SEND/RECV"):
        add_comms(comms)


def test_latency_counts_once_per_message():
    # The same latency whether a hand-off is a SEND/RECV pair or a direct cross-rank dependency.
    p, m, lat = 3, 4, Fraction(1, 2)
    plain = simulate(one_f_one_b(p, m), latency=lat)
    comms = simulate(add_comms(one_f_one_b(p, m)), latency=lat)
    assert plain.makespan == comms.makespan == _oracle_makespan(one_f_one_b(p, m), {"F": 1, "B": 2}, lat)
    # One microbatch: 2(p-1) messages on the critical path (forward wave and backward wave).
    single = simulate(one_f_one_b(p, 1), latency=lat)
    assert single.makespan == p * 3 + 2 * (p - 1) * lat
    # The V's turn costs no message: zbv(1 rank) has none at all.
    assert simulate(zbv(1, 2), latency=5).makespan == simulate(zbv(1, 2)).makespan


def test_plot_gantt():
    pytest.importorskip("matplotlib")
    schedule = dualpipev(2, 4)
    timeline = simulate(schedule)
    fig = plot(timeline)
    ax = fig.axes[0]
    compute = [e for e in timeline.entries if e.action.kind in (Kind.F, Kind.B, Kind.I, Kind.W, Kind.OVERLAP_F_B)]
    assert len(ax.patches) == len(compute)
    labels = {t.get_text() for t in ax.texts}
    assert "0:0" in labels and any("/" in s for s in labels)  # stage:microbatch, F&B pairs
    assert [t.get_text() for t in ax.get_yticklabels()] == ["rank 0", "rank 1"]
    assert plot(one_f_one_b(2, 2)).axes[0].get_xlim()[1] == 9
    import matplotlib.pyplot as plt

    plt.close("all")


def test_matplotlib_is_imported_lazily():
    code = "import sys, shardfn.schedules as s; s.simulate(s.one_f_one_b(2, 2)); print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=__file__.rsplit("/tests/", 1)[0])
    assert out.stdout.strip() == "False"
