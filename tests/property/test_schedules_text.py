"""Text forms: torch-compatible action strings, the step x rank grid, golden grids, round trips."""

import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardfn.schedules import (
    Action,
    Kind,
    Schedule,
    add_comms,
    dualpipev,
    format,
    gpipe,
    interleaved_1f1b,
    nanopipe,
    one_f_one_b,
    parse_action,
    parse_schedule,
    zbv,
    zero_bubble_h1,
)
from torch.distributed.pipelining.schedules import _Action as TorchAction

SIMPLE_KINDS = [k for k in Kind if k is not Kind.OVERLAP_F_B]


@st.composite
def actions(draw):
    if draw(st.booleans()):
        return Action(draw(st.integers(0, 99)), draw(st.sampled_from(SIMPLE_KINDS)), draw(st.integers(0, 999)))
    forward = Action(draw(st.integers(0, 99)), Kind.F, draw(st.integers(0, 999)))
    backward = Action(draw(st.integers(0, 99)), draw(st.sampled_from([Kind.B, Kind.I])), draw(st.integers(0, 999)))
    return Action.overlap(forward, backward)


@given(actions())
def test_action_round_trip_and_torch_compatible(action):
    text = str(action)
    assert parse_action(text) == action
    assert repr(action) == text
    # torch's own parser reads our string and prints it back identically.
    theirs = TorchAction.from_str(text)
    assert str(theirs) == text
    if action.kind is not Kind.OVERLAP_F_B:
        assert (theirs.stage_index, theirs.computation_type.value, theirs.microbatch_index) == (
            action.stage,
            action.kind.value,
            action.microbatch,
        )


def test_action_examples():
    assert str(Action(0, "F", 1)) == "0F1"
    assert parse_action(" 3SEND_F12 ") == Action(3, Kind.SEND_F, 12)
    assert parse_action("(0F4;7B1)OVERLAP_F_B") == Action.overlap(Action(0, Kind.F, 4), Action(7, Kind.B, 1))
    assert Action.overlap(Action(0, Kind.F, 4), Action(7, Kind.I, 1)).computes == (Action(0, "F", 4), Action(7, "I", 1))


@pytest.mark.parametrize("bad", ["", "F1", "0X1", "0F", "(0F1)OVERLAP_F_B", "0F1;1B0", "0UNSHARD"])
def test_parse_action_rejects(bad):
    with pytest.raises(ValueError, match="parse_action"):
        parse_action(bad)


def test_action_rejects_bad_records():
    with pytest.raises(ValueError, match="microbatch"):
        Action(0, Kind.F, None)
    with pytest.raises(ValueError, match="OVERLAP_F_B"):
        Action(0, Kind.OVERLAP_F_B, None, (Action(0, Kind.B, 0), Action(1, Kind.F, 0)))
    with pytest.raises(ValueError, match="sub_actions"):
        Action(0, Kind.F, 0, (Action(0, Kind.F, 0),))


GENERATORS = [
    lambda: gpipe(3, 2),
    lambda: one_f_one_b(4, 3),
    lambda: interleaved_1f1b(2, 4, num_chunks=3),
    lambda: zero_bubble_h1(3, 5),
    lambda: nanopipe(4, 4, num_chunks=2),
    lambda: zbv(3, 4),
    lambda: dualpipev(3, 5),
    lambda: dualpipev(2, 4, dw_detach=True),
]


@pytest.mark.parametrize("make", GENERATORS)
def test_format_parse_round_trip(make):
    schedule = make()
    assert parse_schedule(format(schedule)) == schedule
    with_comms = add_comms(schedule)
    assert parse_schedule(format(with_comms)) == with_comms


def _golden(text):
    return textwrap.dedent(text).lstrip("\n")


