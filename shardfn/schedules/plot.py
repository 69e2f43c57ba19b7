"""`plot`: a Gantt chart of a schedule or timeline (matplotlib, imported lazily; extra ``viz``)."""

from __future__ import annotations

from types import MappingProxyType

from .actions import COMPUTE_KINDS, Kind
from .schedule import Schedule
from .simulate import Timeline, simulate

__all__ = ["plot", "KIND_COLORS"]

KIND_COLORS = MappingProxyType({
    "F": "#4C72B0",
    "B": "#DD8452",
    "I": "#C44E52",
    "W": "#55A868",
    "F&B": "#8172B3",
    "comm": "#BBBBBB",
})


def plot(schedule_or_timeline: Schedule | Timeline, *, cost=None, latency=0, ax=None, title: str | None = None):
    """Draw a Gantt chart: one row per rank, one box per action, coloured by kind.

    Boxes are labelled with the microbatch number (and the stage when a rank holds several
    chunks, as ``stage:microbatch``). Communication actions take no time by default and are
    not drawn unless they were given a duration.

    Args:
        schedule_or_timeline: a `Schedule` (simulated with ``cost`` and ``latency`` first) or a
            `Timeline` from `simulate`.
        cost: passed to `simulate` for a `Schedule`.
        latency: passed to `simulate` for a `Schedule`.
        ax: optional matplotlib Axes to draw into; a new Figure is made otherwise.
        title: optional title; default names the schedule, makespan and bubble.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        ImportError: matplotlib is not installed (``pip install shardfn[viz]``).
    """
    try:
        import matplotlib

        if ax is None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("plot: matplotlib is required; install the extra with `pip install shardfn[viz]`.") from err
    timeline = schedule_or_timeline
    if isinstance(timeline, Schedule):
        timeline = simulate(timeline, cost, latency=latency)
    if not isinstance(timeline, Timeline):
        raise TypeError(f"plot: expected a Schedule or Timeline, got {type(schedule_or_timeline).__name__}.")
    schedule = timeline.schedule
    if ax is None:
        width = min(40.0, 2.0 + float(timeline.makespan) * 0.18)
        fig, ax = plt.subplots(figsize=(width, 0.6 + 0.45 * schedule.num_ranks))
    else:
        fig = ax.figure
    multi = schedule.num_chunks > 1
    for e in timeline.entries:
        length = float(e.end - e.start)
        if e.action.kind not in COMPUTE_KINDS and length == 0:
            continue
        if e.action.kind is Kind.OVERLAP_F_B:
            key, label = "F&B", "/".join(_label(a, multi) for a in e.action.sub_actions)
        elif e.action.kind in COMPUTE_KINDS:
            key, label = e.action.kind.value, _label(e.action, multi)
        else:
            key, label = "comm", ""
        ax.barh(e.rank, length, left=float(e.start), height=0.8, color=KIND_COLORS[key], edgecolor="black",
                linewidth=0.4)
        if label and length > 0:
            ax.text(float(e.start) + length / 2, e.rank, label, ha="center", va="center", fontsize=6, color="white")
    ax.set_yticks(range(schedule.num_ranks), [f"rank {r}" for r in range(schedule.num_ranks)])
    ax.invert_yaxis()
    ax.set_xlim(0, float(timeline.makespan) if timeline.makespan else 1)
    ax.set_xlabel("time")
    used = {e.action.kind for e in timeline.entries}
    keys = [k for k in ("F", "B", "I", "W") if Kind(k) in used] + (["F&B"] if Kind.OVERLAP_F_B in used else [])
    ax.legend(handles=[Patch(color=KIND_COLORS[k], label=k) for k in keys], loc="lower right",
              bbox_to_anchor=(1.0, 1.0), fontsize=6, ncol=5, frameon=False)
    if title is None:
        title = (f"{schedule.name or 'schedule'}: p={schedule.num_ranks}, stages={schedule.num_stages}, "
                 f"m={schedule.num_microbatches}, makespan={float(timeline.makespan):g}, "
                 f"bubble r0={float(timeline.bubble[0]):g}")
    ax.set_title(title, fontsize=8, loc="left")
    return fig


def _label(action, multi: bool) -> str:
    return f"{action.stage}:{action.microbatch}" if multi else str(action.microbatch)
