"""The watchdog's own resource failures (out of descriptors, memory, threads) are no evidence about
TabbyAPI: no failed probe counted, no restart, verdict UNKNOWN with a "watchdog impaired" finding
(issue 10). Scenario tables on a fake clock, as in test_policy.py."""

from __future__ import annotations

from hydra_watchdog.actions import UnitCommand, UnitVerb
from hydra_watchdog.observation import Canary, Health, HttpResult, Outcome
from hydra_watchdog.states import Phase, Rule, Severity, Verdict
from tests.policy_kit import CFG, Run, obs, ok, refused, unit

EMFILE = "http://127.0.0.1:5000/health not probed: the watchdog is out of file descriptors (EMFILE)"


def impaired(detail: str = EMFILE) -> Health:
    return Health(HttpResult(Outcome.LOCAL_ERROR, 0.0001, None, detail), healthy=False)


def impaired_findings(run: Run) -> list[str]:
    return [f.message for f in run.state.findings if f.rule is Rule.WATCHDOG_IMPAIRED]


def test_local_errors_neither_count_as_failed_probes_nor_restart() -> None:
    assert CFG.tabbyapi.failures_before_down == 3
    run = Run()
    run.step(obs(0))
    assert run.state.phase is Phase.HEALTHY
    assert run.step(obs(1, health=refused())) == ()
    assert run.step(obs(2, health=refused())) == ()
    assert run.state.failures == 2
    for t in range(3, 40):  # far more than failures_before_down
        assert run.step(obs(t, health=impaired())) == ()
        assert run.state.failures == 2  # not counted, not reset: no evidence either way
        assert run.phase() is Phase.UNKNOWN
        assert run.state.phase.verdict is Verdict.UNKNOWN
        [message] = impaired_findings(run)
        assert message.startswith("watchdog impaired: ") and "EMFILE" in message
    assert run.unit_commands() == []
    # Once the watchdog can see again, the third real failure is the one that counts.
    actions = run.step(obs(40, health=refused()))
    assert [(a.verb, a.reason.rule) for a in actions if isinstance(a, UnitCommand)] == [
        (UnitVerb.RESTART, Rule.DOWN)
    ]
    assert "unreachable for 3 probes" in actions[-1].reason.evidence
    assert impaired_findings(run) == []


def test_impaired_observation_never_acts_even_on_a_stopped_unit() -> None:
    run = Run()
    run.step(obs(0))
    stopped = unit("failed", "failed", result="exit-code")
    for t in range(1, 10):
        assert run.step(obs(t, health=impaired(), unit=stopped)) == ()
    assert run.state.phase is Phase.UNKNOWN
    assert run.state.findings[0].rule is Rule.WATCHDOG_IMPAIRED
    assert run.state.findings[0].severity is Severity.ERR
    # Seen again: a failed unit is started at once, as usual.
    actions = run.step(obs(10, health=refused(), unit=stopped))
    assert UnitVerb.START in [a.verb for a in actions if isinstance(a, UnitCommand)]


def test_impaired_cycles_keep_the_healthy_streak_and_then_carry_on() -> None:
    run = Run()
    run.step(obs(0))
    run.step(obs(1, health=impaired()))
    assert run.state.healthy_since == 0  # not broken by a cycle that saw nothing
    run.step(obs(2))
    assert run.state.phase is Phase.HEALTHY
    assert impaired_findings(run) == []


def test_a_canary_the_watchdog_could_not_send_is_no_generation_hang() -> None:
    run = Run()
    run.step(obs(0))
    no_thread = "the watchdog cannot start the canary probe's thread (can't start new thread)"
    canary = Canary(HttpResult(Outcome.LOCAL_ERROR, 0.0, None, no_thread))
    assert run.step(obs(1, health=ok(), canary=canary)) == ()
    assert run.state.phase is Phase.HEALTHY  # /health itself answered
    [message] = impaired_findings(run)
    assert "can't start new thread" in message
