"""The hypothesis profiles (tests/harness/hypothesis_profiles.py), on real pytest sessions: under
ci a test draws the same examples every run, whatever its own @settings; fuzz draws at random
and more of them; a test whose own settings would undo the profile stops the session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.harness.hypothesis_profiles import FUZZ_SCALE

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

UNDOES = """
from hypothesis import given, settings, strategies as st

@settings(derandomize=False)
@given(st.integers())
def test_random_on_its_own(value):
    pass
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
        timeout=120,
        check=False,
    )  # fmt: skip


def _draws(folder: Path, *args: str) -> list[str]:
    draws = folder / f"draws-{len(list(folder.glob('draws-*')))}"
    out = _session(folder, DRAWS, draws, *args)
    assert out.returncode == 0, out.stdout + out.stderr
    return draws.read_text().splitlines()


def test_ci_draws_the_same_examples_every_run(tmp_path: Path) -> None:
    first, again = _draws(tmp_path), _draws(tmp_path)
    assert len(first) == 30 and len(set(first)) > 1
    assert again == first
    assert _draws(tmp_path, "--hypothesis-profile=ci") == first  # what `make test` names


def test_fuzz_draws_at_random_and_more(tmp_path: Path) -> None:
    one, two = (_draws(tmp_path, "--hypothesis-profile=fuzz") for _ in range(2))
    assert len(one) == len(two) == 30 * FUZZ_SCALE
    assert one != two


def test_a_test_that_undoes_the_profile_stops_the_session(tmp_path: Path) -> None:
    out = _session(tmp_path, UNDOES, tmp_path / "unused")
    assert out.returncode == 4, out.stdout + out.stderr  # pytest's usage error
    assert "test_inner.py::test_random_on_its_own" in out.stderr
    assert "hypothesis profile 'ci'" in out.stderr
