"""`hydra-watchdog demo` end to end: the real daemon, the simulators, every scripted incident."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

INCIDENTS = (
    "boot: no model",
    "crash (exit 1)",
    "leaked VRAM",
    "slow health",
    "sticky /health 503",
    "restart loop",
)


def test_demo_recovers_every_incident_and_prints_the_summary() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hydra_watchdog", "demo"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-2000:]
    summary = out[out.index("== summary") :]
    for name in INCIDENTS:
        row = next(line for line in summary.splitlines() if line.startswith(name))
        assert "NOT RECOVERED" not in row
    # the runbook's actions, each where it belongs
    assert "kill_orphan" in next(r for r in summary.splitlines() if r.startswith("leaked VRAM"))
    assert "stop_unit" in next(r for r in summary.splitlines() if r.startswith("restart loop"))
    slow = next(r for r in summary.splitlines() if r.startswith("slow health"))
    assert slow.split()[-2:] == ["0", "none"]  # slowness alone never restarts
    assert "[backoff_reset]" in out
    assert "\nOK: healthy since " in out  # the status the daemon published
    assert "demo-admin-key" not in out + proc.stderr
