"""Every runbook incident, end to end, under real systemd (issue 6's scenario table).

Each test injects one fault into a serving node (see conftest.py) and asserts from outside:
the outcome, the journal fields of the decisions (HYDRA_RULE, HYDRA_REASON), no collateral
damage, and the number of restarts the watchdog issued. Negative checks ("nothing happens") are
measured in the daemon's own cycles (status.json heartbeats), never in fixed sleeps.
"""

from __future__ import annotations

import pytest

from hydra_watchdog.act.load_launch import unit_name
from hydra_watchdog.policy import backoff_delay
from hydra_watchdog.sim import nvml_state
from tests.chaos.conftest import (
    FAILURES_BEFORE_DOWN,
    FALLBACK,
    GIB,
    HEALTH_TIMEOUT,
    INTERVAL,
    MAIN,
    MAX_RESTARTS,
    MODELS,
    PORT,
    POWER_TARGETS,
    RESET_AFTER,
    RESTART_ACTIONS,
    SIM_DIR,
    STATE_DIR,
    STORE_LIB,
    TABBY_UNIT,
    WATCHDOG,
    WATCHDOG_SEC,
    ChaosNode,
    Record,
    Row,
    chaos_config,
)
from tests.harness.adversary import KEEPER, SYSTEM_PYTHON, as_nobody

pytestmark = [pytest.mark.chaos, pytest.mark.systemd]

Chaos = tuple[ChaosNode, Row]
ONE_RESTART = (
    "one restart expected; a second START right after the restart means the policy took the "
    "restart job's stop phase (deactivating/stop-sigterm, seen because systemctl runs with "
    "--no-block) for a dead unit"
)
# Load allowance on top of the bounds the issue states: 2 busy cores, other engineers' tests.
SLACK = 3.0


def _new_main_pid(node: ChaosNode, old: str) -> bool:
    return node.show()["MainPID"] not in ("0", old)


def _restart_record(node: ChaosNode) -> Record | None:
    return node.first(lambda r: r.event == "action" and r.action in ("restart_unit", "start_unit"))


def _seconds(node: ChaosNode, record: Record | None) -> float | None:
    return None if record is None else record.at - node.t0


def _cycles(node: ChaosNode, n: int, timeout: float = 60.0) -> None:
    """Wait until the daemon completed n more cycles (its status.json heartbeat moves)."""
    seen: list[object] = [node.status().get("heartbeat")]

    def moved() -> bool:
        beat = node.status().get("heartbeat")
        if beat != seen[-1]:
            seen.append(beat)
        return len(seen) > n

    node.wait(moved, timeout, f"{n} watchdog cycles")


def _assert_unit_untouched(node: ChaosNode, before: dict[str, str]) -> None:
    after = node.show()
    assert after["MainPID"] == before["MainPID"], (before, after)
    assert after["NRestarts"] == before["NRestarts"], (before, after)


def _port_owner_seen(node: ChaosNode) -> None:
    """The watchdog must know who listens on :5000 before it can judge the holder."""

    def known() -> bool:
        listeners = node.status().get("listeners") or []
        return any(lst["port"] == PORT and lst["pid"] is not None for lst in listeners)

    node.wait(
        known,
        30,
        lambda: (
            f"the watchdog naming the owner of :{PORT} (status listeners: "
            f"{node.status().get('listeners')}). Under systemd/hydra-watchdog.service it cannot "
            "readlink /proc/PID/fd of a process holding capabilities outside its "
            "CapabilityBoundingSet (CAP_KILL CAP_SYS_ADMIN): the kernel's ptrace access check "
            "wants CAP_SYS_PTRACE, so every root-started holder stays anonymous"
        ),
    )


# --- TabbyAPIDown ------------------------------------------------------------------------------


def test_01_crash(chaos: Chaos) -> None:
    """exit 1: systemd's Restart= brings it back without a model; the watchdog loads it."""
    node, row = chaos
    before = node.show()
    node.faults(exit_code=1)
    node.wait(lambda: _new_main_pid(node, before["MainPID"]), 30, "a new MainPID")
    node.faults()
    row.detected_s = _seconds(node, node.first(lambda r: r.get("HYDRA_STATE") != "healthy"))
    row.recovered_s = node.wait(node.serving, 60, node.describe)
    after = node.show()
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1  # systemd's own Restart=
    loads = node.loads()
    assert [entry["status"] for entry in loads] == [200], loads
    load = node.actions("load_model")
    assert load and load[0].rule == "no_model", load
    assert "no model loaded" in load[0].get("HYDRA_REASON")
    assert node.actions("kill_orphan") == []  # nothing was signalled
    row.restarts = node.restarts_issued()
    assert row.restarts == 0  # systemd restarted it; the watchdog only loaded the model


