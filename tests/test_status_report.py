"""The status report: building it from the policy's memory, JSON, rendering, the Nagios verdict."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hydra_watchdog.actions import ActionResult, LoadModel, Reason, ResultStatus
from hydra_watchdog.config import Config, parse_config
from hydra_watchdog.errors import ErrorKind
from hydra_watchdog.events import Event, EventKind
from hydra_watchdog.narrate import narrate
from hydra_watchdog.observation import (
    GpuReport,
    GpuSnapshot,
    Health,
    HostReport,
    HttpResult,
    Listener,
    LoadProgress,
    ModelDir,
    ModelStatus,
    NvmlErrorKind,
    Observation,
    Outcome,
    PauseRequest,
    PortReport,
    PowerInfo,
    ProcessInfo,
    ProcessRole,
    UnitStatus,
)
from hydra_watchdog.policy_state import Finding, PolicyState, RestartOrigin, RestartRecord
from hydra_watchdog.printable import one_line
from hydra_watchdog.report import status
from hydra_watchdog.report.status import (
    PHASES,
    SCHEMA_VERSION,
    VERDICT_NAMES,
    StatusReport,
    from_json,
    replace,
    to_json,
)
from hydra_watchdog.report.status_build import build_status
from hydra_watchdog.report.status_view import (
    GIB,
    daemon_problem,
    evaluate,
    judge,
    process_start,
    render,
    summarize,
)
from hydra_watchdog.states import Phase, Rule, Severity, Verdict
from tests.harness.tabby import wait_for

WALL = 1_750_000_000.0
MONO = 10_000.0  # the same instant on the monotonic clock


def config(**model: object) -> Config:
    return parse_config(
        {
            "model": {"name": "Midnight-Miqu-70B", "fallback": "Small-8B", **model},
            "gpu": {
                "device": [
                    {"index": 0, "power_limit_watts": 450},
                    {"uuid": "GPU-bbbb", "power_limit_watts": 300},
                ]
            },
        }
    )


def gpu(index: int, uuid: str, limit: float, used_gib: int) -> GpuSnapshot:
    return GpuSnapshot(
        index=index,
        uuid=uuid,
        name=f"Sim GPU {index}",
        memory_total=32 * GIB,
        memory_used=used_gib * GIB,
        memory_free=(32 - used_gib) * GIB,
        power=PowerInfo(usage_w=100.0, limit_w=limit),
        errors=(("temperature", NvmlErrorKind.NOT_SUPPORTED),) if index == 1 else (),
    )


def observation(**overrides: Any) -> Observation:
    orphan = ProcessInfo(
        pid=4242,
        start_time=WALL - 900,
        cmdline=("python", "/opt/tabbyapi/main.py"),
        role=ProcessRole.ORPHAN,
        gpu_bytes=20 * GIB,
        listens_on=(5000,),
    )
    main = ProcessInfo(
        pid=100, start_time=WALL - 60, cmdline=("python", "main.py"), role=ProcessRole.MAIN
    )
    base: dict[str, Any] = {
        "at": MONO - 2.0,
        "health": Health(HttpResult(Outcome.REFUSED, 0.001, detail="connection refused"), False),
        "unit": UnitStatus(
            name="tabbyapi.service",
            available=True,
            load_state="loaded",
            active_state="failed",
            sub_state="failed",
            result="exit-code",
            n_restarts=4,
            main_pid=None,
        ),
        "host": HostReport(
            models_dir_ok=True,
            model=ModelDir("Midnight-Miqu-70B", "/mnt/models/m", True, True, 4, 44 * GIB),
        ),
        "model": None,
        "gpus": GpuReport(devices=(gpu(0, "GPU-aaaa", 400.0, 20), gpu(1, "GPU-bbbb", 300.0, 2))),
        "port": PortReport(port=5000, listeners=(Listener(5000, 4242), Listener(5001, None))),
        "processes": (orphan, main),
        "load": None,
        "pause": None,
    }
    base.update(overrides)
    return Observation(**base)


def event(kind: EventKind, message: str, wall: float, **kw: Any) -> Event:
    return Event(
        wall=wall, kind=kind, severity=Severity.NOTICE, message=message, state=Phase.DOWN, **kw
    )


RECENT = (
    event(EventKind.STATE_CHANGED, "down", WALL - 100),
    event(
        EventKind.ACTION,
        "kill orphan 4242 (python /opt/tabbyapi/main.py)",
        WALL - 90,
        rule=Rule.PORT_CONFLICT,
        action="kill_orphan",
        reason="pid 4242 holds port 5000 outside the unit",
    ),
    event(
        EventKind.ACTION_FAILED,
        "restart tabbyapi.service",
        WALL - 80,
        rule=Rule.DOWN,
        action="restart_unit",
        reason="refused 3 times",
    ),
    event(EventKind.DIAGNOSIS, "VRAM held by orphan", WALL - 70),
)

STATE = PolicyState(
    phase=Phase.BACKOFF,
    phase_since=MONO - 300,
    restarts=(
        RestartRecord(MONO - 500, RestartOrigin.SYSTEMD),
        RestartRecord(MONO - 400, RestartOrigin.SYSTEMD),
        RestartRecord(MONO - 200, RestartOrigin.WATCHDOG),
        RestartRecord(MONO - 5000, RestartOrigin.WATCHDOG),  # outside the 10 min window
    ),
    backoff_step=2,
    backoff_until=MONO + 60,
    loop_since=MONO - 300,
    findings=(Finding(Rule.PORT_CONFLICT, Severity.WARNING, "port 5000 held by pid 4242"),),
)


def screen(report: StatusReport, *, now: float) -> str:
    """What `status` prints for `report` at `now` (its daemon alive, no colour)."""
    verdict, why, current = judge(report, wall_now=now, stale_after=60)
    return render(report, verdict, why, now=now, current=current)


def build(
    state: PolicyState = STATE,
    obs: Observation | None = None,
    cfg: Config | None = None,
    recent: tuple[Event, ...] = RECENT,
    **kw: int,
) -> StatusReport:
    return build_status(
        state,
        observation() if obs is None else obs,
        config() if cfg is None else cfg,
        recent,
        wall_now=WALL,
        mono_now=MONO,
        pid=1234,
        **kw,
    )


# --- build ----------------------------------------------------------------------------------------


def test_monotonic_stamps_become_wall_times() -> None:
    report = build()
    assert report.schema == SCHEMA_VERSION
    assert report.generated_at == WALL
    assert report.pid == 1234
    assert report.heartbeat == WALL - 2.0
    assert report.since == WALL - 300
    assert report.backoff.next_attempt_at == WALL + 60
    assert report.backoff.loop_since == WALL - 300


def test_phase_verdict_and_summary() -> None:
    report = build()
    assert report.phase == Phase.BACKOFF
    assert report.verdict == Verdict.CRITICAL
    assert report.summary.startswith("backoff")
    assert "back-off step 2, next start in 60 s" in report.summary
    assert "health refused" in report.summary
    assert "port 5000 held by pid 4242" in report.summary


def test_restarts_counted_inside_the_window_by_who() -> None:
    b = build().backoff
    assert (b.restarts_in_window, b.restarts_by_systemd, b.restarts_by_watchdog) == (3, 2, 1)
    assert b.window_s == 600.0
    assert b.step == 2


def test_gpus_vram_and_power_against_target() -> None:
    g0, g1 = build().gpus
    assert (g0.vram_used_bytes, g0.vram_free_bytes, g0.vram_total_bytes) == (
        20 * GIB,
        12 * GIB,
        32 * GIB,
    )
    assert (g0.power_limit_w, g0.power_target_w) == (400.0, 450.0)  # matched by index
    assert (g1.power_limit_w, g1.power_target_w) == (300.0, 300.0)  # matched by UUID
    assert g1.errors == ("temperature: not_supported",)


def test_vram_needed_estimated_from_the_folder_or_taken_from_config() -> None:
    estimated = build().model
    assert estimated.vram_needed_bytes == 44 * GIB + 4 * GIB
    assert estimated.vram_needed_source == "estimate"
    configured = build(cfg=config(vram_required_gib=48.0)).model
    assert configured.vram_needed_bytes == 48 * GIB
    assert configured.vram_needed_source == "config"
    no_folder = observation(host=HostReport(models_dir_ok=False, models_dir_detail="missing"))
    assert build(obs=no_folder).model.vram_needed_bytes is None


def test_fallback_in_use_is_the_wanted_model() -> None:
    report = build(state=dataclasses.replace(STATE, using_fallback=True))
    assert report.model.wanted == "Small-8B"
    assert report.model.fallback_in_use


def test_listeners_and_only_orphan_or_foreign_processes() -> None:
    report = build()
    assert [(lst.port, lst.pid, lst.role) for lst in report.listeners] == [
        (5000, 4242, "orphan"),
        (5001, None, ""),
    ]
    assert report.listeners[0].command == "python /opt/tabbyapi/main.py"
    assert [(p.pid, p.role) for p in report.processes] == [(4242, "orphan")]


def test_unit_state() -> None:
    unit = build().unit
    assert unit is not None
    assert (unit.active_state, unit.result, unit.n_restarts) == ("failed", "exit-code", 4)


def test_last_actions_with_reasons_only_actions_newest_last() -> None:
    report = build()
    assert [(a.event, a.action) for a in report.actions] == [
        ("action", "kill_orphan"),
        ("action_failed", "restart_unit"),
    ]
    assert report.actions[0].reason == "pid 4242 holds port 5000 outside the unit"
    assert report.actions[0].rule == "port_conflict"
    assert report.actions[0].at == WALL - 90
    assert [a.action for a in build(actions_kept=1).actions] == ["restart_unit"]


def test_load_in_flight_with_progress_and_deadline() -> None:
    state = dataclasses.replace(
        STATE, phase=Phase.LOADING, load_in_flight="Midnight-Miqu-70B", load_started=MONO - 30
    )
    obs = observation(
        health=Health(HttpResult(Outcome.OK, 0.012, status=200), True),
        model=ModelStatus(HttpResult(Outcome.OK, 0.01, 200), None, True),
        load=LoadProgress("Midnight-Miqu-70B", MONO - 30, module=12, modules=80),
    )
    report = build(state=state, obs=obs)
    assert report.load is not None
    assert (report.load.module, report.load.modules) == (12, 80)
    assert report.load.started_at == WALL - 30
    assert report.load.deadline_at == WALL - 30 + 900
    assert "loading Midnight-Miqu-70B 12/80" in report.summary
    assert report.health is not None and report.health.healthy


def test_pause_reason_and_until() -> None:
    obs = observation(pause=PauseRequest("nixos-rebuild", MONO + 3600))
    report = build(state=dataclasses.replace(STATE, phase=Phase.PAUSED), obs=obs)
    assert report.paused.paused
    assert report.paused.reason == "nixos-rebuild"
    assert report.paused.until == WALL + 3600


def test_before_the_first_observation() -> None:
    report = build_status(PolicyState(), None, Config(), (), wall_now=WALL, mono_now=MONO, pid=7)
    assert report.heartbeat is None
    assert report.since is None
    assert report.phase == Phase.UNKNOWN
    assert report.health is None and report.unit is None and report.gpus == ()
    assert evaluate(report, wall_now=WALL, stale_after=60)[0] == Verdict.UNKNOWN


def test_gpu_probe_error_is_reported() -> None:
    obs = observation(
        gpus=GpuReport(error=NvmlErrorKind.LIBRARY_NOT_FOUND, detail="no libnvidia-ml")
    )
    assert build(obs=obs).gpu_error == "library_not_found: no libnvidia-ml"


# --- JSON -----------------------------------------------------------------------------------------


def test_json_round_trip() -> None:
    report = build()
    text = to_json(report)
    assert from_json(text) == report
    raw = json.loads(text)
    assert raw["schema"] == 1
    assert raw["phase"] == "backoff"
    assert raw["verdict"] == 2
    assert raw["gpus"][0]["power_target_w"] == 450.0


def test_from_json_ignores_unknown_fields_and_defaults_missing_ones() -> None:
    raw = json.loads(to_json(build()))
    raw["added_in_a_later_minor"] = {"x": 1}
    raw["backoff"]["new_field"] = 3
    del raw["findings"]
    del raw["model"]["fallback"]
    report = from_json(json.dumps(raw))
    assert report.findings == ()
    assert report.model.fallback == ""
    assert report.backoff.step == 2


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "not valid JSON"),
        ("{truncated", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"phase": "healthy"}', "schema"),
        ('{"schema": 2}', "upgrade"),
        ('{"schema": 0}', "invalid schema"),
        ('{"schema": 1, "phase": "on fire"}', "does not match schema 1"),
        ('{"schema": 1, "heartbeat": "yesterday"}', "does not match schema 1"),
        ('{"schema": 1, "gpus": [{"index": "zero"}]}', "does not match schema 1"),
        (b"\xff\xfe garbage", "not valid JSON"),
        ('{"schema": 1, "heartbeat": NaN}', "NaN is not a number"),
        ('{"schema": 1, "heartbeat": Infinity}', "Infinity is not a number"),
        ('{"schema": 1, "heartbeat": 1e400}', "not a usable number"),
        ('{"schema": 1, "pid": ' + "9" * 400 + "}", "not a usable number"),
        ('{"schema": 1, "pid": ' + "9" * 5000 + "}", "not valid JSON"),
        ('{"schema": ' + "9" * 400 + "}", "upgrade"),
        ('{"schema": 1, "gpus": [{"vram_used_bytes": ' + "9" * 30 + "}]}", "not a usable"),
        ('{"schema": 1, "summary": "\\ud800"}', "not valid UTF-8"),
        ('{"schema": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        ("[" * 100_000, "not valid JSON"),
    ],
)
def test_from_json_garbage_is_a_clear_value_error(text: str | bytes, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        from_json(text)


# --- evaluate -------------------------------------------------------------------------------------


def test_missing_report_is_unknown() -> None:
    verdict, why = evaluate(None, wall_now=WALL, stale_after=60)
    assert verdict == Verdict.UNKNOWN
    assert "not running" in why


def test_stale_report_is_unknown_and_says_why() -> None:
    report = build()
    verdict, why = evaluate(report, wall_now=WALL + 120, stale_after=60)
    assert verdict == Verdict.UNKNOWN
    assert "stale" in why and "122 s ago" in why and "pid 1234" in why


@pytest.mark.parametrize("phase", list(Phase))
def test_fresh_report_verdict_per_phase(phase: Phase) -> None:
    report = build(state=dataclasses.replace(STATE, phase=phase))
    verdict, why = evaluate(report, wall_now=WALL + 1, stale_after=60)
    assert verdict == phase.verdict
    # the caller prints "<VERDICT>: <why>": a why that repeats the name reads "OK: OK: ..."
    assert why.startswith(phase.value.replace("_", " "))
    assert not why.startswith(Verdict(verdict).name)


def test_verdicts_of_key_phases() -> None:
    def verdict_of(phase: Phase) -> int:
        report = build(state=dataclasses.replace(STATE, phase=phase))
        return evaluate(report, wall_now=WALL, stale_after=60)[0]

    assert verdict_of(Phase.HEALTHY) == Verdict.OK
    assert verdict_of(Phase.DEGRADED) == Verdict.WARNING
    assert verdict_of(Phase.DOWN) == Verdict.CRITICAL
    assert verdict_of(Phase.ESCALATED) == Verdict.CRITICAL


# --- render ---------------------------------------------------------------------------------------


def test_the_screen_shows_what_the_runbook_asks_first() -> None:
    obs = observation(pause=PauseRequest("nixos-rebuild", MONO + 3600))
    text = screen(build(obs=obs), now=WALL)
    first = text.splitlines()[0]
    assert first.startswith("CRITICAL: backoff, paused (nixos-rebuild) since ")
    assert "(5 min ago)" in first and "until " in first and "(in 60 min)" in first
    assert "Midnight-Miqu-70B wanted (not read this cycle); needs 48.0 GiB (estimate)" in text
    assert "gpu0 Sim GPU 0: 20.0 of 32.0 GiB used, limit 400 W (target 450 W)" in text
    assert "Port: 5000 held by pid 4242 (orphan)" in text
    assert "Orphan: pid 4242, 20.0 GiB on GPU: python /opt/tabbyapi/main.py" in text
    assert "Back-off: step 2" in text and "(in 60 s)" in text
    assert "3 in the last 10 min (1 by the watchdog, 2 by systemd)" in text
    assert "[warning] port_conflict: port 5000 held by pid 4242" in text
    assert "[port_conflict] kill orphan 4242 (python /opt/tabbyapi/main.py)" in text
    assert "[tabbyapi_down] FAILED restart tabbyapi.service" in text
    assert "Unit: tabbyapi.service failed; result exit-code, NRestarts 4 (systemd's" in text
    assert max(len(line) for line in text.splitlines()) <= 100


def test_each_action_is_one_entry_without_its_reason_repeated() -> None:
    """Issue 23 item 3: an action's entry is when, [rule], what and what came of it; the rule's
    reason is in the journal, and the orphan's command line (in the action) is said once."""
    command = "/srv/venv/bin/python /srv/tabbyapi/main.py --port 57065 --models-dir /srv/models"
    kill = event(
        EventKind.ACTION,
        f"kill orphan 3001 ({one_line(command, 80)}): pid 3001 exited after SIGTERM",
        WALL - 90,
        rule=Rule.ORPHAN_CLEANUP,
        action="kill_orphan",
        reason=f"orphan holds the port or VRAM: pid 3001 {one_line(command)}",
    )
    load = event(
        EventKind.ACTION,
        "load model m1: started",
        WALL - 80,
        rule=Rule.NO_MODEL,
        action="load_model",
        reason="healthy but no model loaded; VRAM 54.3 GiB free, needs 40.0 GiB",
    )
    lines = screen(build(recent=(kill, load)), now=WALL).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("   Actions: "))
    entries = lines[start:]
    assert entries[-1].endswith("[no_model] load model m1: started"), entries
    text = " ".join(line.strip() for line in entries)
    assert text.count("/srv/tabbyapi/main.py") == 1, entries
    assert "because" not in text and "VRAM 54.3 GiB free" not in text
    assert "[orphan_cleanup] kill orphan 3001 (" in text
    assert max(len(line) for line in lines) <= 100


