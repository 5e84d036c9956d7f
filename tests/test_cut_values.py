"""Issue 23 item 1: a value cut to fit a line is marked where it was cut, never cut silently.

`kill orphan 3001 (... main.py --port 570)` read as a true command line with port 570, while the
process listened on 57065. Every cut goes through printable.cut: at a word boundary where one
keeps at least half, always marked with "…".
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hydra_watchdog.actions import KillOrphan, Reason, describe
from hydra_watchdog.printable import CUT, cut, one_line
from hydra_watchdog.states import Rule

DEMO_ORPHAN = (
    "/work/main/.venv/bin/python",
    "/tmp/hydra-demo-0z3p6qay/tabbyapi/main.py",
    "--port",
    "57065",
    "--models-dir",
    "/tmp/hydra-demo-0z3p6qay/models",
)


def test_a_cut_falls_between_words_and_is_marked() -> None:
    assert cut("main.py --port 57065", 17) == "main.py --port …"
    assert cut("main.py --port 57065", 100) == "main.py --port 57065"


def test_a_word_longer_than_half_the_room_is_cut_inside_it_and_marked() -> None:
    assert cut("/a/very/long/path/without/spaces", 10) == "/a/very/l…"


@given(st.text(), st.integers(min_value=1, max_value=200))
def test_a_cut_value_is_a_marked_prefix_that_fits(text: str, limit: int) -> None:
    shown = cut(text, limit)
    if shown != text:
        assert shown.endswith(CUT) and len(shown) <= limit
        assert text.startswith(shown[: -len(CUT)])


def test_the_orphan_kill_never_shows_a_cut_port_as_a_port() -> None:
    kill = KillOrphan(3001, 1, DEMO_ORPHAN, 0, Reason(Rule.ORPHAN_CLEANUP, "orphan"))
    said = describe(kill)
    assert said.startswith("kill orphan 3001 (/work/main/.venv/bin/python ")
    assert said.endswith(CUT + ")"), said
    assert "--port 570)" not in said and "--port 570" + CUT not in said


def test_one_line_escapes_then_marks_its_cut() -> None:
    assert one_line("a\nb and then " + "x" * 200, 16) == "a\\nb and then " + CUT
