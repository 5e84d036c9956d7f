"""Incidents (incidents.py): derived from each cycle's policy state and observation, without
processes (the policy driven on a fake clock, policy_kit's way); then their file, their screen,
their metrics and the `incidents` command."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from hydra_watchdog.actions import (
    ActionResult,
    LoadModel,
    Reason,
    ResultStatus,
    UnitCommand,
    UnitVerb,
)
from hydra_watchdog.config import Config
from hydra_watchdog.incidents import (
    ACTIONS_KEPT,
    INCIDENTS_KEPT,
    ActionNote,
    AlertClass,
    CycleFacts,
    Incident,
    IncidentOutcome,
    Tracker,
    facts,
    incidents_since,
    step,
)
from hydra_watchdog.observation import Observation, Outcome
from hydra_watchdog.policy import decide
from hydra_watchdog.policy_state import PolicyState
from hydra_watchdog.report.incident_file import INCIDENT_FILE, IncidentFile
from hydra_watchdog.report.incident_view import render, to_json
from hydra_watchdog.report.metrics import Metrics
from hydra_watchdog.states import Phase, Rule
from tests import policy_kit as k
from tests.test_cli import cli

WALL0 = 1_800_000_000.0  # wall time at monotonic 0 in these runs


@dataclass
class Node:
    """The policy on a fake clock, each cycle folded into the tracker as the daemon does: the
    results of one cycle's actions reach the policy with the next observation."""

    cfg: Config = field(default_factory=k.config)
    state: PolicyState = field(default_factory=PolicyState)
    tracker: Tracker = field(default_factory=Tracker)
    closed: list[Incident] = field(default_factory=list)
    pending: tuple[ActionResult, ...] = ()
    fail: frozenset[str] = frozenset()  # action names whose results are FAILED

    def cycle(self, o: Observation) -> None:
        o = replace(o, results=(*self.pending, *o.results))
        before = self.state
        self.state, actions = decide(before, o, o.at, self.cfg)
        results = tuple(
            k.result(a, ResultStatus.FAILED if a.kind in self.fail else ResultStatus.OK, "", o.at)
            for a in actions
        )
        self.pending = results
        f = facts(before, self.state, o, results, self.cfg, wall=WALL0 + o.at, mono=o.at)
        self.tracker, closed = step(self.tracker, f)
        if closed is not None:
            self.closed.append(closed)

    def run(self, start: float, end: float, **kw: object) -> None:
        t = start
        while t < end:
            self.cycle(k.obs(t, **kw))
            t += 1.0


def healthy_after_restart(node: Node, start: float, end: float) -> None:
    """Serving again: the canary a restart calls for passes."""
    node.run(start, end, canary=k.canary(Outcome.OK))


def test_a_crash_is_one_down_incident_from_the_first_failed_probe_to_healthy() -> None:
    node = Node()
    node.run(0, 5)  # healthy: nothing to track
    assert node.tracker == Tracker()
    node.run(5, 8, health=k.timeout())  # hung: confirmed by failures_before_down probes
    healthy_after_restart(node, 8, 20)
    [inc] = node.closed
    assert inc.alert is AlertClass.DOWN
    assert inc.began == WALL0 + 5  # the first refused probe, before failures_before_down
    assert inc.detected == WALL0 + 7  # the third
    restarts = [a for a in inc.actions if a.action in ("restart_unit", "start_unit")]
    assert restarts and restarts[0].result == "ok"
    assert inc.recovered is not None and inc.recovered >= WALL0 + 8
    assert inc.time_to_recover() == inc.recovered - inc.began
    assert inc.canary_at is not None and inc.canary_at >= WALL0 + 8
    assert inc.outcome is IncidentOutcome.RECOVERED and not inc.human_needed
    assert inc.cause_rule == Rule.DOWN.value and inc.cause
    assert node.tracker.open is None and node.tracker.next_number == 2


def test_one_failed_probe_that_heals_is_no_incident() -> None:
    node = Node()
    node.cycle(k.obs(0, health=k.refused()))
    assert node.tracker.symptom_since == WALL0  # a symptom, not yet judged
    node.run(1, 5)
    assert node.closed == [] and node.tracker == Tracker()


