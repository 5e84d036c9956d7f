"""What the policy remembers of a probe's verdict, and what makes it forget (issue 23 items 1,
5 and 6): a key TabbyAPI refused for loading, a "no model" that is up to a minute old, and the
verdicts that belong to TabbyAPI's process (a permanent load error, a stall) where no unit can
be asked."""

from __future__ import annotations

from dataclasses import replace

from hydra_watchdog.actions import Action, LoadModel, ResultStatus
from hydra_watchdog.errors import ErrorKind
from hydra_watchdog.observation import (
    KeyView,
    Observation,
    Outcome,
    Probe,
    ProcessInfo,
    ProcessRole,
)
from hydra_watchdog.policy_state import CanaryVerdict
from hydra_watchdog.states import Phase, Rule, Severity
from tests.policy_kit import (
    PORT,
    Run,
    canary,
    config,
    model,
    obs,
    ports,
    proc,
    refused,
    result,
    unit,
)


def _loads(actions: tuple[Action, ...]) -> list[str]:
    return [a.model for a in actions if isinstance(a, LoadModel)]


def _key(stamp: str) -> KeyView:
    return KeyView("the file /etc/k", stamp)


# --- item 1: a key that reads but cannot load --------------------------------------------------


def _refused_once(run: Run, stamp: str = "a") -> None:
    acts = run.step(obs(0, model=model(None), admin_key=_key(stamp)))
    load = next(a for a in acts if isinstance(a, LoadModel))
    words = "load refused: HTTP 401: Invalid admin key"
    refused = result(load, ResultStatus.FAILED, words, 1, ErrorKind.UNAUTHORIZED)
    run.step(obs(1, model=model(None), admin_key=_key(stamp), results=(refused,)))


def test_a_load_refused_401_is_not_sent_again_until_the_key_changes() -> None:
    run = Run()
    _refused_once(run)
    later = [run.step(obs(t, model=model(None), admin_key=_key("a"))) for t in range(2, 200, 5)]
    assert not [m for acts in later for m in _loads(acts)]  # nor the fallback: the same key
    assert run.phase() is Phase.BLOCKED
    finding = next(f for f in run.state.findings if f.rule is Rule.ADMIN_KEY_REJECTED)
    assert finding.severity is Severity.CRIT
    assert "the key from the file /etc/k" in finding.message
    assert "accepted for reading (/v1/model) but not for loading" in finding.message
    assert "api_key, not its admin_key" in finding.message
    assert "read again when it changes" in finding.message
    assert run.state.cause == finding.message  # the state change cites this rule

    # The key file was replaced: loads go out again at once.
    assert _loads(run.step(obs(200, model=model(None), admin_key=_key("b")))) == ["M"]
    assert not any(f.rule is Rule.ADMIN_KEY_REJECTED for f in run.state.findings)


def test_a_refused_key_is_tried_again_on_a_new_tabbyapi_process() -> None:
    run = Run()
    _refused_once(run)
    assert _loads(run.step(obs(2, model=model(None), admin_key=_key("a")))) == []
    assert len(_loads(tuple(run.actions))) == 1
    restarted = replace(unit(), invocation_id="inv-2")
    acts = run.step(obs(3, model=model(None), admin_key=_key("a"), unit=restarted))
    assert _loads(acts) == ["M"]


def test_a_refused_key_blocks_nothing_while_a_model_is_loaded() -> None:
    run = Run()
    _refused_once(run)
    run.step(obs(2, model=model("M"), admin_key=_key("a"), canary=canary(Outcome.OK)))
    # not BLOCKED: TabbyAPI serves; a WARNING, as its finding is (a lost model stays lost)
    assert run.phase() is Phase.DEGRADED


def test_a_credential_says_it_is_read_at_start() -> None:
    run = Run()
    _refused_once(run)
    copied = KeyView("the systemd credential 'admin_key'", "a", live=False)
    run.step(obs(2, model=model(None), admin_key=copied))
    finding = next(f for f in run.state.findings if f.rule is Rule.ADMIN_KEY_REJECTED)
    assert "copied at start: restart hydra-watchdog" in finding.message