def _load_told(model: str, result: tuple[ResultStatus, ErrorKind, float] | None) -> list[Event]:
    """The events the daemon tells (narrate) for a load it starts, then, a cycle later, for its
    end: `result` is how it ended (None: it still runs)."""
    load = LoadModel(model, None, Reason(Rule.NO_MODEL, "healthy but no model loaded"))
    state, cfg = PolicyState(phase=Phase.LOADING), config()
    started = ActionResult(load, ResultStatus.IN_PROGRESS, "started", MONO)
    told = list(narrate(state, state, (load,), (started,), observation(), config=cfg, wall=WALL))
    if result is not None:
        status_, kind, took = result
        ended = ActionResult(load, status_, "TabbyAPI said so", MONO, kind, took)
        obs = observation(results=(ended,))
        told += narrate(state, state, (), (), obs, config=cfg, wall=WALL + took)
    return told


def test_a_loads_entry_says_how_it_ended() -> None:
    """Review 1 item 10: the load's own record says "started"; how it ended (loaded, failed,
    cancelled) comes cycles later as its own event, and the load's entry carries it."""
    recent = [
        *_load_told("m1", (ResultStatus.OK, ErrorKind.NONE, 0.6)),
        *_load_told("m1", (ResultStatus.FAILED, ErrorKind.CANCELLED, 3.0)),
        *_load_told("m1", (ResultStatus.FAILED, ErrorKind.LOAD_PERMANENT, 0.4)),
        *_load_told("m2", None),
    ]
    report = build(recent=tuple(recent))
    ends = [(a.message, a.outcome, a.duration_s) for a in report.actions]
    assert ends == [
        ("load model m1: started", "ok", 0.6),
        ("load model m1: started", "cancelled", 3.0),
        ("load model m1: started", "failed", 0.4),
        ("load model m2: started", "", None),
    ]
    assert report.actions[0].ended_at == WALL + 0.6
    text = screen(from_json(to_json(report)), now=WALL + 5)
    assert "[no_model] load model m1: started; loaded in 0.6 s\n" in text, text
    assert "[no_model] load model m1: started; cancelled after 3.0 s\n" in text, text
    assert "[no_model] load model m1: started; FAILED after 0.4 s\n" in text, text
    assert "[no_model] load model m2: started\n" in text, text


