"""Hypothesis profiles, in one place (a pytest plugin; tests/conftest.py registers it).

* ci, the default, and what `make test` names: each test draws the same examples on every run
  (derandomize: the seed comes from the test itself), with no example database and no deadline,
  so that a landing never depends on the draw, on what an earlier run left in .hypothesis/, or on
  how loaded the machine is. A failure prints the blob that reproduces it.
* fuzz, what `make fuzz` names: draws at random, FUZZ_SCALE times each test's own max_examples,
  and keeps what failed in .hypothesis/ to try first next time.

Pick one with hypothesis's own `--hypothesis-profile NAME` (or HYPOTHESIS_PROFILE=NAME). Every
hypothesis test collected is checked: one whose own @settings would undo the profile (its
derandomize, or a database under ci) is a usage error naming it, so the profile applies to all.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, is_hypothesis_test, settings

FUZZ_SCALE = 10

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,  # a shared 2-core machine's timing is no property of the code
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("fuzz", derandomize=False, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    profile = settings.get_current_profile_name()
    current = settings()  # the profile loaded now
    undone: list[str] = []
    seen: set[int] = set()
    for item in items:
        test = getattr(item, "obj", None)
        if not isinstance(item, pytest.Function) or not is_hypothesis_test(test):
            continue
        if id(test) in seen:  # the same function, parametrized
            continue
        seen.add(id(test))
        # Where hypothesis keeps a test's settings (read when the test runs); no public API
        # changes them once @settings was applied.
        own = getattr(test, "_hypothesis_internal_use_settings", None)
        if not isinstance(own, settings):
            raise pytest.UsageError(
                f"{item.nodeid}: this hypothesis keeps a test's settings elsewhere; "
                "tests/harness/hypothesis_profiles.py must follow it"
            )
        if own.derandomize != current.derandomize or (
            current.database is None and own.database is not None
        ):
            undone.append(item.nodeid)
        if profile == "fuzz":
            scaled = settings(own, max_examples=own.max_examples * FUZZ_SCALE)
            setattr(test, "_hypothesis_internal_use_settings", scaled)  # noqa: B010
    if undone:
        raise pytest.UsageError(
            f"hypothesis profile {profile!r}: these tests' own @settings undo it (derandomize "
            f"or database): {', '.join(undone)}"
        )
