"""Scenario tables for every runbook section, on a fake clock (no processes, no mocks)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable
from dataclasses import replace as dataclasses_replace

import pytest

from hydra_watchdog.actions import (
    Action,
    ActionResult,
    CheckFallbackRoute,
    KillOrphan,
    LoadModel,
    ResetGpu,
    ResultStatus,
    SetPowerLimit,
    UnitCommand,
    UnitVerb,
)
from hydra_watchdog.errors import ErrorKind
from hydra_watchdog.observation import (
    GpuReport,
    Health,
    HostReport,
    NvmlErrorKind,
    Outcome,
    Probe,
    ProcessRole,
)
from hydra_watchdog.policy import (
    OWN_JOB_SETTLE,
    POWER_RETRY_AFTER,
    backoff_delay,
    changed,
    decide,
    vram_needed,
)
from hydra_watchdog.policy_state import PolicyState, RestartOrigin, from_jsonable, to_jsonable
from hydra_watchdog.states import Phase, Rule, Severity, Verdict
from tests.policy_kit import (
    CFG,
    GIB,
    MAIN,
    PORT,
    Run,
    canary,
    config,
    gpus,
    host,
    loading,
    model,
    obs,
    ok,
    ok_results,
    only,
    paused,
    ports,
    proc,
    refused,
    result,
    sticky,
    timeout,
    unit,
)


def rules(actions: Iterable[Action]) -> list[Rule]:
    return [a.reason.rule for a in actions]


def finding_rules(state: PolicyState) -> set[Rule]:
    return {f.rule for f in state.findings}


# --- TabbyAPIDown -------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", [refused, timeout], ids=["refused", "hang"])
def test_down_needs_failures_before_down_probes_then_restarts(
    fault: Callable[[], Health],
) -> None:
    run = Run()
    run.step(obs(0))
    assert run.state.phase is Phase.HEALTHY
    for t in (1, 2):
        assert run.step(obs(t, health=fault())) == ()
    actions = run.step(obs(3, health=fault()))
    assert [(a.verb, a.reason.rule) for a in only(UnitCommand, actions)] == [
        (UnitVerb.RESTART, Rule.DOWN)
    ]
    assert "unreachable for 3 probes" in actions[0].reason.evidence
    assert run.phase() is Phase.RECOVERING
    assert run.state.recovery_started == 3


def test_a_hang_confirmed_within_its_cycle_restarts_in_that_cycle() -> None:
    """observe.py sends confirming probes while the first one hangs: each that failed too is one
    more consecutive failed probe, so failures_before_down (3) is reached in one cycle."""
    run = Run()
    run.step(obs(0))
    actions = run.step(obs(1, health=timeout(), confirmations_failed=2))
    assert [(a.verb, a.reason.rule) for a in only(UnitCommand, actions)] == [
        (UnitVerb.RESTART, Rule.DOWN)
    ]
    assert "unreachable for 3 probes" in actions[0].reason.evidence


def test_one_failed_confirmation_short_of_failures_before_down_is_not_an_outage() -> None:
    run = Run()
    run.step(obs(0))
    assert run.step(obs(1, health=timeout(), confirmations_failed=1)) == ()
    assert run.state.failures == 2
    assert run.step(obs(2)) == ()  # a healthy probe ends the streak
    assert run.state.failures == 0


def test_refused_inside_startup_grace_is_starting_not_down() -> None:
    run = Run()
    # the unit entered active 2 s ago: TabbyAPI loads its startup model before opening the port
    for t in range(0, 8):
        assert run.step(obs(t, health=refused(), unit=unit(enter=-2.0))) == ()
        assert run.state.phase is Phase.STARTING
        assert run.state.failures == 0
    # grace (10 s) over: now refused counts
    actions = [run.step(obs(t, health=refused(), unit=unit(enter=-2.0))) for t in (8, 9, 10)]
    assert [a.verb for acts in actions for a in only(UnitCommand, acts)] == [UnitVerb.RESTART]


def test_timeouts_inside_grace_still_count() -> None:
    """Only refused connections mean "starting": a process that accepts and hangs is down."""
    run = Run()
    for t in (0, 1):
        assert run.step(obs(t, health=timeout(), unit=unit(enter=-1.0))) == ()
    assert run.unit_commands() == []
    acts = run.step(obs(2, health=timeout(), unit=unit(enter=-1.0)))
    assert [a.verb for a in only(UnitCommand, acts)] == [UnitVerb.RESTART]


@pytest.mark.parametrize(
    ("state", "verbs"),
    [
        (unit("failed", "failed", result="exit-code"), [UnitVerb.RESET_FAILED, UnitVerb.START]),
        (unit("inactive", "dead"), [UnitVerb.START]),
    ],
)
def test_stopped_unit_is_started_at_once(state: object, verbs: list[UnitVerb]) -> None:
    run = Run()
    actions = run.step(obs(0, health=refused(), unit=state))
    assert [a.verb for a in only(UnitCommand, actions)] == verbs
    assert run.state.phase is Phase.RECOVERING


def test_failed_unit_result_is_diagnosed() -> None:
    run = Run()
    run.step(obs(0, health=refused(), unit=unit("failed", "failed", result="oom-kill")))
    messages = " ".join(f.message for f in run.state.findings)
    assert "Result=oom-kill" in messages and "OOM-killed" in messages


def test_sticky_503_restarts_immediately_with_the_issue_as_evidence() -> None:
    run = Run()
    actions = run.step(obs(0, health=sticky()))
    assert [(a.verb, a.reason.rule) for a in only(UnitCommand, actions)] == [
        (UnitVerb.RESTART, Rule.STICKY_UNHEALTHY)
    ]
    assert "illegal memory access" in actions[0].reason.evidence


def test_systemd_auto_restart_is_left_to_systemd() -> None:
    run = Run()
    for t in range(6):
        assert run.step(obs(t, health=refused(), unit=unit("activating", "auto-restart"))) == ()
    assert run.state.phase is Phase.DOWN


def test_no_systemd_blocks_instead_of_acting() -> None:
    run = Run()
    for t in range(4):
        acts = run.step(obs(t, health=refused(), unit=unit(available=False, enter=None)))
    assert acts == ()
    assert run.state.phase is Phase.BLOCKED
    assert any("systemd unavailable" in f.message for f in run.state.findings)


def test_missing_unit_blocks() -> None:
    run = Run()
    assert run.step(obs(0, health=refused(), unit=unit("inactive", "dead", load="not-found"))) == ()
    assert run.state.phase is Phase.BLOCKED
    assert any("does not exist" in f.message for f in run.state.findings)


def test_missing_libraries_block_restarts_until_fixed() -> None:
    run = Run()
    broken = host(missing_libraries=("libcudart.so.12",))
    for t in range(6):
        assert (
            run.step(
                obs(
                    t,
                    health=refused(),
                    unit=unit("failed", "failed", result="exit-code"),
                    host=broken,
                )
            )
            == ()
        )
    assert run.state.phase is Phase.BLOCKED
    finding = next(f for f in run.state.findings if f.rule is Rule.MISSING_LIBRARIES)
    assert finding.severity is Severity.CRIT and "libcudart.so.12" in finding.message
    assert Probe.LIBRARIES in run.state.wants  # keeps re-checking
    fixed = run.step(
        obs(
            6,
            health=refused(),
            unit=unit("failed", "failed", result="exit-code"),
            host=host(missing_libraries=()),
        )
    )
    assert [a.verb for a in only(UnitCommand, fixed)] == [UnitVerb.RESET_FAILED, UnitVerb.START]


def test_down_with_leaked_vram_runs_full_recovery_in_runbook_order() -> None:
    cfg = config(gpu_reset={"enabled": True})
    orphan = proc(300, ProcessRole.ORPHAN, gpu_gib=18.0)
    run = Run(cfg=cfg)
    o = dict(
        health=timeout(), processes=(MAIN, orphan), gpus=gpus(free0=10.0, procs0=((300, 18.0),))
    )
    run.step(obs(0, **o))
    run.step(obs(1, **o))
    actions = run.step(obs(2, **o))
    kinds = [(type(a).__name__, getattr(a, "verb", None)) for a in actions]
    assert kinds == [
        ("UnitCommand", UnitVerb.STOP),
        ("KillOrphan", None),
        ("ResetGpu", None),
        ("UnitCommand", UnitVerb.START),
    ]
    assert all(a.reason.rule is Rule.FULL_RECOVERY for a in actions)
    kill = actions[1]
    assert isinstance(kill, KillOrphan)
    assert (kill.pid, kill.start_ticks, kill.uid) == (300, orphan.start_ticks, orphan.uid)
    assert isinstance(actions[2], ResetGpu) and actions[2].gpu_index == 0


def test_gpu_reset_never_when_a_foreign_process_uses_the_gpu() -> None:
    cfg = config(gpu_reset={"enabled": True})
    orphan = proc(300, ProcessRole.ORPHAN, gpu_gib=18.0)
    other = proc(400, ProcessRole.FOREIGN, "blender", gpu_gib=2.0)
    run = Run(cfg=cfg)
    o = dict(
        health=refused(),
        unit=unit("failed", "failed", result="exit-code"),
        processes=(orphan, other),
        gpus=gpus(free0=10.0, procs0=((300, 18.0), (400, 2.0))),
    )
    actions = run.step(obs(0, **o))
    assert not any(isinstance(a, ResetGpu) for a in actions)
    assert not any(isinstance(a, KillOrphan) and a.pid == 400 for a in actions)


def test_full_recovery_does_not_start_without_the_models_mount() -> None:
    orphan = proc(300, ProcessRole.ORPHAN, gpu_gib=18.0)
    run = Run()
    o = dict(
        health=refused(),
        unit=unit("failed", "failed", result="exit-code"),
        processes=(orphan,),
        host=host(models_dir_ok=False, models_dir_detail="not a mount point"),
    )
    actions = run.step(obs(0, **o))
    assert [type(a) for a in actions] == [KillOrphan]
    assert run.state.phase is Phase.BLOCKED


# --- TabbyAPIRestartLoop ------------------------------------------------------------------------


def test_systemd_restart_loop_stops_and_backs_off_exponentially() -> None:
    run = Run()
    down = dict(health=refused())
    run.step(obs(0, unit=unit(n=0)))
    # systemd restarts it 4 times within the window; each restart inside grace looks "starting"
    for i, t in enumerate((5, 10, 15), start=1):
        assert run.step(obs(t, unit=unit("activating", "auto-restart", n=i), **down)) == ()
    actions = run.step(obs(20, unit=unit("activating", "auto-restart", n=4), **down))
    assert [(a.verb, a.reason.rule) for a in only(UnitCommand, actions)] == [
        (UnitVerb.STOP, Rule.RESTART_LOOP)
    ]
    assert "4 restarts within 1m" in actions[0].reason.evidence
    assert run.state.phase is Phase.BACKOFF
    assert (run.state.backoff_step, run.state.backoff_until) == (1, 25.0)

    stopped = unit("inactive", "dead", n=4)
    assert run.step(obs(22, unit=stopped, **down)) == ()  # waits out step 1
    attempt = run.step(obs(25, unit=stopped, **down))
    assert [(a.verb, a.reason.rule) for a in only(UnitCommand, attempt)] == [
        (UnitVerb.START, Rule.BACKOFF_ATTEMPT)
    ]
    assert run.phase() is Phase.RECOVERING

    # the attempt crashes again: stop, step 2 waits twice as long
    again = run.step(obs(27, unit=unit("activating", "auto-restart", n=1), **down))
    assert [a.verb for a in only(UnitCommand, again)] == [UnitVerb.STOP]
    assert (run.state.backoff_step, run.state.backoff_until) == (2, 27.0 + 10.0)
    assert any(
        f.rule is Rule.RESTART_LOOP and f.severity is Severity.CRIT for f in run.state.findings
    )


def test_backoff_delays_grow_and_cap() -> None:
    assert [backoff_delay(i, CFG) for i in range(1, 7)] == [5, 10, 20, 40, 40, 40]
    assert backoff_delay(10_000, CFG) == 40  # no overflow after days in a loop


def test_one_start_per_backoff_step_and_recovery_resets_after_healthy_time() -> None:
    run = Run(
        state=PolicyState(phase=Phase.BACKOFF, backoff_step=3, backoff_until=100.0, loop_since=50.0)
    )
    stopped = dict(health=refused(), unit=unit("inactive", "dead"))
    for t in range(90, 100):
        assert run.step(obs(t, **stopped)) == ()
    assert len(run.step(obs(100, **stopped))) == 1
    for t in range(101, 105):  # starting, inside grace: no second start
        assert run.step(obs(t, health=refused(), unit=unit(enter=100.5))) == ()
    run.step(obs(105, canary=canary(Outcome.OK)))  # a started TabbyAPI: after a canary
    assert run.state.phase is Phase.HEALTHY and run.state.backoff_step == 3
    run.step(obs(134))
    assert run.state.backoff_step == 3  # 29 s healthy: not yet
    run.step(obs(135))
    assert run.state.backoff_step == 0 and run.state.loop_since is None
    assert Rule.BACKOFF_RESET in finding_rules(run.state)


def test_watchdogs_own_restart_budget_turns_into_a_loop() -> None:
    """Never "just restart again": the 4th outage within the window stops the unit."""
    run = Run()
    t = 0.0
    restarts = 0
    for _ in range(4):
        for _ in range(3):
            acts = run.step(obs(t, health=timeout()))
            restarts += sum(
                1 for a in acts if isinstance(a, UnitCommand) and a.verb is UnitVerb.RESTART
            )
            t += 1
    assert restarts == 3
    assert run.state.phase is Phase.BACKOFF
    assert run.unit_commands(UnitVerb.STOP)


def test_nrestarts_reset_counts_the_new_value() -> None:
    run = Run()
    run.step(obs(0, unit=unit(n=5)))
    run.step(obs(1, unit=unit(n=2)))  # reset by a manual restart, then 2 automatic ones
    assert run.state.restarts_in_window(1, 60, RestartOrigin.SYSTEMD) == 2


def test_escalation_after_escalate_after() -> None:
    cfg = config(fallback_route={"url": "http://127.0.0.1:4000"})
    run = Run(
        cfg=cfg,
        state=PolicyState(phase=Phase.BACKOFF, backoff_step=4, backoff_until=500.0, loop_since=0.0),
    )
    acts = run.step(obs(130, health=refused(), unit=unit("inactive", "dead")))
    assert run.state.phase is Phase.ESCALATED and run.state.escalated
    esc = next(f for f in run.state.findings if f.rule is Rule.ESCALATION)
    assert esc.severity is Severity.CRIT
    assert [type(a) for a in acts] == [CheckFallbackRoute]
    assert Phase.ESCALATED.verdict is Verdict.CRITICAL


def test_escalated_node_loads_the_fallback_model() -> None:
    run = Run(
        state=PolicyState(phase=Phase.RECOVERING, backoff_step=4, escalated=True, loop_since=0.0)
    )
    acts = run.step(obs(200, model=model(None)))
    assert [(a.model, a.reason.rule) for a in only(LoadModel, acts)] == [("F", Rule.FALLBACK_MODEL)]


def test_attempt_deferred_while_a_blocking_cause_remains() -> None:
    run = Run(
        state=PolicyState(phase=Phase.BACKOFF, backoff_step=1, backoff_until=10.0, loop_since=0.0)
    )
    broken = dict(
        health=refused(),
        unit=unit("inactive", "dead"),
        host=host(missing_libraries=("libtorch.so",)),
    )
    for t in range(10, 20):
        assert run.step(obs(t, **broken)) == ()
    acts = run.step(obs(20, health=refused(), unit=unit("inactive", "dead")))
    assert [a.verb for a in only(UnitCommand, acts)] == [UnitVerb.START]


def test_someone_else_starting_the_unit_during_backoff_is_not_restarted() -> None:
    run = Run(
        state=PolicyState(phase=Phase.BACKOFF, backoff_step=2, backoff_until=50.0, loop_since=0.0)
    )
    assert run.step(obs(20, health=refused(), unit=unit(enter=19.0))) == ()
    assert run.state.phase is Phase.RECOVERING
    assert (
        run.step(obs(55, health=refused(), unit=unit(enter=19.0))) == ()
    )  # still in grace? no: counts
    assert run.unit_commands(UnitVerb.RESTART) == []


# --- TabbyAPINoModel ----------------------------------------------------------------------------


def test_no_model_loads_once_and_waits_for_it() -> None:
    run = Run()
    acts = run.step(obs(0, model=model(None)))
    assert [(a.model, a.reason.rule) for a in only(LoadModel, acts)] == [("M", Rule.NO_MODEL)]
    assert "30.0 GiB" not in acts[0].reason.evidence and "52.0 GiB free" in acts[0].reason.evidence
    assert run.state.phase is Phase.LOADING
    for t in range(1, 30):
        in_flight = result(acts[0], ResultStatus.IN_PROGRESS, at=0.5) if t == 1 else None
        o = obs(
            t, model=model(None), load=loading(at=0.0), results=(in_flight,) if in_flight else ()
        )
        assert run.step(o) == ()
        assert run.state.phase is Phase.LOADING
    run.step(obs(30, results=(result(acts[0], at=29.5),)))
    # Loaded, but nothing served yet: a canary first (issue "Say what is true", item 4).
    assert run.phase() is Phase.RECOVERING and Probe.CANARY in run.state.wants
    run.step(obs(31, canary=canary(Outcome.OK)))
    assert run.phase() is Phase.HEALTHY and run.state.load_failures == 0
    assert sum(isinstance(a, LoadModel) for a in run.actions) == 1


def test_failed_loads_back_off_then_fall_back() -> None:
    run = Run()
    t = 0.0
    loads: list[LoadModel] = []
    pending: tuple[ActionResult, ...] = ()
    while len(loads) < 4 and t < 300:
        acts = run.step(obs(t, model=model(None), results=pending))
        pending = ()
        for a in acts:
            if isinstance(a, LoadModel):
                loads.append(a)
                pending = (
                    result(
                        a, ResultStatus.FAILED, "Insufficient VRAM in split for model and cache", t
                    ),
                )
        t += 1
    assert [a.model for a in loads] == ["M", "M", "M", "F"]
    assert loads[-1].reason.rule is Rule.FALLBACK_MODEL
    times = [at for at, _, acts in run.trace if any(isinstance(a, LoadModel) for a in acts)]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] >= 5 and gaps[1] >= 10  # load failures count toward back-off
    assert any("Insufficient VRAM" in f.message for f in run.trace[-2][1].findings)


def test_leaked_vram_by_orphan_is_cleaned_before_the_load() -> None:
    orphan = proc(300, ProcessRole.ORPHAN, gpu_gib=25.0)
    run = Run()
    acts = run.step(
        obs(
            0,
            model=model(None),
            processes=(MAIN, orphan),
            gpus=gpus(free0=5.0, free1=10.0, procs0=((300, 25.0),)),
        )
    )
    assert [(type(a), a.reason.rule) for a in acts] == [(KillOrphan, Rule.ORPHAN_CLEANUP)]
    acts = run.step(obs(1, model=model(None)))  # the orphan is gone, VRAM free again
    assert [type(a) for a in acts] == [LoadModel]


def test_vram_short_because_of_a_foreign_process_refuses_and_falls_back() -> None:
    other = proc(400, ProcessRole.FOREIGN, "python train.py", gpu_gib=20.0)
    run = Run()
    acts = run.step(
        obs(
            0,
            model=model(None),
            processes=(MAIN, other),
            gpus=gpus(free0=6.0, free1=6.0, procs0=((400, 20.0),)),
        )
    )
    assert [a.model for a in only(LoadModel, acts)] == ["F"]
    refusal = next(f for f in run.state.findings if f.rule is Rule.VRAM_CHECK)
    assert "needs 20.0 GiB, 12.0 GiB free" in refusal.message and "pid 400" in refusal.message
    assert not any(isinstance(a, KillOrphan) for a in acts)


def test_nothing_fits_is_blocked_with_the_reason() -> None:
    run = Run()
    for t in range(5):
        assert run.step(obs(t, model=model(None), gpus=gpus(free0=2.0, free1=2.0))) == ()
    assert run.state.phase is Phase.BLOCKED
    assert sum(f.rule is Rule.VRAM_CHECK for f in run.state.findings) == 2


def test_missing_models_mount_never_loops_on_loads() -> None:
    run = Run()
    gone = host(models_dir_ok=False, models_dir_detail="/mnt/models is not a mount point")
    for t in range(20):
        assert run.step(obs(t, model=model(None), host=gone)) == ()
    assert run.state.phase is Phase.BLOCKED
    f = next(f for f in run.state.findings if f.rule is Rule.MODELS_MOUNT)
    assert f.severity is Severity.CRIT and "not a mount point" in f.message
    assert Phase.BLOCKED.verdict is Verdict.CRITICAL


def test_a_models_mount_not_checked_is_unknown_not_missing() -> None:
    # The host check did not answer this cycle (observe.py): no made-up "missing mount" that
    # would block every load and say CRITICAL; the load itself tells whether the model is there.
    run = Run()
    unknown = HostReport(models_dir_ok=None, models_dir_detail="not checked: host timed out")
    actions = run.step(obs(0, model=model(None), host=unknown))
    assert [type(a) for a in actions] == [LoadModel]
    mount = [f for f in run.state.findings if f.rule is Rule.MODELS_MOUNT]
    # said as what it is (not checked: a warning), never as a missing mount
    assert [(f.severity, f.subject) for f in mount] == [(Severity.WARNING, "unchecked")]
    assert "not checked" in mount[0].message
    assert run.state.phase is not Phase.BLOCKED


def test_vram_estimate_from_folder_size_when_not_configured() -> None:
    from dataclasses import replace as dc_replace

    cfg = dc_replace(CFG, model=dc_replace(CFG.model, vram_required_gib=None))
    assert vram_needed(cfg, host().model, fallback=False) == 21 * GIB + 4 * GIB
    assert vram_needed(cfg, None, fallback=False) is None
    bare = dc_replace(cfg, model=dc_replace(cfg.model, estimate_overhead_gib=0.0))
    assert vram_needed(bare, host().model, fallback=False) == 21 * GIB


def test_lost_load_is_counted_and_retried_later() -> None:
    run = Run(state=PolicyState(phase=Phase.LOADING, load_in_flight="M", load_started=0.0))
    assert run.step(obs(1, model=model(None))) == ()  # no progress, no result: it is gone
    assert run.state.load_in_flight == "" and run.state.load_failures == 1
    assert "lost" in run.state.last_load_error


# --- TabbyAPISlowHealthCheck --------------------------------------------------------------------


def test_slow_health_degrades_and_diagnoses_but_never_restarts() -> None:
    run = Run()
    slow_gpus = GpuReport(
        devices=(
            gpus()
            .devices[0]
            .__class__(
                **{
                    **gpus().devices[0].__dict__,
                    "throttle_reasons": ("sw_thermal_slowdown", "hw_slowdown"),
                }
            ),
        )
    )
    for t in range(12):
        acts = run.step(obs(t, health=ok(latency=2.6), gpus=slow_gpus))
        assert not [a for a in acts if isinstance(a, UnitCommand)]
    assert run.state.phase is Phase.DEGRADED
    f = next(f for f in run.state.findings if f.rule is Rule.SLOW_HEALTH)
    assert (
        "2600 ms" in f.message
        and "sw_thermal_slowdown" in f.message
        and "not a reason to restart" in f.message
    )
    assert Probe.CANARY in run.trace[2][1].wants


def test_generation_hang_restarts() -> None:
    run = Run()
    acts = run.step(obs(0, canary=canary(Outcome.TIMEOUT)))
    assert [(a.verb, a.reason.rule) for a in only(UnitCommand, acts)] == [
        (UnitVerb.RESTART, Rule.GENERATION_HANG)
    ]


def test_canary_due_by_interval() -> None:
    run = Run()
    run.step(obs(0))
    assert Probe.CANARY in run.state.wants
    run.step(obs(1, canary=canary(Outcome.OK)))
    assert Probe.CANARY not in run.state.wants
    run.step(obs(31))
    assert Probe.CANARY in run.state.wants


# --- Preventive ---------------------------------------------------------------------------------


def test_power_limits_enforced_on_drift_and_clamped() -> None:
    cfg = config(
        gpu={
            "device": [
                {"index": 0, "power_limit_watts": 700},
                {"index": 1, "power_limit_watts": 300},
            ]
        }
    )
    run = Run(cfg=cfg)
    acts = run.step(obs(0, gpus=gpus(limit0=575.0, limit1=450.0)))
    assert [(a.gpu_index, a.watts) for a in only(SetPowerLimit, acts)] == [(0, 600.0), (1, 300.0)]
    assert "clamped from 700 W" in acts[0].reason.evidence
    assert run.step(obs(1, gpus=gpus(limit0=600.0, limit1=300.4))) == ()


def test_power_permission_denied_is_reported_once_not_retried_every_cycle() -> None:
    run = Run()
    acts = run.step(obs(0, gpus=gpus(limit0=575.0)))
    assert len(acts) == 1
    denied = result(
        acts[0], ResultStatus.FAILED, "NoPermission", at=0.1, error_kind=ErrorKind.NO_PERMISSION
    )
    assert run.step(obs(1, gpus=gpus(limit0=575.0), results=(denied,))) == ()
    for t in range(2, 50):
        assert run.step(obs(t, gpus=gpus(limit0=575.0))) == ()
    assert sum(f.rule is Rule.POWER_LIMIT for f in run.state.findings) == 1
    assert len(run.step(obs(1 + POWER_RETRY_AFTER, gpus=gpus(limit0=575.0)))) == 1


def test_orphan_on_the_port_is_killed_and_the_unit_restarted() -> None:
    orphan = proc(300, ProcessRole.ORPHAN, listens=(PORT,))
    main = proc(100, ProcessRole.MAIN, listens=(PORT + 1,))
    run = Run()
    acts = run.step(obs(0, port=ports((PORT, 300), (PORT + 1, 100)), processes=(orphan, main)))
    assert [(type(a).__name__, a.reason.rule) for a in acts] == [
        ("KillOrphan", Rule.ORPHAN_CLEANUP),
        ("UnitCommand", Rule.PORT_CONFLICT),
    ]
    assert isinstance(acts[1], UnitCommand) and acts[1].verb is UnitVerb.RESTART
    assert any(f"listens on {PORT + 1}" in f.message for f in run.state.findings)


def test_foreign_port_holder_is_never_signalled_and_never_restarted() -> None:
    foreign = proc(555, ProcessRole.FOREIGN, "nc -l 5000", listens=(PORT,))
    main = proc(100, ProcessRole.MAIN, listens=(PORT + 1,))
    run = Run()
    for t in range(30):
        h = timeout() if t % 2 else refused()
        assert (
            run.step(
                obs(
                    t, health=h, port=ports((PORT, 555), (PORT + 1, 100)), processes=(foreign, main)
                )
            )
            == ()
        )
    assert run.state.phase is Phase.BLOCKED
    f = next(f for f in run.state.findings if f.rule is Rule.FOREIGN_HOLDER)
    assert "pid 555" in f.message and "nc -l 5000" in f.message


def test_unknown_port_owner_asks_for_a_scan_and_does_nothing() -> None:
    run = Run()
    assert run.step(obs(0, port=ports((PORT, None)), processes=())) == ()
    assert Probe.PORT_SCAN in run.state.wants


def test_orphan_holding_nothing_is_reported_not_killed() -> None:
    idle = proc(301, ProcessRole.ORPHAN)
    run = Run()
    assert run.step(obs(0, processes=(MAIN, idle))) == ()
    assert any("reported, not killed" in f.message for f in run.state.findings)


def test_orphans_disabled_means_no_kill() -> None:
    cfg = config(orphans={"enabled": False})
    run = Run(cfg=cfg)
    orphan = proc(300, ProcessRole.ORPHAN, gpu_gib=25.0)
    acts = run.step(
        obs(0, model=model(None), processes=(MAIN, orphan), gpus=gpus(free0=1.0, free1=1.0))
    )
    assert not any(isinstance(a, KillOrphan) for a in acts)


# --- maintenance, fallback route, dry run, persistence ------------------------------------------


def test_pause_observes_only_then_resume_recovers() -> None:
    run = Run()
    for t in range(10):
        assert (
            run.step(
                obs(t, health=refused(), unit=unit("failed", "failed"), pause=paused(until=10.0))
            )
            == ()
        )
        assert run.state.phase is Phase.PAUSED
    assert run.state.failures == 10  # observed all along
    acts = run.step(
        obs(10, health=refused(), unit=unit("failed", "failed"), pause=paused(until=10.0))
    )
    assert [a.verb for a in only(UnitCommand, acts)] == [UnitVerb.RESET_FAILED, UnitVerb.START]


def test_fallback_route_checked_once_per_outage() -> None:
    cfg = config(fallback_route={"url": "http://127.0.0.1:4000", "model": "tabby"})
    run = Run(cfg=cfg)
    acts = run.step(obs(0, health=refused(), unit=unit("activating", "auto-restart")))
    checks = [a for a in acts if isinstance(a, CheckFallbackRoute)]
    assert len(checks) == 1 and checks[0].url == "http://127.0.0.1:4000"
    res = result(checks[0], ResultStatus.FAILED, "refused", at=0.5)
    assert (
        run.step(obs(1, health=refused(), unit=unit("activating", "auto-restart"), results=(res,)))
        == ()
    )
    assert any(
        f.rule is Rule.FALLBACK_ROUTE and f.severity is Severity.ERR for f in run.state.findings
    )
    run.step(obs(2))
    acts = run.step(obs(3, health=refused(), unit=unit("activating", "auto-restart")))
    assert any(isinstance(a, CheckFallbackRoute) for a in acts)  # a new outage


def test_dry_run_config_changes_no_decision() -> None:
    from dataclasses import replace as dc_replace

    dry = dc_replace(CFG, watchdog=dc_replace(CFG.watchdog, dry_run=True))
    o = obs(3, health=sticky())
    assert decide(PolicyState(), o, 3, CFG) == decide(PolicyState(), o, 3, dry)


def test_every_action_has_a_reason() -> None:
    run = Run()
    run.step(obs(0, health=sticky()))
    run.step(obs(1, model=model(None)))
    run.step(obs(2, gpus=gpus(limit0=500.0)))
    assert run.actions
    for a in run.actions:
        assert isinstance(a.reason.rule, Rule) and len(a.reason.evidence) > 10


def test_state_survives_json_round_trip_mid_loop() -> None:
    run = Run()
    run.step(obs(0, unit=unit(n=0)))
    run.step(obs(5, health=refused(), unit=unit("activating", "auto-restart", n=5)))
    assert run.state.backoff_step == 1
    raw = json.loads(json.dumps(to_jsonable(run.state)))
    assert from_jsonable(PolicyState, raw) == run.state


def test_nvml_failure_is_a_finding_and_loads_proceed_unchecked() -> None:
    run = Run()
    acts = run.step(
        obs(
            0,
            model=model(None),
            gpus=GpuReport(error=NvmlErrorKind.DRIVER_NOT_LOADED, detail="driver not loaded"),
        )
    )
    assert [type(a) for a in acts] == [LoadModel]
    assert "VRAM not checked" in acts[0].reason.evidence
    assert any("NVML unavailable" in f.message for f in run.state.findings)


def test_findings_do_not_change_while_nothing_changes() -> None:
    """Findings are announced when they appear: a countdown inside one would re-announce it
    every cycle."""
    run = Run(
        state=PolicyState(phase=Phase.BACKOFF, backoff_step=2, backoff_until=50.0, loop_since=0.0)
    )
    stopped = {"health": refused(), "unit": unit("inactive", "dead"), "gpus": gpus(limit0=575.0)}
    acts = run.step(obs(10, **stopped))
    denied = result(
        acts[0], ResultStatus.FAILED, "NoPermission", at=10.1, error_kind=ErrorKind.NO_PERMISSION
    )
    run.step(obs(11, results=(denied,), **stopped))
    first = run.state.findings
    for t in range(12, 40):
        run.step(obs(t, **stopped))
        assert run.state.findings == first


def test_a_fresh_tabbyapi_process_gets_the_main_model_again() -> None:
    run = Run(state=PolicyState(load_failures=5, last_load_error="OOM", invocation_id="old"))
    acts = run.step(obs(0, model=model(None), unit=unit()))  # invocation "inv": a new process
    assert [a.model for a in only(LoadModel, acts)] == ["M"]


def test_without_systemd_no_process_is_treated_as_an_orphan() -> None:
    """No unit cgroup to compare with: a TabbyAPI process on the port may well be the service."""
    maybe = proc(300, ProcessRole.ORPHAN, listens=(PORT,), gpu_gib=25.0)
    run = Run()
    o = {
        "unit": unit(available=False, enter=None),
        "port": ports((PORT, 300)),
        "processes": (maybe,),
    }
    acts = run.step(obs(0, model=model(None), **o))
    assert [type(a) for a in acts] == [LoadModel]
    acts = run.step(obs(1, health=timeout(), **o))
    assert not any(isinstance(a, KillOrphan) for a in run.actions)
    assert not any("orphan" in f.message for f in run.state.findings)


def test_dry_run_power_limit_is_repeated_hourly_not_every_cycle() -> None:
    run = Run()
    acts = run.step(obs(0, gpus=gpus(limit0=575.0)))
    would = result(acts[0], ResultStatus.DRY_RUN, "would set", at=0.1)
    assert run.step(obs(1, gpus=gpus(limit0=575.0), results=(would,))) == ()
    for t in range(2, 30):
        assert run.step(obs(t, gpus=gpus(limit0=575.0))) == ()
    assert not any(f.rule is Rule.POWER_LIMIT for f in run.state.findings)  # nothing failed
    assert len(run.step(obs(1 + POWER_RETRY_AFTER, gpus=gpus(limit0=575.0)))) == 1


def test_a_starting_tabbyapi_is_not_diagnosed_until_its_start_failed_or_outlived_grace() -> None:
    """systemd restarts a crash by itself: while it waits (auto-restart) and while the new
    process loads before opening its port (startup_grace, 10 s here), the journal is not read
    (it would only take CPU from the start); once the grace is over it is."""
    run = Run()
    run.step(obs(0.0))
    run.step(obs(1.0, health=refused(), unit=unit("activating", "auto-restart", n=1)))
    assert Probe.JOURNAL not in run.state.wants
    run.step(obs(2.0, health=refused(), unit=unit(n=1, enter=1.5)))
    assert run.state.phase is Phase.STARTING
    assert Probe.JOURNAL not in run.state.wants
    run.step(obs(13.0, health=refused(), unit=unit(n=1, enter=1.5)))  # grace over: down
    assert Probe.JOURNAL in run.state.wants


def test_the_journal_excerpt_quotes_tabbyapis_last_words_before_pid1s() -> None:
    """PID 1's lines about the exit and the stop come after TabbyAPI's own last words: the
    excerpt quotes TabbyAPI (its Result already says how it ended)."""
    excerpt = (
        "2026-12-01T19:19:02+0000 vm start.sh[278]: loading the model",
        "2026-12-01T19:19:02+0000 vm start.sh[278]: RuntimeError: CUDA out of memory.",
        "2026-12-01T19:19:02+0000 vm systemd[1]: tabbyapi.service: Main process exited",
        "2026-12-01T19:19:02+0000 vm systemd[1]: tabbyapi.service: Failed with result",
        "2026-12-01T19:19:03+0000 vm systemd[1]: Stopped tabbyapi.service.",
        "2026-12-01T19:19:03+0000 vm systemd[1]: tabbyapi.service: Consumed 1.2s CPU time.",
    )
    down = obs(
        0.0, health=refused(), unit=unit("failed", "failed"), host=host(journal_excerpt=excerpt)
    )
    run = Run()
    run.step(down)
    (said,) = [f for f in run.state.findings if f.message.startswith("last log lines")]
    assert "CUDA out of memory" in said.message
    assert "Consumed" not in said.message
    only_pid1 = excerpt[2:]
    run = Run()
    run.step(dataclasses_replace(down, host=host(journal_excerpt=only_pid1)))
    (said,) = [f for f in run.state.findings if f.message.startswith("last log lines")]
    assert "Consumed" in said.message  # nothing of TabbyAPI's: PID 1's lines, rather than none


def test_no_second_start_between_the_restart_jobs_stop_and_its_start() -> None:
    """A restart is a stop, then a start systemd queues once the stop is done: a read in between
    finds the unit inactive with that job pending (seen under real systemd, chaos 02/04). That is
    the watchdog's own restart under way; the same read without a job is a unit to start."""
    run = Run()
    for t in (0.0, 1.0, 2.0):
        acts = run.step(obs(t, health=timeout()))
    assert [a.verb for a in run.unit_commands()] == [UnitVerb.RESTART]
    between = unit("inactive", "dead", job=7)
    assert run.step(obs(2.1, health=refused(), unit=between, results=ok_results(acts, 2.0))) == ()
    assert run.state.phase is Phase.RECOVERING
    assert run.step(obs(2.6, health=refused(), unit=unit(enter=2.5))) == ()  # it started
    assert [a.verb for a in run.unit_commands()] == [UnitVerb.RESTART]