def test_actions_cut_for_room_are_counted_on_the_screen() -> None:
    """Review 1 item 11: the status keeps the last actions; the ones cut are said, not lost."""
    report = build(actions_kept=1)
    assert [a.action for a in report.actions] == ["restart_unit"]
    assert report.actions_not_shown == 1
    lines = screen(report, now=WALL).splitlines()
    first = lines.index("   Actions: (1 earlier not shown: `hydra-watchdog events`)")
    assert "FAILED restart tabbyapi.service" in lines[first + 1], lines
    assert build().actions_not_shown == 0
    assert "earlier not shown" not in screen(build(), now=WALL)


def test_nrestarts_is_labelled_as_systemds_count_since_a_commanded_start() -> None:
    """Review 1 item 12: NRestarts (reset by any start systemd is told to do, the watchdog's
    too) beside the Restarts row (both kinds, in a window): each says whose and since when."""
    text = " ".join(screen(build(), now=WALL).split())
    assert "Restarts: 3 in the last 10 min (1 by the watchdog, 2 by systemd)" in text, text
    assert "NRestarts 4 (systemd's, since the last start by hand or by the watchdog)" in text


def test_a_fact_row_points_to_the_finding_that_says_it() -> None:
    """Review 1 item 13: systemd's and NVML's absence are findings; the Unit and GPUs rows
    point to them instead of saying them again. A row no finding speaks for says it itself."""
    no_unit = UnitStatus(name="tabbyapi.service", available=False, detail="no /run/systemd/system")
    no_nvml = GpuReport(error=NvmlErrorKind.LIBRARY_NOT_FOUND, detail="load /x.so: cannot open")
    obs = observation(unit=no_unit, gpus=no_nvml)
    text = " ".join(screen(build(obs=obs), now=WALL).split())
    assert "Unit: tabbyapi.service: systemd not available (no /run/systemd/system)" in text, text
    assert "GPUs: not readable: library_not_found: load /x.so: cannot open" in text, text
    findings = (
        Finding(Rule.SYSTEMD_UNAVAILABLE, Severity.WARNING, "systemd: no /run/systemd/system"),
        Finding(Rule.VRAM_CHECK, Severity.WARNING, f"NVML (library_not_found: {no_nvml.detail})"),
    )
    state = PolicyState(phase=Phase.HEALTHY, findings=findings)
    text = " ".join(screen(build(state=state, obs=obs), now=WALL).split())
    assert (
        "Unit: tabbyapi.service: systemd not available (see the systemd_unavailable finding)"
        in (text)
    ), text
    assert "GPUs: not readable (see the vram_check finding)" in text, text
    assert text.count("no /run/systemd/system") == text.count("cannot open") == 1, text