def test_no_model_at_start_is_a_no_model_incident_closed_once_the_load_confirms() -> None:
    node = Node()
    node.run(0, 3, model=k.model(None))
    assert node.tracker.open is not None
    assert node.tracker.open.alert is AlertClass.NO_MODEL
    loads = [a for a in node.tracker.open.actions if a.action == "load_model"]
    assert loads, node.tracker.open
    healthy_after_restart(node, 3, 8)
    [inc] = node.closed
    assert inc.alert is AlertClass.NO_MODEL  # awaiting the canary is no TabbyAPIDown
    assert inc.began == WALL0


def test_a_crash_that_becomes_a_loop_takes_the_graver_alert() -> None:
    node = Node()
    node.run(0, 2)
    seen = []
    t = 2.0
    while node.state.phase is not Phase.BACKOFF and t < 60:  # each restart fails again
        node.cycle(k.obs(t, health=k.refused(), unit=k.unit(active="failed", sub="failed")))
        if node.tracker.open is not None:
            seen.append(node.tracker.open.alert)
        t += 1
    assert node.state.phase is Phase.BACKOFF, node.state
    assert seen[0] is AlertClass.DOWN and seen[-1] is AlertClass.RESTART_LOOP
    assert node.tracker.open is not None and node.tracker.open.number == 1  # one, grown
    assert node.closed == []


def test_a_cause_no_restart_fixes_needs_a_human_and_counts_so() -> None:
    node = Node()
    node.run(0, 2)
    gone = k.host(missing_libraries=("libexl.so",), libraries_checked=True)
    node.run(2, 20, health=k.refused(), unit=k.unit(active="failed", sub="failed"), host=gone)
    inc = node.tracker.open
    assert inc is not None and inc.human_needed, (node.state.phase, node.state.findings, inc)
    assert inc.cause_rule == Rule.MISSING_LIBRARIES.value and "libexl.so" in inc.cause
    healthy_after_restart(node, 20, 30)
    [closed] = node.closed
    assert closed.outcome is IncidentOutcome.HUMAN and not closed.human_needed


def test_slow_health_is_the_slow_health_check_incident() -> None:
    node = Node()
    node.run(0, 8, health=k.ok(latency=2.5))
    assert node.tracker.open is not None
    assert node.tracker.open.alert is AlertClass.SLOW_HEALTH
    assert node.tracker.open.began == WALL0  # the first slow probe


def _facts(at: float, **kw: object) -> CycleFacts:
    values: dict[str, object] = {
        "observed": at,
        "alert": AlertClass.DOWN,
        "symptom": True,
        "healthy": False,
        "paused": False,
        "cause": "",
        "cause_rule": "",
        "human_needed": False,
        "canary_at": None,
    }
    values.update(kw)
    return CycleFacts(**values)  # type: ignore[arg-type]


def test_a_healthy_cycle_returns_the_same_tracker_so_nothing_is_written() -> None:
    t = Tracker(next_number=7)
    same, closed = step(t, _facts(1.0, alert=None, symptom=False, healthy=True))
    assert same is t and closed is None
    opened, _ = step(t, _facts(2.0))
    again, _ = step(opened, _facts(3.0))
    assert again is opened  # still open, nothing new


def test_records_are_bounded() -> None:
    t = Tracker()
    acts = tuple(ActionNote(float(i), "restart_unit", "ok", "x") for i in range(ACTIONS_KEPT + 5))
    t, _ = step(t, _facts(1.0, actions=acts))
    assert t.open is not None
    assert len(t.open.actions) == ACTIONS_KEPT and t.open.actions_dropped == 5
    assert t.open.actions[-1].at == float(ACTIONS_KEPT + 4)  # the latest are kept
    for i in range(INCIDENTS_KEPT + 3):
        t, _ = step(t, _facts(10.0 + 2 * i))
        t, closed = step(t, _facts(11.0 + 2 * i, alert=None, healthy=True))
        assert closed is not None
    assert len(t.closed) == INCIDENTS_KEPT
    assert t.closed[-1].number == INCIDENTS_KEPT + 3  # #1 (with the actions) closed first


def test_a_specific_cause_outranks_the_first_words_and_a_later_generic_one() -> None:
    t, _ = step(Tracker(), _facts(1.0, cause="refused", cause_rule="tabbyapi_down"))
    t, _ = step(t, _facts(2.0, cause="no model loaded", cause_rule="no_model"))
    assert t.open is not None and t.open.cause == "refused"
    t, _ = step(t, _facts(3.0, cause="libexl.so missing", cause_rule="missing_libraries"))
    t, _ = step(t, _facts(4.0, cause="canary awaited", cause_rule="canary_pending"))
    assert t.open is not None and t.open.cause_rule == "missing_libraries"


