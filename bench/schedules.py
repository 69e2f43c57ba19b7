"""Benchmark B1 (PERF.md section 7): schedule simulator vs closed forms, and torch anchors.

Prints, for p in {2, 4, 8} and m in {p, 2p, 4p}, the simulated bubble ratio and peak
activations of every schedule family next to the closed form of PERF.md section 1.2, with
their ratio (exactly 1 with Fractions, except where a row says the formula is approximate).
Then a makespan table against torch.distributed.pipelining's generated orders, and a PNG
Gantt chart of 1F1B, interleaved, ZB-H1 and DualPipeV at p=4 under out/.

Run from the repository root: ``python bench/schedules.py``. Unit costs F = I = W = 1,
B = 2 (full backward), F&B = 3 (no overlap gain); interleaved chunks cost 1/v of a stage.
"""

from __future__ import annotations

import os
import sys
from fractions import Fraction

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shardfn.schedules import (  # noqa: E402
    torch_order,
    dualpipev,
    gpipe,
    interleaved_1f1b,
    one_f_one_b,
    plot,
    simulate,
    validate,
    zbv,
    zero_bubble_h1,
)

F, B, I, W, FB = 1, 2, 1, 1, 3
UNIT = {"F": F, "B": B, "I": I, "W": W, "F&B": FB}


def _fmt(x) -> str:
    x = Fraction(x)
    return str(x.numerator) if x.denominator == 1 else f"{float(x):.4g}"


def families(p: int, m: int):
    """(name, schedule, cost, bubble formula, peak formula (rank max), note) rows that exist."""
    rows = [
        ("gpipe", gpipe(p, m), UNIT, (p - 1) * (F + B), m, ""),
        ("1f1b", one_f_one_b(p, m), UNIT, (p - 1) * (F + B), min(p, m), ""),
    ]
    for v in (2, 4):
        cost = {"F": Fraction(F, v), "B": Fraction(B, v)}
        peak = Fraction(min(2 * (p - 1) + (v - 1) * p + 1, m * v), v)
        rows.append((f"interleaved v={v}", interleaved_1f1b(p, m, num_chunks=v), cost,
                     Fraction((p - 1) * (F + B), v), peak, ""))
    rows.append(("zb-h1", zero_bubble_h1(p, m), UNIT, (p - 1) * (F + I - W), p, ""))
    if m >= 2 * p:
        rows.append(("zb-v (rank-local)", zbv(p, m), UNIT, 0, p, "span bubble"))
    if m >= 2 * p - 1:
        rows.append(("dualpipev DeepSeek", dualpipev(p, m, dw_detach=True), UNIT,
                     (p - 1) * (FB + B - 3 * W), Fraction(2 * p + 1, 2), "max over ranks"))
        rows.append(("dualpipev MindSpeed", dualpipev(p, m), UNIT,
                     (p - 1) * (FB + B - W) - F, Fraction(2 * p + 1, 2), "formula approximate (+T_F)"))
    return rows


def closed_form_table() -> bool:
    print("B1: simulated vs closed form (PERF.md 1.2), unit costs, exact Fractions")
    header = (f"{'schedule':22s} {'p':>2s} {'m':>3s} {'bubble':>8s} {'formula':>8s} {'ratio':>6s} "
              f"{'/ideal':>7s} {'/makespan':>9s} {'peak':>6s} {'formula':>7s} {'ratio':>6s}  note")
    print(header)
    exact = True
    for p in (2, 4, 8):
        for m in (p, 2 * p, 4 * p):
            for name, schedule, cost, bubble_f, peak_f, note in families(p, m):
                validate(schedule)
                t = simulate(schedule, cost)
                if note == "span bubble":
                    bubble = max(t.span_bubble)
                elif note.startswith("max") or note.startswith("formula"):
                    bubble = max(t.bubble)
                else:
                    assert len(set(t.bubble)) == 1, (name, t.bubble)
                    bubble = t.bubble[0]
                peak = max(t.peak_activations)
                b_ratio = "-" if bubble_f == 0 else _fmt(Fraction(bubble) / Fraction(bubble_f))
                if bubble_f == 0:
                    b_ratio = "1" if bubble == 0 else "inf"
                p_ratio = _fmt(Fraction(peak) / Fraction(peak_f))
                if not note.startswith("formula") and (b_ratio != "1" or p_ratio != "1"):
                    exact = False
                r0 = 0 if note != "max over ranks" else t.bubble.index(max(t.bubble))
                print(f"{name:22s} {p:2d} {m:3d} {_fmt(bubble):>8s} {_fmt(bubble_f):>8s} {b_ratio:>6s} "
                      f"{_fmt(t.bubble_over_ideal[r0]):>7s} {_fmt(t.bubble_over_makespan[r0]):>9s} "
                      f"{_fmt(peak):>6s} {_fmt(peak_f):>7s} {p_ratio:>6s}  {note}")
    print("all exact rows have ratio 1:", exact)
    return exact


