"""The alert rules: promtool checks them and runs their unit tests (prometheus/alerts.test.yml)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

PROMETHEUS = Path(__file__).resolve().parent.parent / "prometheus"
RULES = PROMETHEUS / "alerts.yml"
RULE_TESTS = PROMETHEUS / "alerts.test.yml"
PROMTOOL = shutil.which("promtool")

RUNBOOK_ALERTS = {
    "TabbyAPIDown": "critical",
    "TabbyAPINoModel": "warning",
    "TabbyAPIRestartLoop": "critical",
    "TabbyAPISlowHealthCheck": "warning",
}
OWN_ALERTS = {"HydraWatchdogDown", "HydraWatchdogStale", "HydraWatchdogEscalated"}

pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian: prometheus)")


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def alert_blocks(text: str) -> dict[str, str]:
    """alert name -> its rule text (up to the next rule)."""
    parts = re.split(r"^\s*- alert: ", text, flags=re.MULTILINE)[1:]
    return {part.split("\n", 1)[0].strip(): part for part in parts}


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(RULES), cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout


def test_promtool_test_rules() -> None:
    result = promtool("test", "rules", str(RULE_TESTS), cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_the_runbook_severity_and_is_tested_both_ways() -> None:
    blocks = alert_blocks(RULES.read_text())
    assert set(blocks) == set(RUNBOOK_ALERTS) | OWN_ALERTS
    for name, severity in RUNBOOK_ALERTS.items():
        assert f"severity: {severity}" in blocks[name], name
    tests = RULE_TESTS.read_text()
    for name in blocks:
        quiet = re.search(rf"alertname: {name}\n\s+exp_alerts: \[\]", tests)
        fires = re.search(rf"alertname: {name}\n\s+exp_alerts:\n\s+- exp_labels:", tests)
        assert quiet and fires, f"{name} needs a case that fires and one that does not"


@pytest.mark.parametrize(
    ("alert", "old", "new"),
    [
        ("TabbyAPIDown", "for: 1m", "for: 3m"),  # the runbook: over 1 minute
        ("TabbyAPIRestartLoop", ">= 4", ">= 5"),  # the runbook: more than 3 in 10 minutes
        ("TabbyAPIRestartLoop", "[10m]", "[5m]"),
        ("TabbyAPISlowHealthCheck", "> 2", "> 4"),  # the runbook: 2000 ms
        ("HydraWatchdogStale", "> 120", "> 600"),
    ],
)
def test_rule_tests_pin_the_thresholds(tmp_path: Path, alert: str, old: str, new: str) -> None:
    """A rule with a different threshold must fail the unit tests: they test the runbook's
    numbers, not merely that some alert exists."""
    text = RULES.read_text()
    block = alert_blocks(text)[alert]
    assert old in block
    (tmp_path / "alerts.yml").write_text(text.replace(block, block.replace(old, new)))
    shutil.copy(RULE_TESTS, tmp_path / "alerts.test.yml")
    result = promtool("test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert f"alertname: {alert}" in result.stdout + result.stderr