def test_without_systemd_tabbyapis_own_process_is_never_shown_as_an_orphan() -> None:
    """Issue 23 item 5: with no unit to ask, the scanner calls every process of TabbyAPI's
    program outside a unit an orphan; the one on TabbyAPI's port is TabbyAPI itself."""
    no_systemd = UnitStatus(name="tabbyapi.service", available=False, detail="no systemd")
    # systemd runs, but no tabbyapi.service: TabbyAPI started by hand on a systemd host
    no_unit = UnitStatus(name="tabbyapi.service", available=True, load_state="not-found")
    for unit in (no_systemd, no_unit):
        text = screen(build(obs=observation(unit=unit)), now=WALL)
        assert "Port: 5000 held by TabbyAPI (pid 4242)" in text, text
        assert "Orphan:" not in text and "(orphan)" not in text, text


def test_the_screen_of_a_healthy_idle_node() -> None:
    obs = observation(
        health=Health(HttpResult(Outcome.OK, 0.015, status=200), True),
        model=ModelStatus(HttpResult(Outcome.OK, 0.01, 200), "Midnight-Miqu-70B", True),
        port=None,
        processes=(),
    )
    state = PolicyState(phase=Phase.HEALTHY, phase_since=MONO - 3600)
    text = screen(build(state=state, obs=obs, recent=()), now=WALL)
    assert text.startswith("OK: healthy since ")
    assert "Health: 200 in 15 ms" in text
    assert "Midnight-Miqu-70B loaded" in text
    assert "Back-off:" not in text and "Restarts:" not in text and "Actions:" not in text