def torch_anchor_table() -> None:
    try:
        import torch.distributed.pipelining  # noqa: F401
    except ImportError:
        print("torch.distributed.pipelining not available: anchor table skipped")
        return

    def theirs(cls_name, p, m, v, placement):
        return torch_order(cls_name, p, m, num_chunks=v, placement=placement)

    rows = [
        ("gpipe", lambda p, m: gpipe(p, m), "ScheduleGPipe", 1, "loop"),
        ("1f1b", lambda p, m: one_f_one_b(p, m), "ScheduleInterleaved1F1B", 1, "loop"),
        ("interleaved v=2", lambda p, m: interleaved_1f1b(p, m, num_chunks=2), "ScheduleInterleaved1F1B", 2, "loop"),
        ("interleaved v=4", lambda p, m: interleaved_1f1b(p, m, num_chunks=4), "ScheduleInterleaved1F1B", 4, "loop"),
        ("zb-h1", lambda p, m: zero_bubble_h1(p, m), "ScheduleInterleavedZeroBubble", 1, "loop"),
        ("zb-v", lambda p, m: zbv(p, m), "ScheduleZBVZeroBubble", 2, "v"),
        ("dualpipev dw_detach", lambda p, m: dualpipev(p, m, dw_detach=True), "ScheduleDualPipeV", 2, "v"),
    ]
    print("\nAnchor: simulated makespan, shardfn vs torch.distributed.pipelining order (F=I=W=1, B=2, F&B=3)")
    print(f"{'family':20s} {'torch class':30s} {'p':>2s} {'m':>3s} {'shardfn':>8s} {'torch':>8s} {'ratio':>6s}")
    for name, ours, cls_name, v, placement in rows:
        for p in (2, 4, 8):
            for m in (p, 2 * p, 4 * p):
                try:
                    t_sched = theirs(cls_name, p, m, v, placement)
                    validate(t_sched)
                    t_make = simulate(t_sched, UNIT).makespan
                except ValueError as err:
                    t_make = "n/a (" + str(err).splitlines()[0][:40] + ")"
                try:
                    o_make = simulate(ours(p, m), UNIT).makespan
                except ValueError:
                    o_make = "n/a"
                ratio = _fmt(Fraction(o_make) / Fraction(t_make)) if isinstance(t_make, (int, Fraction)) and \
                    isinstance(o_make, (int, Fraction)) else "-"
                print(f"{name:20s} {cls_name:30s} {p:2d} {m:3d} {_fmt(o_make) if o_make != 'n/a' else o_make:>8s} "
                      f"{_fmt(t_make) if not isinstance(t_make, str) else t_make:>8s} {ratio:>6s}")


def gantt_png(path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, m = 4, 8
    panels = [
        (one_f_one_b(p, m), UNIT),
        (interleaved_1f1b(p, m, num_chunks=2), {"F": Fraction(1, 2), "B": 1}),
        (zero_bubble_h1(p, m), UNIT),
        (dualpipev(p, m), UNIT),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(16, 2.2 * len(panels)))
    for ax, (schedule, cost) in zip(axes, panels):
        plot(simulate(schedule, cost), ax=ax)
    xmax = max(ax.get_xlim()[1] for ax in axes)
    for ax in axes:
        ax.set_xlim(0, xmax)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    ok = closed_form_table()
    torch_anchor_table()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    gantt_png(os.path.join(root, "out", "schedules_gantt_p4.png"))
    sys.exit(0 if ok else 1)
