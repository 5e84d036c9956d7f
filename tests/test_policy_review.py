"""Issue 23's review ("every verdict true"), the policy's part: a recovery that cannot end with
no model configured (H1), a hang left to a human while a restart would fail (H2), a rejected key
whose finding is graver than the verdict (M1). On a fake clock, no processes."""

from __future__ import annotations

from dataclasses import replace

from hydra_watchdog.incidents import AlertClass, alert_for, human_needed
from hydra_watchdog.observation import Canary, HttpResult, KeyView, Outcome, Probe
from hydra_watchdog.policy_state import CanaryVerdict, PolicyState
from hydra_watchdog.states import Phase, Rule, Severity, Verdict
from tests.policy_kit import MAIN, Run, canary, config, model, obs, ok, unit
from tests.test_probe_verdicts import _refused_once
from tests.test_rebuild_policy import NEW, _switched_with_broken_libraries
from tests.test_status_report import build

# a journald priority is graver the lower it is; a phase's verdict must be at least as grave
_AT_LEAST = {Verdict.OK: Severity.NOTICE, Verdict.WARNING: Severity.WARNING}


def _worst(state: PolicyState) -> Severity:
    return min((f.severity for f in state.findings), key=lambda s: s.priority)


def _restarted_by_hand(at: float, loaded: str | None) -> dict[str, object]:
    """TabbyAPI's process replaced (a new invocation, a new main process)."""
    return {
        "model": model(loaded),
        "unit": replace(unit(enter=at - 0.5), invocation_id="inv-2"),
        "processes": (replace(MAIN, start_ticks=99_999),),
    }


# --- H1: model.name = "", the watchdog only watches --------------------------------------------


WATCH_ONLY = config(model={"name": "", "fallback": ""})


def test_with_no_model_configured_or_loaded_a_restart_ends_healthy_saying_no_canary_ran() -> None:
    run = Run(cfg=WATCH_ONLY)
    run.step(obs(0, model=model(None)))
    for t in (1, 2, 3):
        run.step(obs(t, **_restarted_by_hand(1, None)))
    # before: RECOVERING for ever, waiting for a canary that only goes to a loaded model
    assert run.phase() is Phase.HEALTHY
    assert run.state.canary_verdict is CanaryVerdict.UNVERIFIED  # nothing has passed
    [skip] = [f for f in run.state.findings if f.rule is Rule.CANARY_PENDING]
    assert skip.message.startswith("canary SKIP after TabbyAPI's restart (a new process): ")
    assert "no model is configured (model.name) and none is loaded" in skip.message
    assert "pass" not in skip.message and skip.severity is Severity.NOTICE
    assert Probe.CANARY not in run.state.wants  # nothing to send it to
    assert not run.state.wants & {Probe.JOURNAL, Probe.LIBRARIES}  # not troubled any more


def test_with_no_model_configured_a_model_loaded_by_hand_gets_its_canary() -> None:
    run = Run(cfg=WATCH_ONLY)
    run.step(obs(0, model=model(None)))
    run.step(obs(1, **_restarted_by_hand(1, None)))
    run.step(obs(2, **_restarted_by_hand(1, "X")))
    assert run.phase() is Phase.RECOVERING
    assert Probe.CANARY in run.state.wants
    [wait] = [f for f in run.state.findings if f.rule is Rule.CANARY_PENDING]
    assert wait.message.startswith("waiting for a 1-token completion to pass")
    run.step(obs(3, **_restarted_by_hand(1, "X"), canary=canary(Outcome.OK)))
    assert run.phase() is Phase.HEALTHY
    assert not [f for f in run.state.findings if f.rule is Rule.CANARY_PENDING]


def test_with_no_model_configured_or_loaded_slow_health_is_a_warning_not_ok() -> None:
    """The canary SKIP settles nothing a slow /health says: review-1 item 2 (canary_impossible
    sat before slow and settled HEALTHY under a slow_health warning)."""
    run = Run(cfg=WATCH_ONLY)
    run.step(obs(0, model=model(None)))
    for t in range(1, 8):  # restarted by hand (the canary is owed), then /health at 2.5 s
        run.step(obs(t, **_restarted_by_hand(1, None), health=ok(latency=2.5)))
    assert run.state.canary_verdict is CanaryVerdict.UNVERIFIED
    [slow] = [f for f in run.state.findings if f.rule is Rule.SLOW_HEALTH]
    assert "took 2500 ms" in slow.message
    assert run.phase() is Phase.DEGRADED and run.phase().verdict is Verdict.WARNING
    _assert_verdict_covers_findings(run.state)
    for t in range(8, 11):  # fast again: healthy on /health alone, the canary still skipped
        run.step(obs(t, **_restarted_by_hand(1, None)))
    assert run.phase() is Phase.HEALTHY
    assert run.state.canary_verdict is CanaryVerdict.UNVERIFIED