# --- the documented schema ------------------------------------------------------------------------


def test_schema_doc_lists_every_field_of_every_object() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "status-schema.md").read_text()
    sections = {
        "Top level": status.StatusReport,
        "`health`": status.HealthInfo,
        "`model`": status.ModelInfo,
        "`load`": status.LoadInfo,
        "`gpus[]`": status.GpuInfo,
        "`unit`": status.UnitInfo,
        "`listeners[]`": status.ListenerInfo,
        "`processes[]`": status.ProcessEntry,
        "`actions[]`": status.ActionEntry,
        "`backoff`": status.BackoffInfo,
        "`paused`": status.PauseInfo,
        "`findings[]`": status.FindingEntry,
    }
    for title, cls in sections.items():
        body = doc.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
        documented = re.findall(r"^\| `(\w+)` \|", body, flags=re.MULTILINE)
        assert documented == list(cls.field_names()), title


def test_the_phases_are_the_policys() -> None:
    assert frozenset(p.value for p in Phase) == PHASES
    assert tuple(v.name for v in Verdict) == VERDICT_NAMES


# --- a dead daemon, ages from now, the heartbeat from the future ---------------------------------


def test_a_stopped_daemon_is_unknown_with_the_time_it_stopped() -> None:
    report = build(state=dataclasses.replace(STATE, phase=Phase.HEALTHY))
    assert evaluate(report, wall_now=WALL + 1, stale_after=60)[0] == Verdict.OK
    stopped = replace(report, stopped_at=WALL + 2)
    verdict, why = evaluate(stopped, wall_now=WALL + 20, stale_after=60)
    assert verdict == Verdict.UNKNOWN
    assert "(pid 1234) stopped at" in why and "(18 s ago)" in why
    text = screen(stopped, now=WALL + 20)
    assert text.splitlines()[1].startswith("Last cycle: ")
    assert "Health" not in text  # what a stopped daemon last saw is not how things are