# --- item 5: a "no model" up to a minute old -------------------------------------------------


def test_a_load_waits_for_a_fresh_answer_and_asks_for_it() -> None:
    run = Run()
    stale = replace(model(None), fresh=False)
    assert _loads(run.step(obs(0, model=stale))) == []
    assert Probe.MODEL in run.state.wants
    assert _loads(run.step(obs(1, model=model(None)))) == ["M"]


def test_a_blocked_load_asks_for_no_fresh_answer() -> None:
    run = Run(cfg=config(model={"fallback": ""}))
    load = next(a for a in run.step(obs(0, model=model(None))) if isinstance(a, LoadModel))
    failed = result(load, ResultStatus.FAILED, "not installed", 1, ErrorKind.LOAD_PERMANENT)
    run.step(obs(1, model=model(None), results=(failed,)))
    assert run.phase() is Phase.BLOCKED
    for t in range(2, 20):  # no load would go out: the answer a minute old is good enough
        assert run.step(obs(t, model=replace(model(None), fresh=False))) == ()
        assert Probe.MODEL not in run.state.wants


# --- item 6: verdicts keyed to TabbyAPI's process --------------------------------------------


NO_SYSTEMD = replace(unit(available=False), invocation_id="", main_pid=None)


def _by_hand(pid: int) -> ProcessInfo:
    """TabbyAPI started by hand: its listener, outside any unit (the scanner's ORPHAN)."""
    return proc(pid, ProcessRole.ORPHAN, listens=(PORT,))


def _seen(at: float, listener: ProcessInfo | None, **kw: object) -> Observation:
    procs = (listener,) if listener is not None else ()
    owners = ports((PORT, listener.pid)) if listener is not None else ports()
    return obs(at, unit=NO_SYSTEMD, processes=procs, port=owners, **kw)


def test_without_systemd_a_permanent_failure_ends_with_its_process() -> None:
    run = Run()
    first = _by_hand(200)
    load = next(a for a in run.step(_seen(0, first, model=model(None))) if isinstance(a, LoadModel))
    words = "Backend 'exllamav2' selected, but required dependencies are not installed."
    failed = result(load, ResultStatus.FAILED, words, 1, ErrorKind.LOAD_PERMANENT)
    run.step(_seen(1, first, model=model(None), results=(failed,)))
    assert [p.model for p in run.state.permanent] == ["M"]
    # Nothing listening for a while (restarted by hand), then the same process again: unknown
    # is no change, and the verdict stands.
    run.step(_seen(2, None, health=refused()))
    run.step(_seen(3, first, model=model("F")))
    assert [p.model for p in run.state.permanent] == ["M"]
    # A new process (another pid, or the same pid with other start ticks): tried again.
    reborn = replace(first, start_ticks=first.start_ticks + 1)
    acts = run.step(_seen(4, reborn, model=model(None)))
    assert run.state.permanent == ()
    assert _loads(acts) == ["M"]


def test_without_systemd_a_stall_ends_with_its_process() -> None:
    run = Run()
    first = _by_hand(200)
    verdicts = []
    for at, listener, probe in ((0, first, canary(Outcome.TIMEOUT)), (1, first, None)):
        run.step(_seen(at, listener, canary=probe))
        verdicts.append(run.state.canary_verdict)
    run.step(_seen(2, _by_hand(300)))  # another process: its generation is not known yet
    verdicts.append(run.state.canary_verdict)
    assert verdicts == [CanaryVerdict.STALLED, CanaryVerdict.STALLED, CanaryVerdict.UNVERIFIED]


def test_systemd_unreachable_for_a_while_forgets_no_verdict() -> None:
    run = Run()
    load = next(a for a in run.step(obs(0, model=model(None))) if isinstance(a, LoadModel))
    failed = result(load, ResultStatus.FAILED, "not installed", 1, ErrorKind.LOAD_PERMANENT)
    run.step(obs(1, model=model(None), results=(failed,)))
    run.step(obs(2, model=model("F"), unit=NO_SYSTEMD, processes=()))
    run.step(obs(3, model=model("F")))  # systemd back, the same invocation
    assert [p.model for p in run.state.permanent] == ["M"]