def test_02_hang(chaos: Chaos) -> None:
    """Alive, accepting connections, never answering: restarted after failures_before_down
    probes. The cycle runs its probes in sequence, so each failed probe costs interval +
    health_timeout; the bound is failures_before_down x (interval + health_timeout)."""
    node, row = chaos
    before = node.show()
    node.faults(hang=True)
    node.wait(lambda: _restart_record(node) is not None, 60, node.describe)
    node.faults()  # the fault lived in the old process only
    restart = _restart_record(node)
    assert restart is not None
    assert restart.rule == "tabbyapi_down", restart.fields
    assert "timeout" in restart.get("HYDRA_REASON"), restart.fields
    assert restart.get("OBJECT_SYSTEMD_UNIT") == TABBY_UNIT
    row.detected_s = _seconds(node, restart)
    assert row.detected_s is not None
    assert row.detected_s <= FAILURES_BEFORE_DOWN * (INTERVAL + HEALTH_TIMEOUT) + SLACK
    row.recovered_s = node.wait(node.serving, 60, node.describe)
    assert _new_main_pid(node, before["MainPID"])
    assert node.actions("kill_orphan") == []  # nothing was signalled
    row.restarts = node.restarts_issued()
    assert row.restarts == 1, ONE_RESTART


def test_03_sticky_503(chaos: Chaos) -> None:
    """A fatal generation error: /health 503 forever (TabbyAPI never clears it): restart."""
    node, row = chaos
    before = node.show()
    node.faults(sticky_503=True)
    node.wait(
        lambda: any(r["path"] == "/health" and r["status"] == 503 for r in node.requests(node.t0)),
        30,
        "a 503 from /health",
    )
    node.faults()  # the issue stays recorded inside the process: still 503 until restarted
    node.wait(lambda: _restart_record(node) is not None, 60, node.describe)
    restart = _restart_record(node)
    assert restart is not None and restart.rule == "sticky_unhealthy", restart
    assert "503" in restart.get("HYDRA_REASON")
    assert "illegal memory access" in restart.get("HYDRA_REASON")  # the issue, quoted
    row.detected_s = _seconds(node, restart)
    row.recovered_s = node.wait(node.serving, 60, node.describe)
    assert _new_main_pid(node, before["MainPID"])
    assert node.actions("kill_orphan") == []  # nothing was signalled
    row.restarts = node.restarts_issued()
    assert row.restarts == 1, ONE_RESTART


def test_04_generation_hang(chaos: Chaos) -> None:
    """/health 200 but the 1-token canary misses its deadline (tabbyAPI#428): restart."""
    node, row = chaos
    before = node.show()
    # The hang is this process's (as tabbyAPI#428's is): the one the restart brings up is fine.
    node.faults(generation_hang=True, only_pid=int(before["MainPID"]))
    node.wait(lambda: _restart_record(node) is not None, 60, node.describe)
    restart = _restart_record(node)
    node.faults()
    assert restart is not None and restart.rule == "generation_hang", restart
    assert "1-token completion missed" in restart.get("HYDRA_REASON")
    # /health never said anything was wrong before the restart.
    health = [
        r for r in node.requests(node.t0) if r["path"] == "/health" and r["time"] < restart.at
    ]
    assert health and all(r["status"] == 200 for r in health)
    row.detected_s = _seconds(node, restart)
    row.recovered_s = node.wait(node.serving, 60, node.describe)
    assert _new_main_pid(node, before["MainPID"])
    assert node.actions("kill_orphan") == []  # nothing was signalled
    row.restarts = node.restarts_issued()
    assert row.restarts == 1, ONE_RESTART


# --- TabbyAPINoModel ---------------------------------------------------------------------------


def test_05_no_model_after_restart(chaos: Chaos) -> None:
    """An operator restarts TabbyAPI; it comes up without a model: loaded exactly once and
    confirmed through /v1/model."""
    node, row = chaos
    assert node.systemctl("restart", TABBY_UNIT).returncode == 0
    node.wait(lambda: node.first(lambda r: r.action == "load_model") is not None, 60, node.describe)
    row.recovered_s = node.wait(node.serving, 60, node.describe)
    load = node.first(lambda r: r.action == "load_model")
    assert load is not None and load.rule == "no_model", load
    row.detected_s = _seconds(node, load)
    _cycles(node, 4)  # a second load would show up here
    loads = node.loads()
    assert [entry["status"] for entry in loads] == [200], loads
    confirmed = [
        r
        for r in node.requests(loads[0]["time"])
        if r["path"] == "/v1/model" and r["status"] == 200 and r["model"] == MAIN
    ]
    assert confirmed, "the load was not confirmed through /v1/model"
    code, body = node.http("/v1/model")
    assert code == 200 and MAIN in body
    assert node.actions("kill_orphan") == []  # nothing was signalled
    row.restarts = node.restarts_issued()
    assert row.restarts == 0