def test_incidents_since_keeps_those_that_overlap_the_window() -> None:
    old = Incident(1, AlertClass.DOWN, 10.0, 11.0, recovered=20.0)
    late = Incident(2, AlertClass.DOWN, 90.0, 91.0, recovered=120.0)
    now = Incident(3, AlertClass.NO_MODEL, 130.0, 131.0)
    t = Tracker(open=now, closed=(old, late))
    assert [i.number for i in incidents_since(t, 100.0)] == [2, 3]


# --- the file ----------------------------------------------------------------------------------


def _sample() -> Tracker:
    t, _ = step(Tracker(), _facts(WALL0, cause="refused", cause_rule="tabbyapi_down"))
    t, _ = step(t, _facts(WALL0 + 3, alert=None, healthy=True, canary_at=WALL0 + 3))
    t, _ = step(t, _facts(WALL0 + 10, alert=AlertClass.RESTART_LOOP, human_needed=True))
    return t


def test_the_file_round_trips_and_is_private(tmp_path: Path) -> None:
    f = IncidentFile(tmp_path / "state")
    assert f.load().tracker == Tracker()
    f.save(_sample())
    assert f.load().tracker == _sample()
    assert (f.path.stat().st_mode & 0o777) == 0o600
    assert IncidentFile(tmp_path / "state", dry_run=True).load().tracker == Tracker()


