"""Shared pytest setup. Fixture modules live in tests/harness/ and are registered here."""

pytest_plugins = ["tests.harness.nvml", "tests.harness.systemd_fixtures", "tests.harness.tabby"]