def test_06_vram_held_by_orphan(chaos: Chaos) -> None:
    """A TabbyAPI process from an earlier run, outside the unit, holds 28 GiB: it is killed
    (SIGTERM) and the model is loaded; TabbyAPI's own process is not touched."""
    node, row = chaos
    before = node.show()
    orphan = node.spawn_tabby_orphan(PORT + 100, "vram-orphan")
    nvml_state.set_process(node.nvml(), 0, orphan, 28 * GIB)
    nvml_state.set_process(node.nvml(), 1, orphan, 20 * GIB)
    node.unload()
    node.wait(lambda: not node.alive(orphan), 60, lambda: f"orphan {orphan} killed")
    # The kill runs inside a cycle whose status is published after it: wait for the load the
    # cycle after it issues, so a status from before the unload cannot pass for "serving".
    node.wait(lambda: bool(node.loads()), 60, lambda: f"the model load ({node.describe()})")
    row.recovered_s = node.wait(node.serving, 60, node.describe)
    row.detected_s = _seconds(node, node.first(lambda r: r.action == "kill_orphan"))
    kills = node.actions("kill_orphan")
    assert [k.get("TARGET_PID") for k in kills] == [str(orphan)], [k.fields for k in kills]
    assert kills[0].event == "action" and kills[0].rule in ("orphan_cleanup", "vram_check")
    assert str(orphan) in kills[0].get("HYDRA_REASON")
    assert [entry["status"] for entry in node.loads()] == [200]
    assert node.show()["MainPID"] == before["MainPID"]
    row.restarts = node.restarts_issued()
    assert row.restarts == 0


# --- port conflicts ----------------------------------------------------------------------------


@pytest.mark.no_autostart
def test_07_port_held_by_orphan(chaos: Chaos) -> None:
    """An orphan TabbyAPI holds :5000, so TabbyAPI came up on :5001. The orphan is killed, the
    unit restarted, and TabbyAPI listens on the configured port again."""
    node, row = chaos
    orphan = node.spawn_tabby_orphan(PORT, "port-orphan")
    node.wait(lambda: node.listening(PORT) == orphan, 30, "the orphan on :5000")
    assert node.systemctl("start", TABBY_UNIT).returncode == 0
    node.wait(lambda: node.listening(PORT + 1) is not None, 30, "TabbyAPI on :5001")
    moved_pid = node.show()["MainPID"]
    node.mark()
    assert node.systemctl("start", WATCHDOG).returncode == 0
    _port_owner_seen(node)
    node.wait(lambda: not node.alive(orphan), 60, lambda: f"orphan killed ({node.describe()})")
    row.detected_s = _seconds(node, node.first(lambda r: r.action == "kill_orphan"))
    row.recovered_s = node.wait(node.serving, 60, node.describe)
    main = node.show()["MainPID"]
    assert main != moved_pid
    assert node.listening(PORT) == int(main)
    assert node.listening(PORT + 1) is None
    kills = node.actions("kill_orphan")
    assert [k.get("TARGET_PID") for k in kills] == [str(orphan)]
    restart = _restart_record(node)
    assert restart is not None and restart.rule == "port_conflict", restart
    assert f"port {PORT} held by orphan pid {orphan}" in restart.get("HYDRA_REASON")
    row.restarts = node.restarts_issued()
    assert row.restarts == 1, ONE_RESTART


@pytest.mark.no_autostart
def test_08_port_held_by_foreign(chaos: Chaos) -> None:
    """Something that is not TabbyAPI holds :5000: never signalled, CRITICAL naming its pid and
    command, no restart storm. Once the operator frees the port, TabbyAPI is brought back."""
    node, row = chaos
    foreign = node.spawn(
        ["python3", "-m", "http.server", str(PORT), "--bind", "127.0.0.1"], "http.server"
    )
    node.wait(lambda: node.listening(PORT) == foreign, 30, "the foreign server on :5000")
    assert node.systemctl("start", TABBY_UNIT).returncode == 0
    node.wait(lambda: node.listening(PORT + 1) is not None, 30, "TabbyAPI on :5001")
    before = node.show()
    node.mark()
    assert node.systemctl("start", WATCHDOG).returncode == 0
    _port_owner_seen(node)

    def named() -> bool:
        return any(
            f["rule"] == "foreign_holder" and f"pid {foreign}" in f["message"]
            for f in node.findings()
        )

    row.detected_s = node.wait(named, 60, node.describe)
    _cycles(node, 10)
    code, doc = node.status_cli()
    assert code == 2 and doc["verdict"] == "CRITICAL", doc
    finding = next(f for f in doc["report"]["findings"] if f["rule"] == "foreign_holder")
    assert "http.server" in finding["message"] and finding["severity"] == "crit"
    assert node.alive(foreign)
    assert node.actions("kill_orphan") == []
    assert node.restarts_issued() == 0
    _assert_unit_untouched(node, before)
    diag = node.first(lambda r: r.rule == "foreign_holder")
    assert diag is not None and f"pid {foreign}" in diag.message

    # The operator frees the port: TabbyAPI (still on :5001) is restarted onto :5000.
    node.kill_spawned()
    row.recovered_s = node.wait(node.serving, 60, node.describe)
    assert node.listening(PORT) == int(node.show()["MainPID"])
    row.restarts = node.restarts_issued()
    assert row.restarts == 1, ONE_RESTART


