"""`hydra-watchdog demo` end to end: the real daemon, the simulators, every scripted incident."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hydra_watchdog.demo import FAST, DemoNode

pytestmark = pytest.mark.slow

INCIDENTS = ("boot", "crash", "leak", "slow", "sticky", "loop")


@pytest.fixture(scope="module")
def demo_run() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hydra_watchdog", "demo"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.fixture
def demo_output(demo_run: subprocess.CompletedProcess[str]) -> str:
    assert demo_run.returncode == 0, demo_run.stdout[-3000:] + demo_run.stderr[-2000:]
    return demo_run.stdout


def test_demo_recovers_every_incident_and_prints_the_summary(
    demo_run: subprocess.CompletedProcess[str],
) -> None:
    proc = demo_run
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-2000:]
    summary = out[out.index("== summary") :]
    rows = {line.split()[0]: line for line in summary.splitlines()[3:] if line.strip()}
    for name in INCIDENTS:
        assert "NOT RECOVERED" not in rows[name]
    # the runbook's actions, each where it belongs
    assert "kill_orphan" in rows["leak"]
    assert "stop_unit" in rows["loop"]
    assert rows["slow"].split()[-2:] == ["0", "none"]  # slowness alone never restarts
    assert "[backoff_reset]" in out
    assert "\nOK: healthy since " in out  # the status the daemon published
    assert "demo-admin-key" not in out + proc.stderr


def test_the_summary_counts_every_restart_as_status_does(demo_output: str) -> None:
    """The crash is restarted by the unit's Restart= (0 by the watchdog); the table counted the
    watchdog's restarts only (0) while the status above said 6. The summary's words are keys."""
    summary = demo_output[demo_output.index("== summary") :]
    rows = {line.split()[0]: line for line in summary.splitlines()[3:] if line.strip()}
    assert "  1 (0 by the watchdog)  " in rows["crash"]
    assert "  1 (1 by the watchdog)  " in rows["sticky"]
    last = summary.strip().splitlines()[-1]
    assert "boot=3" in last and ":=" not in last
    assert max(map(len, demo_output.splitlines())) <= 100


def test_fast_halves_every_duration(tmp_path: Path) -> None:
    normal, fast = DemoNode(tmp_path / "a").config(), DemoNode(tmp_path / "b", FAST).config()
    assert fast.watchdog.interval == normal.watchdog.interval * FAST == 0.25
    assert fast.restart_loop.backoff_initial == normal.restart_loop.backoff_initial * FAST
    assert fast.tabbyapi.slow_threshold == normal.tabbyapi.slow_threshold * FAST
    assert fast.restart_loop.escalate_after == normal.restart_loop.escalate_after * FAST


def test_the_demo_takes_no_config() -> None:
    """It builds its own node and config: --config was accepted and ignored."""
    proc = subprocess.run(
        [sys.executable, "-m", "hydra_watchdog", "demo", "--config", "/etc/hydra-watchdog.toml"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "unrecognized arguments: --config" in proc.stderr
