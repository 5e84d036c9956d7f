"""The hypothesis profiles (tests/harness/hypothesis_profiles.py), on real pytest sessions: under
ci a test draws the same examples every run, whatever its own @settings; fuzz draws at random;
and no test's own @settings undoes the profile (read from the sources, by public means only)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from tests.harness.hypothesis_profiles import FUZZ_MAX_EXAMPLES

REPO = Path(__file__).resolve().parents[1]

# A test with settings of its own (as most of ours have) that writes down what it drew.
DRAWS = """
import os
from hypothesis import given, settings, strategies as st

@settings(max_examples=30)
@given(st.binary(min_size=8, max_size=8))
def test_draws(value):
    with open(os.environ["HW_DRAWS"], "a") as f:
        f.write(value.hex() + "\\n")
"""

# The same without settings of its own: the profile's number of examples applies.
DRAWS_PLAIN = DRAWS.replace("@settings(max_examples=30)\n", "")

UNDOES = """
from hypothesis import given, settings, strategies as st

@settings(derandomize=False)
@given(st.integers())
def test_random_on_its_own(value):
    pass

@given(st.integers())
@settings(max_examples=5, database=None)
def test_fine_under_ci_but_not_fuzz(value):
    pass

LOOSE = settings(deadline=None, derandomize=True)
"""


def _session(folder: Path, test: str, draws: Path, *args: str) -> subprocess.CompletedProcess[str]:
    path = folder / "test_inner.py"
    path.write_text(test)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-p", "tests.harness.hypothesis_profiles", *args, str(path)],
        cwd=folder,
        env={**os.environ, "PYTHONPATH": str(REPO), "HW_DRAWS": str(draws)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip


def _draws(folder: Path, *args: str, test: str = DRAWS) -> list[str]:
    draws = folder / f"draws-{len(list(folder.glob('draws-*')))}"
    out = _session(folder, test, draws, *args)
    assert out.returncode == 0, out.stdout + out.stderr
    return draws.read_text().splitlines()


def test_ci_draws_the_same_examples_every_run(tmp_path: Path) -> None:
    first, again = _draws(tmp_path), _draws(tmp_path)
    assert len(first) == 30 and len(set(first)) > 1
    assert again == first
    assert _draws(tmp_path, "--hypothesis-profile=ci") == first  # what `make test` names


def test_fuzz_draws_at_random(tmp_path: Path) -> None:
    one, two = (_draws(tmp_path, "--hypothesis-profile=fuzz") for _ in range(2))
    assert len(one) == len(two) == 30  # the test's own number
    assert one != two


def test_fuzz_gives_a_test_without_a_number_of_its_own_more_examples(tmp_path: Path) -> None:
    drawn = _draws(tmp_path, "--hypothesis-profile=fuzz", test=DRAWS_PLAIN)
    assert len(drawn) == FUZZ_MAX_EXAMPLES
    assert len(_draws(tmp_path, test=DRAWS_PLAIN)) == 100  # ci: hypothesis's default


# --- no test undoes the profile ------------------------------------------------------------------

_UNDOING = ("derandomize", "database")


def settings_that_undo_the_profile(source: str) -> list[int]:
    """The lines where a `settings(...)` call (a decorator, or settings kept in a variable) sets
    derandomize or database, or passes **keywords that may. register_profile calls are the
    profiles themselves and are not `settings(...)` calls."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name == "settings" and any(kw.arg in (*_UNDOING, None) for kw in node.keywords):
            lines.append(node.lineno)
    return lines


def test_the_reader_finds_settings_that_undo_the_profile() -> None:
    assert settings_that_undo_the_profile(UNDOES) == [4, 10, 14]
    assert settings_that_undo_the_profile(DRAWS) == []


def test_no_test_undoes_the_profile() -> None:
    """A test's own @settings(derandomize=...) or (database=...) would make it draw at random
    under ci (a landing would depend on the draw) or lose the example database under fuzz."""
    found = [
        f"{path.relative_to(REPO)}:{line}"
        for folder in ("tests", "bench")
        for path in sorted((REPO / folder).rglob("*.py"))
        for line in settings_that_undo_the_profile(path.read_text(encoding="utf-8"))
    ]
    assert found == [], f"set derandomize/database in the profiles, not here: {found}"