KEEPER_PATH = "/opt/hw-keeper.py"


def test_08b_port_squatted_while_tabbyapi_restarts(chaos: Chaos) -> None:
    """Issue 22 item 1: an unprivileged user (uid 65534) takes :5000 while TabbyAPI restarts (it
    loads its startup model before it opens the port), keeps the connection the watchdog's next
    /health makes, lets go of the port, and answers TabbyAPI's sticky 503 on that connection
    from then on. TabbyAPI takes its port back. The connection is vetted once made (listener
    and far end): closed before a byte goes over it, so the 503 is never read: no restart, no
    stop, no restart loop; TabbyAPI serves throughout."""
    node, row = chaos
    log = f"{SIM_DIR}/keeper.log"
    node.ns.write_file(KEEPER_PATH, KEEPER)
    node.set_env(STARTUP_MODEL=MAIN)  # as on hydra-ai: the model loads before the port opens
    node.faults(load_seconds=2.5)
    hold = 1.5  # seconds the squatter keeps the port at most: TabbyAPI's load takes 2.5
    nobody = " ".join(as_nobody([SYSTEM_PYTHON, KEEPER_PATH, "127.0.0.1", str(PORT), str(hold)]))
    squatter = node.spawn(["sh", "-c", f"exec {nobody} > {log} 2>&1"], KEEPER_PATH)
    before = node.show()
    assert node.systemctl("restart", TABBY_UNIT).returncode == 0  # the operator restarts it
    restarted = node.show()
    assert restarted["MainPID"] not in ("0", before["MainPID"])
    said = node.host_path(log)
    node.wait(lambda: "released" in said.read_text(), 30, "the squatter to take and free :5000")
    main = int(restarted["MainPID"])
    node.wait(lambda: node.listening(PORT) == main, 30, "TabbyAPI back on its port")
    _cycles(node, 2)  # a status from after TabbyAPI took its port back, not the one before
    row.recovered_s = node.wait(node.serving, 60, node.describe)
    _cycles(node, 10)
    transcript = said.read_text()
    assert transcript.startswith("ready\n"), transcript  # it did hold the port
    assert "REQUEST" not in transcript, transcript  # not a byte went over its connection
    assert node.alive(squatter)  # never signalled
    commands = [r for r in node.actions() if r.action in (*RESTART_ACTIONS, "stop_unit")]
    assert commands == [], [r.fields for r in commands]
    assert node.actions("kill_orphan") == []
    after = node.show()
    assert (after["MainPID"], after["ActiveState"]) == (restarted["MainPID"], "active"), after
    assert after["NRestarts"] == before["NRestarts"], (before, after)
    assert not any(f["rule"] in ("restart_loop", "sticky_unhealthy") for f in node.findings())
    foreign = node.first(lambda r: r.rule == "foreign_holder")
    row.detected_s = _seconds(node, foreign)  # seen while it held the port (if a cycle fell then)
    row.restarts = node.restarts_issued()
    assert row.restarts == 0


# --- TabbyAPIRestartLoop -----------------------------------------------------------------------

CAUSES = {
    # cause: words the diagnosis must contain to name it
    "load_fails": "CUDA out of memory",
    "missing_library": "libexlchaosdep.so",
    "model_dir_missing": f"{MODELS}/{MAIN}",
}


def _inject_loop_cause(node: ChaosNode, cause: str) -> None:
    if cause == "load_fails":
        node.set_env(STARTUP_MODEL=MAIN)
        node.faults(load_error="CUDA out of memory. Tried to allocate 20.00 GiB.")
    elif cause == "missing_library":
        node.ns.run(["rm", "-f", STORE_LIB], check=True)  # a NixOS rebuild dropped it
    else:
        node.set_env(STARTUP_MODEL=MAIN)
        node.ns.run(["mv", f"{MODELS}/{MAIN}", f"{MODELS}/.{MAIN}.away"], check=True)


