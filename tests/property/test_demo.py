"""The README's main job runs and its verdict is OK (the demo compares against one device itself)."""
from shardfn import demo


def test_demo_sim_matches_reference(capsys):
    assert demo.main(["--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "OK:" in out.splitlines()[-1]