def test_a_daemon_that_is_gone_is_unknown_at_once() -> None:
    report = build(state=dataclasses.replace(STATE, phase=Phase.HEALTHY))
    verdict, why = evaluate(
        report, wall_now=WALL, stale_after=60, daemon="daemon pid 1234 is gone: ..."
    )
    assert (verdict, why) == (Verdict.UNKNOWN, "daemon pid 1234 is gone: ...")


@pytest.mark.parametrize("ahead", [11.0, 3600.0, 1e12])
def test_a_heartbeat_from_the_future_is_unknown(ahead: float) -> None:
    report = build(state=dataclasses.replace(STATE, phase=Phase.HEALTHY))
    future = replace(report, heartbeat=WALL + ahead)
    verdict, why = evaluate(future, wall_now=WALL, stale_after=60)
    assert verdict == Verdict.UNKNOWN and "in the future" in why
    # a little skew (a clock step by NTP) is tolerated
    near = replace(report, heartbeat=WALL + 5)
    assert evaluate(near, wall_now=WALL, stale_after=60)[0] == Verdict.OK


def test_ages_are_computed_from_now_not_from_when_the_file_was_written() -> None:
    report = build()  # generated at WALL, heartbeat WALL - 2, next start at WALL + 60
    text = screen(report, now=WALL + 20)
    assert "last cycle 22 s ago" in text
    assert "(in 40 s)" in text
    assert "next start in 40 s" in summarize(report, now=WALL + 20)