def _fix_loop_cause(node: ChaosNode, cause: str) -> None:
    if cause == "load_fails":
        node.faults()
    elif cause == "missing_library":
        node.ns.run(["cp", f"{STORE_LIB}.keep", STORE_LIB], check=True)
    else:
        node.ns.run(["mv", f"{MODELS}/.{MAIN}.away", f"{MODELS}/{MAIN}"], check=True)


@pytest.mark.parametrize("cause", list(CAUSES))
def test_09_restart_loop(chaos: Chaos, cause: str) -> None:
    """More than max_restarts restarts in the window: stopped, back-off, the cause named, one
    start per step; recovers once fixed; the back-off resets after reset_after of health."""
    node, row = chaos
    row.scenario = f"09_restart_loop[{cause}]"
    _inject_loop_cause(node, cause)
    assert node.systemctl("restart", TABBY_UNIT).returncode == 0  # the operator's restart

    def stopped() -> Record | None:
        return node.first(lambda r: r.rule == "restart_loop" and r.action == "stop_unit")

    node.wait(lambda: stopped() is not None, 90, node.describe)
    stop = stopped()
    assert stop is not None and stop.event == "action"
    assert f"(max {MAX_RESTARTS})" in stop.get("HYDRA_REASON"), stop.fields
    row.detected_s = _seconds(node, stop)
    node.wait(lambda: node.show()["ActiveState"] in ("inactive", "failed"), 30, "the unit stopped")
    # The diagnosis names the cause.
    words = CAUSES[cause]
    node.wait(
        lambda: any(words in r.message for r in node.decisions() if r.event == "diagnosis"),
        60,
        lambda: f"a diagnosis naming {words!r} ({node.describe()})",
    )
    if cause == "missing_library":
        # A restart cannot fix a missing library: attempts are deferred, not made.
        _cycles(node, int(2 * backoff_delay(2, chaos_config()) / INTERVAL))
        assert node.actions("start_unit") == []
        assert node.status()["backoff"]["step"] == 1
        libs = node.first(lambda r: r.rule == "missing_libraries")
        assert libs is not None and libs.get("PRIORITY") == "2"  # CRIT
    else:
        node.wait(lambda: node.status()["backoff"]["step"] >= 2, 90, node.describe)  # grows
    _fix_loop_cause(node, cause)
    fixed_at = node.wait(node.serving, 90, node.describe)
    row.recovered_s = fixed_at

    # One start per step, each no earlier than its back-off delay after the stop.
    cfg = chaos_config()
    sequence = [
        r
        for r in node.actions()
        if r.event == "action"
        and (r.action == "start_unit" or (r.action == "stop_unit" and r.rule == "restart_loop"))
    ]
    steps = 0
    last_stop: Record | None = None
    for r in sequence:
        if r.action == "stop_unit":
            assert last_stop is None, "two loop stops without a start attempt between them"
            steps += 1
            last_stop = r
        else:
            assert last_stop is not None, f"a start without a back-off step: {r.fields}"
            assert r.rule == "backoff_attempt", r.fields
            assert r.at - last_stop.at >= backoff_delay(steps, cfg) - 0.2
            last_stop = None
    assert last_stop is None, "the last step made no start attempt"
    assert steps >= (1 if cause == "missing_library" else 2)

    # Back-off resets only after reset_after of health. Health begins no sooner than the start
    # that fixed it (the daemon's own record), and before the model is served: `fixed_at` (the
    # test seeing the model) can lag /health by a load and a cycle or two on a loaded machine.
    node.wait(lambda: node.status()["backoff"]["step"] == 0, 60, node.describe)
    reset = node.first(lambda r: r.rule == "backoff_reset")
    assert reset is not None
    last_start = [r for r in sequence if r.action == "start_unit"][-1]
    assert reset.at - last_start.at >= RESET_AFTER
    assert node.actions("kill_orphan") == []  # nothing was signalled
    row.restarts = node.restarts_issued()
    assert row.restarts == steps  # exactly the back-off attempts


# --- preventive: power limits ------------------------------------------------------------------


def _limits(node: ChaosNode) -> dict[int, float]:
    state = nvml_state.read_state(node.nvml())
    return {d.index: d.power_limit_mw / 1000 for d in state.devices}