@pytest.mark.parametrize(
    "content",
    [b"{", b'{"version": 1, "tracker": {"next_number": -1}}', b"[]", b"x" * 10, b"directory"],
)
def test_an_unusable_file_is_set_aside_and_incidents_start_afresh(
    tmp_path: Path, content: bytes
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    if content == b"directory":
        (state / INCIDENT_FILE).mkdir()
    else:
        (state / INCIDENT_FILE).write_bytes(content)
    loaded = IncidentFile(state).load()
    assert loaded.tracker == Tracker() and "unusable" in loaded.note
    assert len(list(state.glob(f"{INCIDENT_FILE}.corrupt-*"))) == 1


# --- the screen and the metrics ------------------------------------------------------------------


@pytest.fixture
def utc() -> Iterator[None]:
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


def test_the_screen_reads_as_an_operator_reads_it(utc: None) -> None:
    restart = ActionNote(WALL0 + 2, "restart_unit", "ok", "restart tabbyapi.service")
    t, _ = step(
        Tracker(),
        _facts(WALL0, cause="refused: connection refused", cause_rule="tabbyapi_down"),
    )
    t, _ = step(t, _facts(WALL0 + 1, actions=(restart,)))
    t, _ = step(t, _facts(WALL0 + 4.5, alert=None, healthy=True, canary_at=WALL0 + 4.5))
    t, _ = step(t, _facts(WALL0 + 60, alert=AlertClass.RESTART_LOOP, human_needed=True))
    t, _ = step(t, _facts(WALL0 + 61, cause="libexl.so not found", cause_rule="missing_libraries"))
    t = replace(t, open=replace(t.open, human_needed=True)) if t.open else t
    shown = render(incidents_since(t, 0.0), now=WALL0 + 181, since_text="24h")
    assert shown == [
        "#1 TabbyAPIDown: recovered in 4.5 s (recovered)",
        "  began     2027-01-15 08:00:00; detected 08:00:00 (+0.0 s)",
        "  cause     [tabbyapi_down] refused: connection refused",
        "  08:00:02  restart_unit ok: restart tabbyapi.service",
        "  healthy   08:00:04, canary passed 08:00:04",
        "#2 TabbyAPIRestartLoop: OPEN for 2.0 min",
        "  began     2027-01-15 08:01:00; detected 08:01:00 (+0.0 s)",
        "  cause     [missing_libraries] libexl.so not found",
        "  no action taken",
        "  A HUMAN IS NEEDED: the watchdog cannot fix this cause",
    ]
    assert all(len(line) <= 100 for line in shown)
    assert render([], now=0.0, since_text="7d") == ["no incidents in the last 7d"]
    doc = to_json(incidents_since(t, 0.0))
    assert doc[0]["time_to_recover"] == 4.5 and doc[0]["outcome"] == "recovered"
    assert doc[1]["open"] is True and doc[1]["outcome"] is None


def _sample_value(page: str, name: str, labels: str = "") -> float | None:
    for line in page.splitlines():
        if line.startswith(f"{name}{labels} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_count_closed_incidents_and_show_the_open_one() -> None:
    from hydra_watchdog.report.status import StatusReport

    m = Metrics()
    m.update(StatusReport())
    t = _sample()
    m.record_incident(t.closed[0])
    m.set_open_incident(replace(t.open, cause_rule="missing_libraries") if t.open else None)
    page = m.exposition().decode()
    down = '{alert="TabbyAPIDown",outcome="recovered"}'
    assert _sample_value(page, "hydra_watchdog_incidents_total", down) == 1.0
    loop = '{alert="TabbyAPIRestartLoop",outcome="human"}'
    assert _sample_value(page, "hydra_watchdog_incidents_total", loop) == 0.0
    le = '{alert="TabbyAPIDown",le="5.0"}'
    assert _sample_value(page, "hydra_watchdog_incident_seconds_bucket", le) == 1.0
    le = '{alert="TabbyAPIDown",le="2.5"}'
    assert _sample_value(page, "hydra_watchdog_incident_seconds_bucket", le) == 0.0
    open_ = '{alert="TabbyAPIRestartLoop",cause="missing_libraries"}'
    assert _sample_value(page, "hydra_watchdog_incident_open", open_) == 1.0
    assert _sample_value(page, "hydra_watchdog_incident_human_needed") == 1.0
    # A rule name this version does not know never becomes a label value of its own.
    m.set_open_incident(replace(t.open, cause_rule="x" * 50) if t.open else None)
    page = m.exposition().decode()
    assert 'cause="other"' in page and "x" * 50 not in page
    m.set_open_incident(None)
    page = m.exposition().decode()
    assert "hydra_watchdog_incident_open{" not in page
    assert _sample_value(page, "hydra_watchdog_incident_human_needed") == 0.0


# --- the command ---------------------------------------------------------------------------------


def test_the_command_lists_the_window_as_text_and_json(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "config.toml"
    config.write_text(f'[watchdog]\nstate_dir = "{state}"\n')
    now = time.time()
    t, _ = step(Tracker(), _facts(now - 3 * 86400, cause="refused", cause_rule="tabbyapi_down"))
    t, _ = step(t, _facts(now - 3 * 86400 + 5, alert=None, healthy=True))
    t, _ = step(t, _facts(now - 60, alert=AlertClass.NO_MODEL, cause="no model"))
    IncidentFile(state).save(t)
    out = cli("incidents", "--json", "--config", str(config))
    assert out.returncode == 0, out.stderr
    assert [(d["number"], d["alert"]) for d in json.loads(out.stdout)] == [(2, "TabbyAPINoModel")]
    out = cli("incidents", "--since", "7d", "--config", str(config))
    assert out.returncode == 0, out.stderr
    assert "#1 TabbyAPIDown: recovered in 5.0 s" in out.stdout
    assert "#2 TabbyAPINoModel: OPEN for 1.0 min" in out.stdout
    bad = cli("incidents", "--since", "yesterday", "--config", str(config))
    assert bad.returncode == 2 and "--since 'yesterday'" in bad.stderr


def test_the_command_refuses_a_state_dir_others_could_write(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o777)
    state.chmod(0o777)
    config = tmp_path / "config.toml"
    config.write_text(f'[watchdog]\nstate_dir = "{state}"\n')
    out = cli("incidents", "--config", str(config))
    assert out.returncode == 3 and "mode 0777" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_a_load_result_that_arrives_with_the_observation_is_recorded() -> None:
    t, _ = step(Tracker(), _facts(WALL0, alert=AlertClass.NO_MODEL))
    load = LoadModel("M", None, Reason(Rule.NO_MODEL, "no model loaded"))
    o = k.obs(
        5.0,
        model=k.model(None),
        results=(ActionResult(load, ResultStatus.FAILED, "CUDA out of memory", 4.0),),
    )
    restart = UnitCommand(UnitVerb.RESTART, "tabbyapi.service", Reason(Rule.DOWN, "refused"))
    mine = (ActionResult(restart, ResultStatus.OK, "", 5.0),)
    after = PolicyState(phase=Phase.NO_MODEL)
    f = facts(PolicyState(), after, o, mine, k.config(), wall=WALL0 + 5, mono=5.0)
    assert [(a.action, a.result, a.at) for a in f.actions] == [
        ("load_model", "failed", WALL0 + 4),
        ("restart_unit", "ok", WALL0 + 5),
    ]
    assert "CUDA out of memory" in f.actions[0].detail
    t, _ = step(t, f)
    assert t.open is not None and len(t.open.actions) == 2
