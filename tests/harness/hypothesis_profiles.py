"""Hypothesis profiles, in one place (a pytest plugin; tests/conftest.py registers it).

* ci, the default, and what `make test` names: each test draws the same examples on every run
  (derandomize: the seed comes from the test itself), with no example database and no deadline,
  so that a landing never depends on the draw, on what an earlier run left in .hypothesis/, or on
  how loaded the machine is. A failure prints the blob that reproduces it.
* fuzz, what `make fuzz` names: draws at random, FUZZ_MAX_EXAMPLES examples for a test that sets
  no number of its own (a test's own max_examples stays), and keeps what failed in .hypothesis/
  to try first next time.

Pick one with hypothesis's own `--hypothesis-profile NAME` (or HYPOTHESIS_PROFILE=NAME). A test's
own @settings inherit everything else from the profile; one that set `derandomize` or `database`
would undo it, and tests/test_hypothesis_profiles.py reads every test's source for that.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

FUZZ_MAX_EXAMPLES = 1000  # hypothesis's default is 100

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,  # a shared 2-core machine's timing is no property of the code
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "fuzz",
    derandomize=False,
    deadline=None,
    print_blob=True,
    max_examples=FUZZ_MAX_EXAMPLES,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
