"""Issue 13: the policy against an oracle, on seeded random traces of a model of the node.

One campaign (HYDRA_ORACLE_TRACES traces, default below; `make fuzz` runs many more) checks every
invariant of tests/oracle/oracle.py at every step; each test here asserts one invariant held on
all of them, and on failure prints the first failing trace, minimised, as a story.

Each of the issue's ten defects was found by this harness on its own before it was fixed; the
tests named after them keep them fixed.
"""

from __future__ import annotations

import ast
import os
import time
from pathlib import Path

import pytest

from tests.oracle.model import Node
from tests.oracle.oracle import (
    BY_NAME,
    CFG,
    INVARIANTS,
    STORIES,
    STORY_BY_NAME,
    Campaign,
    Step,
    run_campaign,
    run_trace,
    shrink,
    story,
)

TRACES = int(os.environ.get("HYDRA_ORACLE_TRACES", "1000"))
SEED = int(os.environ.get("HYDRA_ORACLE_SEED", "13000"))
LENGTH = int(os.environ.get("HYDRA_ORACLE_LENGTH", "40"))


@pytest.fixture(scope="module")
def campaign() -> Campaign:
    started = time.monotonic()
    c = run_campaign(TRACES, seed0=SEED, length=LENGTH)
    failing = ", ".join(f"{k}={v}" for k, v in sorted(c.failing_traces.items()))
    print(
        f"\noracle: {c.traces} traces, {c.steps} steps, {len(INVARIANTS)} invariants, "
        f"{c.checks} trace checks in {time.monotonic() - started:.1f}s; failing: {failing}"
    )
    return c


def holds(c: Campaign, name: str) -> None:
    if name in c.first:
        pytest.fail(c.report(name), pytrace=False)


# --- issue 13's list: what must hold -----------------------------------------------------------


def test_only_restarts_that_ran_count(campaign: Campaign) -> None:
    holds(campaign, "restarts_that_ran")


def test_backoff_advances_only_on_attempts_that_ran(campaign: Campaign) -> None:
    holds(campaign, "backoff_advances_on_attempts")


def test_restart_loop_narration_is_true(campaign: Campaign) -> None:
    holds(campaign, "loop_narration_true")


def test_recovered_is_not_said_of_a_hung_process(campaign: Campaign) -> None:
    holds(campaign, "recovered_not_on_hung")


def test_systemd_restarts_seen_late_are_not_stamped_now(campaign: Campaign) -> None:
    holds(campaign, "systemd_restarts_dated")


def test_no_restart_loop_stop_without_a_loop(campaign: Campaign) -> None:
    holds(campaign, "no_loop_on_few_restarts")


def test_failed_canary_is_evidence(campaign: Campaign) -> None:
    holds(campaign, "failed_canary_is_evidence")


def test_hang_recovery_needs_a_passing_canary(campaign: Campaign) -> None:
    holds(campaign, "hang_recovery_needs_canary")


def test_fallback_is_degraded(campaign: Campaign) -> None:
    holds(campaign, "fallback_degraded")


def test_main_model_is_retried_when_its_blocker_clears(campaign: Campaign) -> None:
    holds(campaign, "main_model_retried")


def test_known_missing_library_blocks_restarts(campaign: Campaign) -> None:
    holds(campaign, "missing_library_blocks")


def test_power_limit_failed_finding_clears_after_retry(campaign: Campaign) -> None:
    holds(campaign, "power_finding_clears")


def test_paused_exactly_while_a_pause_is_requested(campaign: Campaign) -> None:
    holds(campaign, "resume_not_paused")


def test_escalation_is_announced_once(campaign: Campaign) -> None:
    holds(campaign, "escalation_once")


def test_unchanged_cause_is_announced_once(campaign: Campaign) -> None:
    holds(campaign, "unchanged_cause_once")


# --- what held before issue 13, over the richer model ------------------------------------------


def test_action_invariants(campaign: Campaign) -> None:
    holds(campaign, "actions_sane")


def test_dry_run_decides_as_a_real_run(campaign: Campaign) -> None:
    holds(campaign, "dry_run_parity")


def test_persist_and_reload_mid_trace_changes_nothing(campaign: Campaign) -> None:
    holds(campaign, "reload_changes_nothing")


def test_a_trace_shifted_in_time_decides_identically(campaign: Campaign) -> None:
    holds(campaign, "time_shift")


def test_never_ok_while_tabbyapi_demonstrably_fails(campaign: Campaign) -> None:
    holds(campaign, "verdict_not_ok_in_trouble")


