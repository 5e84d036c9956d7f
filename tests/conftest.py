"""Shared pytest setup. Fixture modules live in tests/harness/ and are registered here;
tests/harness/hypothesis_profiles.py picks the hypothesis profile (ci unless told otherwise)."""

pytest_plugins = [
    "tests.harness.hypothesis_profiles",
    "tests.harness.nvml",
    "tests.harness.systemd_fixtures",
    "tests.harness.tabby",
]