def test_10_power_limit_drift(chaos: Chaos) -> None:
    """A driver reset puts both GPUs back at their default limit: re-applied."""
    node, row = chaos
    before = node.show()
    nvml_state.driver_reset(node.nvml())
    assert _limits(node) == {0: 575.0, 1: 450.0}
    row.recovered_s = node.wait(lambda: _limits(node) == POWER_TARGETS, 30, node.describe)
    sets = node.actions("set_power_limit")
    row.detected_s = _seconds(node, sets[0] if sets else None)
    assert sorted(r.get("GPU_INDEX") for r in sets) == ["0", "1"], [r.fields for r in sets]
    assert all(r.event == "action" and r.rule == "power_limit" for r in sets)
    by_gpu = {r.get("GPU_INDEX"): r.get("HYDRA_REASON") for r in sets}
    assert "limit 575 W, target 450 W" in by_gpu["0"]
    assert "limit 450 W, target 300 W" in by_gpu["1"]
    _cycles(node, 4)
    assert len(node.actions("set_power_limit")) == 2  # applied once, not every cycle
    _assert_unit_untouched(node, before)
    assert node.actions("kill_orphan") == []  # nothing was signalled
    row.restarts = node.restarts_issued()
    assert row.restarts == 0


def test_10b_power_limit_no_permission(chaos: Chaos) -> None:
    """NoPermission on the power limit: tried once per GPU, reported, not retried every cycle."""
    node, row = chaos
    nvml_state.set_fault(
        node.nvml(), "nvmlDeviceSetPowerManagementLimit", nvml_state.NvmlCode.NO_PERMISSION
    )
    nvml_state.driver_reset(node.nvml())
    node.wait(lambda: len(node.actions("set_power_limit")) >= 2, 30, node.describe)
    tries = node.actions("set_power_limit")
    row.detected_s = _seconds(node, tries[0])
    _cycles(node, 10)
    # An action after a failed one in the same decision is skipped (never run), not tried.
    records = node.actions("set_power_limit")
    tries = [r for r in records if r.get("HYDRA_ERROR_KIND") == "no_permission"]
    skipped = [r for r in records if r not in tries]
    assert sorted(r.get("GPU_INDEX") for r in tries) == ["0", "1"], [r.fields for r in records]
    assert all(r.event == "action_failed" for r in tries)
    assert all(": skipped:" in r.message for r in skipped), [r.message for r in skipped]
    assert _limits(node) == {0: 575.0, 1: 450.0}
    reported = [f for f in node.findings() if f["rule"] == "power_limit"]
    assert len(reported) == 2 and all("CAP_SYS_ADMIN" in f["message"] for f in reported)
    diagnoses = [r for r in node.decisions() if r.event == "diagnosis" and r.rule == "power_limit"]
    # Told once, not every cycle. (narrate.py folds digits when it dedups findings, so gpu1's
    # finding reads as gpu0's and only one record appears: reported to the lead.)
    assert 1 <= len(diagnoses) <= 2, [r.message for r in diagnoses]
    assert node.status()["phase"] == "healthy"
    assert node.actions("kill_orphan") == []  # nothing was signalled
    row.restarts = node.restarts_issued()
    assert row.restarts == 0


# --- TabbyAPISlowHealthCheck -------------------------------------------------------------------


def test_11_slow_health(chaos: Chaos) -> None:
    """/health above slow_threshold, under the timeout: degraded, throttle reasons recorded,
    never restarted."""
    node, row = chaos
    before = node.show()
    nvml_state.set_device(node.nvml(), 0, reasons=0x4 | 0x40, temperature_c=88, util_gpu=100)
    node.faults(slow_seconds=1.5)
    row.detected_s = node.wait(lambda: node.status().get("phase") == "degraded", 60, node.describe)
    slow = next(f for f in node.findings() if f["rule"] == "slow_health")
    assert "sw_power_cap" in slow["message"] and "hw_thermal_slowdown" in slow["message"]
    assert "88°C" in slow["message"]
    _cycles(node, 4)
    assert node.status().get("phase") == "degraded"
    assert node.first(lambda r: r.rule == "slow_health" and r.event == "diagnosis") is not None
    node.faults()
    nvml_state.set_device(node.nvml(), 0, reasons=0x1, temperature_c=38, util_gpu=0)
    row.recovered_s = node.wait(node.serving, 60, node.describe)
    _assert_unit_untouched(node, before)
    assert node.actions("kill_orphan") == []  # nothing was signalled
    row.restarts = node.restarts_issued()
    assert row.restarts == 0
    assert node.actions() == []  # diagnosed only


# --- VRAM check before a load -----------------------------------------------------------------