def test_a_job_queued_long_after_the_watchdogs_start_does_not_hold_it_back() -> None:
    """A start job stuck behind a dependency is not the watchdog's restart in flight: past
    OWN_JOB_SETTLE the stopped unit is started as any stopped unit is."""
    run = Run()
    for t in (0.0, 1.0, 2.0):
        acts = run.step(obs(t, health=timeout()))
    later = 2.0 + OWN_JOB_SETTLE + 1.0
    waiting = unit("inactive", "dead", job=7)
    run.step(obs(later, health=refused(), unit=waiting, results=ok_results(acts, 2.0)))
    assert [a.verb for a in run.unit_commands()][-1] is UnitVerb.START


def test_no_second_start_while_the_restart_job_stops_the_old_process() -> None:
    """Restarts go out with --no-block: the next cycle may still see the old process being
    stopped (deactivating). That is the restart under way, not a unit that needs a start."""
    run = Run()
    for t in (0.0, 1.0, 2.0):
        acts = run.step(obs(t, health=timeout()))
    assert [a.verb for a in run.unit_commands()] == [UnitVerb.RESTART]
    stopping = unit("deactivating", "stop-sigterm")
    for t in (2.05, 2.5, 3.0, 3.5):
        assert (
            run.step(obs(t, health=refused(), unit=stopping, results=ok_results(acts, 2.0))) == ()
        )
        assert run.state.phase is Phase.RECOVERING
    assert run.step(obs(4.0, health=refused(), unit=unit(enter=3.9))) == ()  # starting now
    assert [a.verb for a in run.unit_commands()] == [UnitVerb.RESTART]