def test_render_survives_times_that_are_not_dates() -> None:
    report = replace(build(), since=9e18, stopped_at=-9e18)
    assert "(not a date)" in screen(report, now=WALL)


# --- /proc: is the daemon that wrote the report still running? ----------------------------------

_STANDIN = "import time; time.sleep(600)"


def _spawn(*argv: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", _STANDIN, *argv])
    # Popen returns inside the child's exec, before the kernel fills in its command line
    cmdline = Path(f"/proc/{proc.pid}/cmdline")
    wait_for(lambda: _STANDIN.encode() in cmdline.read_bytes(), 30, "the exec")
    return proc


def test_daemon_problem_accepts_a_live_hydra_watchdog_and_its_start() -> None:
    proc = _spawn("hydra_watchdog-standin")
    try:
        report = StatusReport(pid=proc.pid, pid_start=process_start(proc.pid))
        assert report.pid_start is not None
        assert daemon_problem(report) == ""
        # the same pid, another start time: a reused pid
        reused = replace(report, pid_start=report.pid_start - 1)
        assert "now another hydra-watchdog process" in daemon_problem(reused)
    finally:
        proc.kill()
        proc.wait()


def test_daemon_problem_sees_a_dead_a_zombie_and_a_foreign_pid() -> None:
    proc = _spawn("hydra_watchdog-standin")
    report = StatusReport(pid=proc.pid, pid_start=process_start(proc.pid))
    proc.kill()
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
    assert "is gone" in daemon_problem(report)
    proc.wait()
    assert "is gone: hydra-watchdog is not running" in daemon_problem(report)
    other = _spawn()  # a live process that is not hydra-watchdog
    try:
        problem = daemon_problem(StatusReport(pid=other.pid))
        assert "now another process" in problem and "time.sleep" in problem
    finally:
        other.kill()
        other.wait()
    assert "no daemon pid" in daemon_problem(StatusReport(pid=0))
    assert "no daemon pid" in daemon_problem(StatusReport(pid=2**40))


def test_process_start_is_this_process_start_time() -> None:
    mine = process_start(os.getpid())
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    assert mine == int(fields[19])
    assert process_start(2**40) is None


# --- fuzz: garbage is a ValueError, never another exception, never a report that says OK --------

_POISON = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "-1e400",
    "9" * 400,
    "-" + "9" * 400,
    "9" * 5000,
    "[" * 50_000 + "]" * 50_000,
    '"\\udc80"',
]