# --- H2: a hang while a restart would fail ---------------------------------------------------


def test_a_hang_while_a_restart_would_fail_is_blocked_for_a_human_naming_both() -> None:
    run = Run()
    _switched_with_broken_libraries(run)
    for t in (2, 3):
        assert run.step(obs(t, system=NEW, canary=canary(Outcome.TIMEOUT))) == ()
    last = obs(4, system=NEW)
    assert run.step(last) == ()  # no restart: it would fail
    # before: DEGRADED (WARNING), no human, no alert, under a CRIT generation_hang
    assert run.phase() is Phase.BLOCKED and run.phase().verdict is Verdict.CRITICAL
    assert human_needed(run.state)
    assert alert_for(run.state, last) is AlertClass.DOWN  # no completion is served
    [deferred] = [f for f in run.state.findings if f.subject == "deferred"]
    assert deferred.rule is Rule.RESTART_WILL_FAIL
    assert deferred.message.startswith("completions stall or fail (the canary): not restarting")
    assert "a restart would fail (libcudart.so.12 not found)" in deferred.message
    assert "restart it by hand" in deferred.message
    assert run.state.cause == deferred.message  # the change of phase cites it


def test_the_hang_passing_while_a_restart_would_fail_leaves_a_warning_only() -> None:
    run = Run()
    _switched_with_broken_libraries(run)
    run.step(obs(2, system=NEW, canary=canary(Outcome.TIMEOUT)))
    run.step(obs(3, system=NEW, canary=canary(Outcome.OK)))
    assert run.phase() is Phase.DEGRADED
    assert not human_needed(run.state)


# --- M1: a rejected admin key, and the verdict ------------------------------------------------


def _key(stamp: str) -> KeyView:
    return KeyView("the file /etc/k", stamp)


def _refused_then_loaded_by_hand() -> Run:
    run = Run()
    _refused_once(run)
    run.step(obs(2, model=model("M"), admin_key=_key("a"), canary=canary(Outcome.OK)))
    return run


def _assert_verdict_covers_findings(state: PolicyState) -> None:
    verdict = state.phase.verdict
    worst = _worst(state)
    assert verdict is Verdict.CRITICAL or worst.priority >= _AT_LEAST[verdict].priority, (
        verdict,
        [(f.severity, f.rule) for f in state.findings],
    )
    assert build(state).verdict == int(verdict)  # status, check and metrics read this


def test_a_refused_key_with_a_model_loaded_is_a_warning_and_so_is_the_verdict() -> None:
    run = _refused_then_loaded_by_hand()
    # before: HEALTHY (OK) under a CRIT admin_key_rejected
    _assert_verdict_covers_findings(run.state)
    assert run.phase() is Phase.DEGRADED
    [key] = [f for f in run.state.findings if f.rule is Rule.ADMIN_KEY_REJECTED]
    assert key.severity is Severity.WARNING
    assert "(M serves; were it lost, none could be loaded)" in key.message
    assert run.state.cause == key.message


def test_a_canary_refused_401_with_a_model_loaded_is_not_ok() -> None:
    run = Run()
    refused = Canary(HttpResult(Outcome.UNAUTHORIZED, 0.01, 401, "HTTP 401: Invalid API key"))
    run.step(obs(0, canary=refused))
    _assert_verdict_covers_findings(run.state)
    assert run.phase() is Phase.DEGRADED


def test_a_refused_key_with_no_model_loaded_stays_critical() -> None:
    run = Run()
    _refused_once(run)
    run.step(obs(2, model=model(None), admin_key=_key("a")))
    _assert_verdict_covers_findings(run.state)
    assert run.phase() is Phase.BLOCKED
    [key] = [f for f in run.state.findings if f.rule is Rule.ADMIN_KEY_REJECTED]
    assert key.severity is Severity.CRIT and "serves" not in key.message
