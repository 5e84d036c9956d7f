"""`hydra-watchdog check` without a daemon, and its read-only look at a daemon's memory
(issue 23, item 3; beside a running daemon under real systemd: tests/chaos/test_check_agrees.py).
The screen is golden (tests/golden/check/), regenerated with HYDRA_GOLDEN=regen."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hydra_watchdog.check import _as_seen, _without_daemon
from hydra_watchdog.policy_state import PolicyState
from hydra_watchdog.statefile import STATE_FILE, StateFile
from hydra_watchdog.states import Phase, Verdict
from tests.harness.tabby import ADMIN_KEY, SimProcess, TabbySims
from tests.policy_kit import Run, obs, sticky, unit
from tests.test_cli import cli, write_config

GOLDEN = Path(__file__).resolve().parent / "golden" / "check"
REGEN = os.environ.get("HYDRA_GOLDEN") == "regen"


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary dir whose path has the same length in every run: the simulator's command
    line, cut at 200 characters in the report, is then cut at the same place."""
    path = Path(tempfile.mkdtemp(prefix="hydra-check-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_without_a_daemon_check_says_its_view_is_one_cycles(short_tmp: Path) -> None:
    sims = TabbySims(short_tmp / "sims")
    try:
        _one_cycle(short_tmp, sims.start(flavor="exl2"))
    finally:
        sims.stop_all()


def _one_cycle(tmp_path: Path, sim: SimProcess) -> None:
    key = tmp_path / "admin_key"
    key.write_text(ADMIN_KEY)
    tables: dict[str, Any] = {
        "watchdog": {"state_dir": str(tmp_path / "state"), "runtime_dir": str(tmp_path / "run")},
        "tabbyapi": {
            "url": sim.url,
            "admin_key_file": str(key),
            "venv": "",
            "cmdline_patterns": [str(sim.install_dir)],
        },
        "model": {"name": "m1", "models_dir": str(sim.models_dir), "vram_required_gib": 1.0},
        "gpu": {"nvml_library": str(tmp_path / "no-such-libnvidia-ml.so.1")},
        "metrics": {"listen": ""},
    }
    config = write_config(tmp_path / "config.toml", tables)
    out = cli("check", "--config", str(config))
    # before: "WARNING: loading", a load check only plans, beside verify's CRITICAL (review-1
    # item 1): the phase as seen, what a daemon would do, and verify's verdict on the same node
    assert out.stdout.startswith(
        "CRITICAL: no model (one cycle's view): a daemon would load m1, but none runs\n"
    ), out.stdout
    verified = cli("verify", "--config", str(config))
    assert "FAIL model loaded: none, and nothing will load m1" in verified.stdout, verified.stdout
    assert out.returncode == verified.returncode == 2, out.stdout + out.stderr
    doc = json.loads(cli("check", "--json", "--config", str(config)).stdout)
    assert (doc["verdict"], doc["phase"]) == ("CRITICAL", "no_model"), doc
    assert (
        "View: one cycle's, without a daemon's memory: hydra-watchdog is not running" in out.stdout
    )
    assert "unknown/" not in out.stdout  # the unit line said `unit: tabbyapi.service unknown/`
    assert max(map(len, out.stdout.splitlines())) <= 100
    assert sim.loads() == []  # planned, never executed
    text = re.sub(r"\n {14}(?=\S)", " ", out.stdout)  # one fact a line (see test_verify.golden)
    text = text.replace(str(tmp_path), "/srv/node")
    text = re.sub(rf"\b{sim.port}\b", "5000", text)
    text = re.sub(r"\bpid \d+", "pid N", re.sub(r"\b\d+ ms\b", "N ms", text))
    text = re.sub(r"\b\d\d:\d\d:\d\d\b", "HH:MM:SS", text)
    # the simulator's command line starts with this checkout's interpreter: where it is cut varies
    text = re.sub(r"\S+/python (\S+/main\.py) .*…", r"python \1 …", text)
    if REGEN:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        (GOLDEN / "one-cycle.txt").write_text(text)
    assert text == (GOLDEN / "one-cycle.txt").read_text()


def test_the_daemons_memory_is_read_without_changing_anything(tmp_path: Path) -> None:
    """A state file check cannot use is not moved aside (the daemon's own load does that), and
    a state dir that is not there is not created."""
    state_dir = tmp_path / "state"
    missing = StateFile(state_dir, events_kept=10).load(read_only=True)
    assert missing.state == PolicyState() and not state_dir.exists()
    StateFile(state_dir, events_kept=10).save(PolicyState(phase=Phase.BLOCKED), ())
    (state_dir / STATE_FILE).write_text("{corrupt")
    before = sorted(p.name for p in state_dir.iterdir())
    loaded = StateFile(state_dir, events_kept=10).load(read_only=True)
    assert loaded.state == PolicyState()
    assert loaded.notes and "state.json unusable" in loaded.notes[0]
    assert sorted(p.name for p in state_dir.iterdir()) == before
    assert (state_dir / STATE_FILE).read_text() == "{corrupt"


def test_without_a_daemon_a_restart_check_only_plans_is_no_recovery() -> None:
    """Review: without a daemon, check planned a restart for a sticky 503 and called TabbyAPI
    `recovering` (WARNING), while verify said FAIL health (CRITICAL). Nothing restarts it: it
    is down, and check says what a daemon would do."""
    run = Run()
    run.step(obs(0, unit=unit(n=0)))
    o = obs(1, health=sticky(), unit=unit(n=0))
    actions = run.step(o)
    assert run.state.phase is Phase.RECOVERING  # the daemon's phase: its restart is under way
    seen = _as_seen(run.state, actions, o)
    assert seen is Phase.DOWN
    verdict, why = _without_daemon(seen, actions)
    assert verdict == int(Verdict.CRITICAL)
    assert why == "down (one cycle's view): a daemon would restart tabbyapi.service, but none runs"