GOLDEN = {
    "1f1b": (
        lambda: one_f_one_b(3, 4),
        """
        # shardfn schedule name=1f1b ranks=3 stages=3 microbatches=4 placement=loop
                Rank 0 Rank 1 Rank 2
        Step 0: 0F0    1F0    2F0
        Step 1: 0F1    1F1    2B0
        Step 2: 0F2    1B0    2F1
        Step 3: 0B0    1F2    2B1
        Step 4: 0F3    1B1    2F2
        Step 5: 0B1    1F3    2B2
        Step 6: 0B2    1B2    2F3
        Step 7: 0B3    1B3    2B3
        """,
    ),
    "gpipe": (
        lambda: gpipe(2, 2),
        """
        # shardfn schedule name=gpipe ranks=2 stages=2 microbatches=2 placement=loop
                Rank 0 Rank 1
        Step 0: 0F0    1F0
        Step 1: 0F1    1F1
        Step 2: 0B0    1B0
        Step 3: 0B1    1B1
        """,
    ),
    "interleaved": (
        lambda: interleaved_1f1b(2, 2, num_chunks=2),
        """
        # shardfn schedule name=interleaved2 ranks=2 stages=4 microbatches=2 placement=loop
                Rank 0 Rank 1
        Step 0: 0F0    1F0
        Step 1: 0F1    1F1
        Step 2: 2F0    3F0
        Step 3: 2F1    3B0
        Step 4: 2B0    3F1
        Step 5: 2B1    3B1
        Step 6: 0B0    1B0
        Step 7: 0B1    1B1
        """,
    ),
    "zbh1": (
        lambda: zero_bubble_h1(3, 4),
        """
        # shardfn schedule name=zbh1 ranks=3 stages=3 microbatches=4 placement=loop
                 Rank 0 Rank 1 Rank 2
        Step 00: 0F0    1F0    2F0
        Step 01: 0F1    1F1    2I0
        Step 02: 0F2    1I0    2F1
        Step 03: 0I0    1F2    2I1
        Step 04: 0W0    1I1    2F2
        Step 05: 0F3    1W0    2I2
        Step 06: 0I1    1F3    2W0
        Step 07: 0W1    1I2    2F3
        Step 08: 0I2    1W1    2I3
        Step 09: 0W2    1I3    2W1
        Step 10: 0I3    1W2    2W2
        Step 11: 0W3    1W3    2W3
        """,
    ),
    "nanopipe": (
        lambda: nanopipe(2, 2, num_chunks=2),
        """
        # shardfn schedule name=nanopipe2 ranks=2 stages=4 microbatches=2 placement=loop
                Rank 0 Rank 1
        Step 0: 0F0    1F0
        Step 1: 0F1    1F1
        Step 2: 2F0    3F0
        Step 3: 2F1    3I0
        Step 4: 2B0    3F1
        Step 5: 2B1    3I1
        Step 6: 0B0    1B0
        Step 7: 0B1    1B1
        Step 8: .      3W0
        Step 9: .      3W1
        """,
    ),
    "dualpipev": (
        lambda: dualpipev(2, 3),
        """
        # shardfn schedule name=dualpipev ranks=2 stages=4 microbatches=3 placement=v
                 Rank 0               Rank 1
        Step 00: 0F0                  1F0
        Step 01: 0F1                  2F0
        Step 02: 0F2                  1F1
        Step 03: 3F0                  2F1
        Step 04: 3I0                  1F2
        Step 05: 3W0                  2B0
        Step 06: 3F1                  (2F2;1B0)OVERLAP_F_B
        Step 07: 3B1                  2B1
        Step 08: (3F2;0B0)OVERLAP_F_B 1B1
        Step 09: 3B2                  2B2
        Step 10: 0B1                  1B2
        Step 11: 0B2                  .
        """,
    ),
    "dualpipev_dw_detach": (
        lambda: dualpipev(2, 3, dw_detach=True),
        """
        # shardfn schedule name=dualpipev_dwdetach ranks=2 stages=4 microbatches=3 placement=v
                 Rank 0               Rank 1
        Step 00: 0F0                  1F0
        Step 01: 0F1                  2F0
        Step 02: 0F2                  1F1
        Step 03: 3F0                  2F1
        Step 04: 3I0                  1F2
        Step 05: 3W0                  2B0
        Step 06: 3F1                  (2F2;1B0)OVERLAP_F_B
        Step 07: 3B1                  2B1
        Step 08: (3F2;0B0)OVERLAP_F_B 1B1
        Step 09: 3B2                  2I2
        Step 10: 0I1                  1I2
        Step 11: 0W1                  2W2
        Step 12: 0I2                  1W2
        Step 13: 0W2                  .
        """,
    ),
    "1f1b_comms": (
        lambda: add_comms(one_f_one_b(2, 2)),
        """
        # shardfn schedule name=1f1b ranks=2 stages=2 microbatches=2 placement=loop
                Rank 0   Rank 1
        Step 0: 0F0      1RECV_F0
        Step 1: 0SEND_F0 1F0
        Step 2: 0F1      1B0
        Step 3: 0SEND_F1 1SEND_B0
        Step 4: 0RECV_B0 1RECV_F1
        Step 5: 0B0      1F1
        Step 6: 0RECV_B1 1B1
        Step 7: 0B1      1SEND_B1
        """,
    ),
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_grids(name):
    make, text = GOLDEN[name]
    assert format(make()) == _golden(text)
    assert parse_schedule(_golden(text)) == make()


def test_parse_schedule_errors():
    with pytest.raises(ValueError, match="no header"):
        parse_schedule("Step 0: 0F0")
    text = "# shardfn schedule name=x ranks=2 stages=2 microbatches=1 placement=loop\nStep 0: 0F0\n"
    with pytest.raises(ValueError, match="one per rank"):
        parse_schedule(text)
    text = "# shardfn schedule name=x ranks=1 stages=1 microbatches=1 placement=loop\nStep 0: 0Q0\n"
    with pytest.raises(ValueError, match="line 2, rank 0"):
        parse_schedule(text)


def test_schedule_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiple of num_ranks"):
        Schedule([[Action(0, "F", 0)], [Action(1, "F", 0)]], 3, 1)
    with pytest.raises(ValueError, match="placement"):
        Schedule([[Action(0, "F", 0)]], 1, 1, "zigzag")
    with pytest.raises(ValueError, match="name"):
        Schedule([[Action(0, "F", 0)]], 1, 1, "loop", "has space")