def test_12_not_enough_vram(chaos: Chaos) -> None:
    """A foreign process holds most of the VRAM: the main model's load is refused with the
    reason, the fallback (which fits) is loaded, and the foreign process is left alone."""
    node, row = chaos
    before = node.show()
    foreign = node.spawn(["sleep", "86399"], "sleep 86399")
    nvml_state.set_process(node.nvml(), 0, foreign, 22 * GIB)
    nvml_state.set_process(node.nvml(), 1, foreign, 20 * GIB)
    node.unload()
    row.recovered_s = node.wait(lambda: node.serving(FALLBACK), 60, node.describe)
    refused = node.first(lambda r: r.rule == "vram_check" and "refused" in r.message)
    assert refused is not None, [r.message for r in node.decisions()]
    assert f"load of {MAIN} refused: needs {20:.1f} GiB" in refused.message
    assert f"held by pid {foreign} (sleep 86399)" in refused.message
    row.detected_s = _seconds(node, refused)
    loads = node.actions("load_model")
    assert [(r.rule, r.event) for r in loads] == [("fallback_model", "action")]
    assert [(entry["status"]) for entry in node.loads()] == [200]
    assert all(MAIN not in str(entry) for entry in node.loads())
    code, body = node.http("/v1/model")
    assert code == 200 and FALLBACK in body
    assert node.alive(foreign)
    assert node.actions("kill_orphan") == []
    _assert_unit_untouched(node, before)
    row.restarts = node.restarts_issued()
    assert row.restarts == 0


# --- maintenance mode ---------------------------------------------------------------------------


def test_13_pause(chaos: Chaos) -> None:
    """Paused: the fault is observed, nothing is done. `resume`: recovered."""
    node, row = chaos
    before = node.show()
    paused = node.cli("pause", "--for", "60s", "--reason", "chaos maintenance")
    assert paused.returncode == 0, paused.stderr
    node.wait(lambda: node.status().get("phase") == "paused", 30, node.describe)
    node.faults(sticky_503=True)
    node.wait(
        lambda: any(r["path"] == "/health" and r["status"] == 503 for r in node.requests(node.t0)),
        30,
        "a 503 from /health",
    )
    node.faults()

    def observed() -> bool:
        s = node.status()
        return (s.get("health") or {}).get("status") == 503 and s.get("phase") == "paused"

    row.detected_s = node.wait(observed, 30, node.describe)
    _cycles(node, 8)
    code, doc = node.status_cli()
    paused = doc["report"]["paused"]
    assert paused["paused"] is True and paused["reason"] == "chaos maintenance", doc
    assert code == 1 and doc["verdict"] == "WARNING"  # paused is a warning
    assert node.actions() == []
    _assert_unit_untouched(node, before)

    resumed = node.cli("resume")
    assert resumed.returncode == 0 and "resumed" in resumed.stdout
    row.recovered_s = node.wait(node.serving, 60, node.describe)
    restart = _restart_record(node)
    assert restart is not None and restart.rule == "sticky_unhealthy"
    assert node.actions("kill_orphan") == []  # nothing was signalled
    row.restarts = node.restarts_issued()
    assert row.restarts == 1, ONE_RESTART


# --- the watchdog's own failures ---------------------------------------------------------------


def test_14_watchdog_killed_in_backoff(chaos: Chaos) -> None:
    """kill -9 of the watchdog while it backs off: systemd restarts it and the back-off (step,
    next attempt) survives in its state file."""
    node, row = chaos
    node.faults(exit_code=1)  # crashes at every start: a restart loop
    node.wait(lambda: node.status().get("phase") == "backoff", 90, node.describe)
    row.detected_s = _seconds(node, node.first(lambda r: r.rule == "restart_loop"))
    backoff = node.status()["backoff"]
    old = node.show(WATCHDOG)
    assert node.systemctl("kill", "-s", "KILL", WATCHDOG).returncode == 0
    node.wait(
        lambda: (
            node.show(WATCHDOG)["MainPID"] not in ("0", old["MainPID"])
            and node.status().get("pid") == int(node.show(WATCHDOG)["MainPID"])
        ),
        60,
        "the watchdog restarted by systemd, publishing again",
    )
    now = node.show(WATCHDOG)
    assert int(now["NRestarts"]) == int(old["NRestarts"]) + 1
    assert "status=9/KILL" in node.unit_log(WATCHDOG)
    after = node.status()["backoff"]
    assert after["step"] >= backoff["step"] >= 1, (backoff, after)
    # Same instant (the status converts monotonic stamps to wall time: float noise only).
    assert abs(after["loop_since"] - backoff["loop_since"]) < 0.05, (backoff, after)
    node.faults()
    row.recovered_s = node.wait(node.serving, 90, node.describe)
    # Every start was a back-off attempt: the restarted watchdog did not start afresh.
    starts = node.actions("start_unit")
    assert starts and all(r.rule == "backoff_attempt" for r in starts), [r.fields for r in starts]
    assert node.actions("kill_orphan") == []  # nothing was signalled
    row.restarts = node.restarts_issued()
    assert row.restarts == len(starts)