def test_changed_copies_only_when_a_field_gets_a_new_value() -> None:
    """The policy's replace: the same object when every change is to the value already there
    (also an equal value that is another object), a copy with the change otherwise."""
    state = PolicyState(failures=2, last_failure="refused")
    assert changed(state, failures=2, last_failure="refused") is state
    equal_text = "".join(["ref", "used"])
    assert equal_text is not state.last_failure
    assert changed(state, last_failure=equal_text) is state
    moved = changed(state, failures=state.failures + 1, restarts=())
    assert moved is not state
    assert moved.failures == state.failures + 1
    assert moved == dataclasses_replace(state, failures=state.failures + 1)


def test_the_backoff_attempt_cites_its_own_rule_not_the_journal_lines() -> None:
    """The start after a back-off step is decided by backoff_attempt: the state change cites it,
    not the journal's lines (which say why TabbyAPI is down, and are filed under tabbyapi_down).
    The demo said `[restart_loop] backoff -> recovering: last log lines …` when they were filed
    under the loop."""
    run = Run()
    down = dict(health=refused())
    crash = "RuntimeError: CUDA error: an illegal memory access was encountered"
    excerpt = (f"2026-12-01T19:19:02+0000 hydra-ai python[7]: {crash}",)
    run.step(obs(0, unit=unit(n=0)))
    for i, t in enumerate((5, 10, 15, 20), start=1):
        run.step(obs(t, unit=unit("activating", "auto-restart", n=i), **down))
    assert run.state.phase is Phase.BACKOFF
    stopped = unit("inactive", "dead", n=4)
    run.step(obs(22, unit=stopped, host=host(journal_excerpt=excerpt), **down))
    said = [f for f in run.state.findings if "last log lines" in f.message]
    assert said and all(f.rule is Rule.DOWN for f in said)
    attempt = run.step(obs(25, unit=stopped, **down))
    assert [a.reason.rule for a in only(UnitCommand, attempt)] == [Rule.BACKOFF_ATTEMPT]
    assert run.phase() is Phase.RECOVERING
    assert run.state.cause == only(UnitCommand, attempt)[0].reason.evidence