# --- issue 23 item 12: what an independent model of the node found ------------------------------


def test_any_restart_needs_a_passing_canary(campaign: Campaign) -> None:
    holds(campaign, "restart_needs_canary")


def test_no_start_before_this_outages_library_check(campaign: Campaign) -> None:
    holds(campaign, "library_check_before_start")


def test_a_check_that_cannot_run_never_blocks_recovery(campaign: Campaign) -> None:
    holds(campaign, "startable_is_started")


def test_an_impaired_watchdog_acts_on_nothing(campaign: Campaign) -> None:
    holds(campaign, "impaired_acts_on_nothing")


def test_the_power_finding_clears_on_target(campaign: Campaign) -> None:
    holds(campaign, "power_finding_on_target")


def test_a_permanent_failure_is_not_retried_as_is(campaign: Campaign) -> None:
    holds(campaign, "permanent_not_retried_as_is")


def test_no_escalation_once_resolved_or_while_paused(campaign: Campaign) -> None:
    holds(campaign, "no_escalation_when_resolved")


def test_main_model_retries_on_the_fallback(campaign: Campaign) -> None:
    holds(campaign, "main_retry_on_fallback")


def test_restart_claims_are_true(campaign: Campaign) -> None:
    holds(campaign, "restart_claims_true")


def test_no_finding_flickers(campaign: Campaign) -> None:
    holds(campaign, "no_flicker")


@pytest.mark.parametrize("name", [s.name for s in STORIES])
def test_each_story_of_issue_23_holds_every_invariant(name: str) -> None:
    """Issue 23 item 12: each class the independent model found, as its minimal trace; it
    broke its invariant on the policy before the fix (and no other may break now)."""
    s = STORY_BY_NAME[name]
    trace = run_trace(s.steps)
    for inv in INVARIANTS:
        failure = inv.check(trace)
        if failure is not None:
            pytest.fail(f"{s.name}:\n" + story(inv, s.steps), pytrace=False)
    assert BY_NAME[s.invariant] in INVARIANTS


def test_every_invariant_has_a_test() -> None:
    source = Path(__file__).read_text()
    missing = [inv.name for inv in INVARIANTS if f'"{inv.name}"' not in source]
    assert not missing


# --- the harness itself ------------------------------------------------------------------------


def test_the_model_does_not_import_the_policy_logic() -> None:
    """The oracle must not share the code it judges: data types only."""
    logic = {"hydra_watchdog.policy", "hydra_watchdog.situation", "hydra_watchdog.findings"}
    for path in Path(__file__).parent.joinpath("oracle").glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module is not None
        }
        if path.name == "model.py":
            assert not imported & (logic | {"hydra_watchdog.vram"}), path
        else:  # the oracle drives decide() and narrate(), and reasons on its own
            assert "hydra_watchdog.situation" not in imported
            assert "hydra_watchdog.findings" not in imported


def test_an_unkillable_orphan_skips_the_restart_behind_it() -> None:
    """The model's executor: a kill that fails skips the rest of the decision."""
    trace = run_trace([Step("orphan_stuck"), Step("tick"), Step("tick"), Step("tick")])
    kills = [
        (r.status.value, next_r.status.value)
        for rec in trace.records
        for r, next_r in zip(rec.results, rec.results[1:], strict=False)
        if r.action.kind == "kill_orphan"
    ]
    assert kills and all(k == ("failed", "skipped") for k in kills)
    assert not [who for _, who in trace.records[-1].node.starts if who == "watchdog"]


def test_systemd_restarts_happen_inside_a_long_gap() -> None:
    """The model's clock: four crashes inside an hour are four restarts at their own times."""
    node = Node(cfg=CFG)
    node.inject("crashes_in_gap", 900.0)
    node.advance(3600.0)
    systemd = [at for at, who in node.starts if who == "systemd"]
    assert len(systemd) == 4 and systemd == sorted(systemd) and systemd[-1] < 3600.0 - 10


def test_a_failure_is_minimised_into_a_story() -> None:
    """Shrinking keeps the failure and drops the noise around it."""
    inv = BY_NAME["resume_not_paused"]
    noisy = [Step("tick"), Step("crash"), Step("tick"), Step("pause"), Step("tick")] * 3
    broken = type(inv)(
        inv.name,
        inv.item,
        inv.text,
        lambda t: next(((r.index, "paused") for r in t.records if r.step.event == "pause"), None),
    )
    small = shrink(broken, noisy)
    assert [s.event for s in small] == ["pause"]
    text = story(broken, small)
    assert "pause" in text and "!!! paused" in text