def _fields(value: object, prefix: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    found: list[tuple[object, ...]] = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            found += _fields(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _fields(v, (*prefix, i))
    return found


def _healthy() -> StatusReport:
    state = dataclasses.replace(STATE, phase=Phase.HEALTHY)
    return build(state=state)


def poisoned_status(path: tuple[object, ...], poison: str, base: StatusReport) -> str:
    doc = json.loads(to_json(base))
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = "__POISON__"
    return json.dumps(doc).replace('"__POISON__"', poison)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_a_poisoned_field_is_a_value_error(data: st.DataObject) -> None:
    base = _healthy()
    assert evaluate(base, wall_now=WALL, stale_after=60)[0] == Verdict.OK  # without the poison
    raw = json.loads(to_json(base))
    path = data.draw(st.sampled_from(_fields(raw)))
    text = poisoned_status(path, data.draw(st.sampled_from(_POISON)), base)
    with pytest.raises(ValueError, match="status file"):
        from_json(text)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(
                    st.sampled_from(
                        ["schema", "heartbeat", "pid", "phase", "summary", "gpus", "since", "x"]
                    ),
                    inner,
                    max_size=5,
                )
            ),
            max_leaves=20,
        ).map(lambda v: json.dumps(v).encode()),
    )
)
def test_fuzz_anything_parses_renders_or_is_a_value_error(text: bytes) -> None:
    try:
        report = from_json(text)
    except ValueError:
        return
    # what parses must evaluate and render without an exception
    evaluate(report, wall_now=WALL, stale_after=60)
    screen(report, now=WALL)
    to_json(report)
