# ruff: noqa: F811  (pytest fixtures imported from tests/harness are redefined as arguments)
"""`check` and `verify` beside a running daemon (issue 23 review, H3 and M2): what they say of a
model load must be what the daemon does, read from its state (never changed).

The daemon is test_daemon's: the real `run_daemon` with the real adapters, the TabbyAPI simulator
run by the demo's stand-in unit; its load is slowed down by the simulator's control file."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from hydra_watchdog.config import load_config
from hydra_watchdog.policy_state import Finding, PolicyState
from hydra_watchdog.sim.tabby_server import write_control
from hydra_watchdog.states import Phase, Rule, Severity
from tests.harness.nvml import NvmlSim, nvml_sim, nvml_sim_library  # noqa: F401
from tests.harness.tabby import TabbySims, tabby_sim, wait_for  # noqa: F401
from tests.test_cli import _publish, cli, standin  # noqa: F401
from tests.test_daemon import WAIT, Daemons, Node, daemons, node  # noqa: F401
from tests.test_verify import _config, unwrapped, verify

LOAD_SECONDS = 120  # longer than the test: the load is in flight throughout


def _loading(node: Node, daemons: Daemons) -> None:
    write_control(node.control, load_seconds=LOAD_SECONDS)
    daemons.start(node)
    wait_for(lambda: node.phase() is Phase.LOADING, WAIT, "the daemon's load of m1")


def _env(node: Node) -> dict[str, str]:
    return {**os.environ, **node.nvml.env(ld_path=False)}


def _one_line(out: subprocess.CompletedProcess[str]) -> str:
    return re.sub(r"\s+", " ", out.stdout)


def test_check_during_the_daemons_load_says_it_is_in_progress(node: Node, daemons: Daemons) -> None:
    _loading(node, daemons)
    status = cli("status", "--config", str(node.config), env=_env(node))
    check = cli("check", "--config", str(node.config), env=_env(node))
    assert status.returncode == 1, status.stdout + status.stderr
    assert check.returncode == status.returncode, check.stdout + check.stderr
    said = _one_line(check)
    # before: "load_failed: model load failed 1x: the load was lost", and a plan to load again
    assert "lost" not in said, check.stdout
    assert "load failed" not in said, check.stdout
    assert "Loading: m1, started" in said, check.stdout
    assert "makes it" not in said, check.stdout  # its cycle agrees with the daemon's phase
    assert "Plan: nothing" in said, check.stdout
    doc = json.loads(cli("check", "--json", "--config", str(node.config), env=_env(node)).stdout)
    assert doc["phase"] == "loading", doc
    assert not [f for f in doc["findings"] if f["rule"] == "load_failed"], doc["findings"]
    assert node.phase() is Phase.LOADING  # the daemon's load goes on


# --- M2: verify, with no model loaded ----------------------------------------------------------


def test_verify_during_the_daemons_load_waits_for_it_not_critical(
    node: Node, daemons: Daemons
) -> None:
    _loading(node, daemons)
    out = cli("verify", "--config", str(node.config), env=_env(node))
    said = unwrapped(out)
    # before: "FAIL model loaded: none", CRITICAL, while the daemon was loading it
    assert re.search(r"WAIT model loaded: none yet: hydra-watchdog \(pid \d+\) is loading m1", said)
    assert "FAIL" not in said and "CRITICAL" not in said, out.stdout
    assert "not yet" in out.stdout.splitlines()[0], out.stdout
    assert out.returncode == 1, out.stdout
    assert max(map(len, out.stdout.splitlines())) <= 100


def test_verify_with_no_model_and_no_daemon_says_nothing_will_load_it(
    tmp_path: Path, tabby_sim: TabbySims
) -> None:
    sim = tabby_sim.start(flavor="modern")  # no startup model
    out = verify(_config(tmp_path, sim.url, sim.install_dir, sim.models_dir))
    said = unwrapped(out)
    assert out.returncode == 2, out.stdout
    # before: "FAIL model loaded: none", which did not say why that is critical
    assert (
        "FAIL model loaded: none, and nothing will load m1: hydra-watchdog is not running" in said
    ), out.stdout


def test_verify_with_no_model_configured_or_loaded_skips_the_model(
    tmp_path: Path, tabby_sim: TabbySims
) -> None:
    sim = tabby_sim.start(flavor="modern")
    config = _config(tmp_path, sim.url, sim.install_dir, sim.models_dir)
    config.write_text(config.read_text().replace('name = "m1"', 'name = ""'))
    out = verify(config)
    said = unwrapped(out)
    # before: "FAIL model loaded: none", CRITICAL on a node that is to load no model
    assert "SKIP model loaded: none, and no model is configured (model.name)" in said, out.stdout
    assert "FAIL" not in said, out.stdout
    assert out.returncode == 1, out.stdout  # WARNING: the backend and libraries SKIPs that matter


# review-1 item 3: the daemon's phase as its status file says it, a cycle behind what verify sees


@pytest.mark.parametrize(
    ("phase", "result"),
    [
        (Phase.STARTING, "WAIT"),
        (Phase.RECOVERING, "WAIT"),
        (Phase.DOWN, "WAIT"),
        (Phase.HEALTHY, "WAIT"),
        (Phase.BLOCKED, "FAIL"),
        (Phase.PAUSED, "FAIL"),
        (Phase.ESCALATED, "FAIL"),
    ],
)
def test_verify_with_no_model_fails_only_when_the_daemon_will_not_load_it(
    tmp_path: Path, tabby_sim: TabbySims, standin: int, phase: Phase, result: str
) -> None:
    sim = tabby_sim.start(flavor="modern")  # healthy, no model loaded
    config = _config(tmp_path, sim.url, sim.install_dir, sim.models_dir)
    cause = Finding(Rule.DOWN, Severity.CRIT, "refused (the port)")
    _publish(load_config(config), PolicyState(phase=phase, findings=(cause,)), pid=standin)
    out = verify(config)
    [said] = [ln for ln in unwrapped(out).splitlines() if "model loaded:" in ln]
    # before: "FAIL model loaded: none, and nothing will load m1" for any phase but loading and
    # no_model, though the daemon's no_model rule loads m1 on its next cycle
    assert said.split()[0] == result, out.stdout
    who = f"hydra-watchdog (pid {standin}) is {phase.value}"
    if result == "WAIT":
        assert said == f"  WAIT model loaded: none yet: {who}; it loads m1 once it sees none"
        assert out.returncode == 1, out.stdout
    else:
        assert (
            said == f"  FAIL model loaded: none, and nothing will load m1: {who}: {cause.message}"
        )
        assert out.returncode == 2, out.stdout