def test_14b_watchdog_loop_hung(chaos: Chaos) -> None:
    """The loop hangs (test hook): no WATCHDOG=1 pings, so systemd's WatchdogSec kills and
    restarts it. TabbyAPI is not touched."""
    node, row = chaos
    before = node.show()
    old = node.show(WATCHDOG)
    hang = node.host_path(f"{STATE_DIR}/hang-loop")
    hang.write_text("")
    try:
        node.wait(
            lambda: "Watchdog timeout" in node.unit_log(WATCHDOG),
            WATCHDOG_SEC + 60,
            "systemd's watchdog timeout",
        )
    finally:
        hang.unlink()
    row.detected_s = node.wait(
        lambda: node.show(WATCHDOG)["MainPID"] not in ("0", old["MainPID"]), 60, "a new watchdog"
    )
    assert int(node.show(WATCHDOG)["NRestarts"]) == int(old["NRestarts"]) + 1
    assert f"Watchdog timeout (limit {WATCHDOG_SEC}s)!" in node.unit_log(WATCHDOG)
    row.recovered_s = node.wait(
        lambda: node.serving() and node.status().get("pid") == int(node.show(WATCHDOG)["MainPID"]),
        60,
        node.describe,
    )
    _assert_unit_untouched(node, before)
    assert node.actions("kill_orphan") == []  # nothing was signalled
    row.restarts = node.restarts_issued()
    assert row.restarts == 0


# --- the models mount ---------------------------------------------------------------------------


def test_15_model_mount_missing(chaos: Chaos) -> None:
    """/mnt/models unmounted and the model gone: no load-attempt loop, CRITICAL with the cause.
    Once the mount is back, the model is loaded once."""
    node, row = chaos
    before = node.show()
    node.ns.run(["umount", MODELS], check=True)
    node.unload()

    def blocked() -> bool:
        s = node.status()
        return s.get("verdict") == 2 and any(f["rule"] == "models_mount" for f in node.findings())

    row.detected_s = node.wait(blocked, 30, node.describe)
    _cycles(node, 10)
    code, doc = node.status_cli()
    assert code == 2 and doc["report"]["phase"] == "blocked", doc
    mount = next(f for f in doc["report"]["findings"] if f["rule"] == "models_mount")
    assert MODELS in mount["message"] and "mount" in mount["message"]
    assert mount["severity"] == "crit"
    assert node.loads() == []  # no load-attempt loop
    assert node.actions() == []
    diag = node.first(lambda r: r.rule == "models_mount")
    assert diag is not None and diag.get("PRIORITY") == "2"
    _assert_unit_untouched(node, before)

    node.reset_models()
    row.recovered_s = node.wait(node.serving, 60, node.describe)
    assert [entry["status"] for entry in node.loads()] == [200]
    assert node.actions("kill_orphan") == []  # nothing was signalled
    row.restarts = node.restarts_issued()
    assert row.restarts == 0


def test_16_watchdog_restarted_mid_load(chaos: Chaos) -> None:
    """`systemctl restart hydra-watchdog` while it loads the model (the exl2 build cancels a load
    whose client disconnects): the load goes on in its helper unit, the restarted watchdog sends
    no second load and takes the outcome; the stop needs no SIGKILL (issue 12 item 5)."""
    node, row = chaos
    helper = unit_name(MAIN)
    node.faults(load_seconds=8.0, modules=16)
    node.unload()
    node.wait(lambda: node.show(helper).get("ActiveState") == "active", 60, "the load helper unit")
    row.detected_s = _seconds(node, node.first(lambda r: r.action == "load_model"))
    old = node.show(WATCHDOG)
    try:
        assert node.systemctl("restart", WATCHDOG).returncode == 0
        assert node.show(WATCHDOG)["MainPID"] not in ("0", old["MainPID"])
        row.recovered_s = node.wait(node.serving, 60, node.describe)
        _cycles(node, 4)  # a second load would show up here
    finally:
        node.systemctl("stop", helper)
    loads = node.loads()
    assert [(e["status"], e["result"]) for e in loads] == [(200, "loaded")], loads
    assert len(node.actions("load_model")) == 1, [r.fields for r in node.actions()]
    assert not node.first(lambda r: "lost" in r.message), node.timeline()
    said = node.unit_log(WATCHDOG)
    assert "SIGKILL" not in said and "timed out" not in said, said[-2000:]
    row.restarts = node.restarts_issued()
    assert row.restarts == 0
