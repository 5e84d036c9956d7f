# ruff: noqa: F811  (pytest fixtures imported from tests/harness are redefined as arguments)
"""Actuators against real parts: real processes and signals, the real systemctl adapter, NVML
through pynvml and the simulated library, TabbyAPI's simulator over real HTTP."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from hydra_watchdog.act.executor import Executor
from hydra_watchdog.act.fallback_route import check_fallback_route
from hydra_watchdog.act.gpu_reset import reset_gpu
from hydra_watchdog.act.load import ModelLoader
from hydra_watchdog.act.orphans import kill_orphan
from hydra_watchdog.act.power import set_power_limit
from hydra_watchdog.act.unit import run_unit_command
from hydra_watchdog.actions import (
    Action,
    ActionResult,
    CheckFallbackRoute,
    KillOrphan,
    LoadModel,
    Reason,
    ResetGpu,
    ResultStatus,
    SetPowerLimit,
    UnitCommand,
    UnitVerb,
)
from hydra_watchdog.adapters.fallback_route import LiteLlmRoute
from hydra_watchdog.adapters.gpu import NvmlGpu
from hydra_watchdog.adapters.gpu_reset import NvidiaSmiReset
from hydra_watchdog.adapters.host import HostProbe
from hydra_watchdog.adapters.identity import read_identity
from hydra_watchdog.adapters.process_control import PidfdControl
from hydra_watchdog.adapters.procs import ProcScanner
from hydra_watchdog.adapters.systemd import SystemctlUnit
from hydra_watchdog.adapters.tabby import TabbyClient
from hydra_watchdog.config import Config, GpuDevice, OrphansSection, parse_config
from hydra_watchdog.interfaces import Adapters, PowerSetOutcome
from hydra_watchdog.observation import GpuReport
from hydra_watchdog.sim import nvml_state as ns
from hydra_watchdog.states import Rule
from tests.harness.nvml import NvmlSim, nvml_sim, nvml_sim_library  # noqa: F401
from tests.harness.systemd_ns import SystemdNamespace
from tests.harness.tabby import (  # noqa: F401
    ADMIN_KEY,
    SimProcess,
    TabbySims,
    tabby_sim,
    trusted_listener,
    wait_for,
)

WHY = Reason(Rule.ORPHAN_CLEANUP, "holds 18 GiB outside the unit's cgroup")
MARK = "hydra-watchdog-test-orphan"

# A process that looks like TabbyAPI (the pattern is in argv) and says when it is ready.
_ORPHAN = """
import signal, sys, time
if sys.argv[1] == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(600)
"""


class Orphans:
    """Processes run as `python <install>/orphan.py MODE MARK`: TabbyAPI's program by the
    identity rules when `install` is the configured install tree."""

    def __init__(self, install: Path) -> None:
        self.install = install
        self.procs: list[subprocess.Popen[str]] = []
        install.mkdir(parents=True, exist_ok=True)
        (install / "orphan.py").write_text(_ORPHAN)

    def spawn(self, mode: str = "default") -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, str(self.install / "orphan.py"), mode, MARK],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"  # signal handlers are in place
        return proc


@pytest.fixture
def orphans(tmp_path: Path) -> Iterator[Orphans]:
    o = Orphans(tmp_path / "tabbyapi")
    yield o
    for proc in o.procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def _kill_action(pid: int) -> KillOrphan:
    ident = read_identity(pid)
    assert ident is not None
    return KillOrphan(pid, ident.start_ticks, ident.cmdline, ident.uid, WHY)


def _alive(proc: subprocess.Popen[str]) -> bool:
    return proc.poll() is None


def _reaper(proc: subprocess.Popen[str]) -> threading.Thread:
    # The test process is the orphan's parent; reaping it promptly is what PID 1 does for a
    # real orphan.
    t = threading.Thread(target=proc.wait, daemon=True)
    t.start()
    return t


# --- kill orphan ---------------------------------------------------------------------------------


def test_orphan_that_obeys_sigterm_exits_on_it(orphans: Orphans) -> None:
    proc = orphans.spawn()
    _reaper(proc)
    result = kill_orphan(
        _kill_action(proc.pid),
        OrphansSection(term_grace=30.0),
        unit="tabbyapi.service",
        processes=PidfdControl(),
    )
    assert result.status is ResultStatus.OK, result.detail
    assert "SIGTERM" in result.detail and "SIGKILL" not in result.detail
    assert proc.wait(30) == -signal.SIGTERM


def test_orphan_that_ignores_sigterm_gets_sigkill_after_the_grace(orphans: Orphans) -> None:
    proc = orphans.spawn("ignore-term")
    _reaper(proc)
    started = time.monotonic()
    result = kill_orphan(
        _kill_action(proc.pid),
        OrphansSection(term_grace=0.5),
        unit="tabbyapi.service",
        processes=PidfdControl(),
    )
    assert result.status is ResultStatus.OK, result.detail
    assert "SIGKILL" in result.detail
    assert time.monotonic() - started >= 0.5  # the grace was honoured before SIGKILL
    assert proc.wait(30) == -signal.SIGKILL


def test_orphan_zombie_counts_as_gone_even_unreaped(orphans: Orphans) -> None:
    # No reaper: the killed child stays a zombie; it has freed its memory and sockets.
    proc = orphans.spawn()
    result = kill_orphan(
        _kill_action(proc.pid),
        OrphansSection(term_grace=30.0),
        unit="tabbyapi.service",
        processes=PidfdControl(),
    )
    assert result.status is ResultStatus.OK, result.detail
    assert proc.wait(30) == -signal.SIGTERM


def test_changed_start_time_is_refused_and_never_signalled(orphans: Orphans) -> None:
    proc = orphans.spawn()
    action = _kill_action(proc.pid)
    stale = replace(action, start_ticks=action.start_ticks - 700)  # a PID reused since
    result = kill_orphan(
        stale, OrphansSection(term_grace=0.1), unit="tabbyapi.service", processes=PidfdControl()
    )
    assert result.status is ResultStatus.REFUSED
    assert result.error_kind == "identity_changed"
    time.sleep(0.2)  # would a stray SIGTERM have landed? (the process exits at once on it)
    assert _alive(proc)


def test_changed_cmdline_is_refused_and_never_signalled(orphans: Orphans) -> None:
    proc = orphans.spawn()
    action = replace(_kill_action(proc.pid), cmdline=("/opt/tabbyapi/venv/bin/python", "main.py"))
    result = kill_orphan(
        action, OrphansSection(term_grace=0.1), unit="tabbyapi.service", processes=PidfdControl()
    )
    assert result.status is ResultStatus.REFUSED
    assert result.error_kind == "identity_changed"
    time.sleep(0.2)
    assert _alive(proc)


def test_vanished_process_is_refused(orphans: Orphans) -> None:
    proc = orphans.spawn()
    action = _kill_action(proc.pid)
    proc.kill()
    proc.wait(30)
    result = kill_orphan(
        action, OrphansSection(term_grace=0.1), unit="tabbyapi.service", processes=PidfdControl()
    )
    assert result.status is ResultStatus.REFUSED
    assert result.error_kind == "identity_changed"


def test_orphan_killing_disabled_refuses_outright(orphans: Orphans) -> None:
    proc = orphans.spawn()
    result = kill_orphan(
        _kill_action(proc.pid),
        OrphansSection(enabled=False),
        unit="tabbyapi.service",
        processes=PidfdControl(),
    )
    assert (result.status, result.error_kind) == (ResultStatus.REFUSED, "disabled")
    time.sleep(0.2)
    assert _alive(proc)


# --- the executor --------------------------------------------------------------------------------


def _config(tmp_path: Path, **sections: dict[str, object]) -> Config:
    data: dict[str, object] = {
        "watchdog": {"state_dir": str(tmp_path / "state"), "runtime_dir": str(tmp_path / "run")},
        "tabbyapi": {"unit": "tabbyapi.service"},
        "orphans": {"term_grace": "200ms"},
    }
    for name, table in sections.items():
        base = data.get(name, {})
        assert isinstance(base, dict)
        data[name] = {**base, **table}
    return parse_config(data)


def _no_systemd(tmp_path: Path) -> SystemctlUnit:
    # The real adapter, pointed at a root without /run/systemd/system: "no systemd here".
    root = tmp_path / "root-without-systemd"
    root.mkdir(exist_ok=True)
    return SystemctlUnit("tabbyapi.service", root=str(root))


def _executor(tmp_path: Path, *, dry_run: bool = False, config: Config | None = None) -> Executor:
    cfg = config or _config(tmp_path)
    # Adapters that must not be reached in these tests point at nothing (a closed port, no
    # NVML library): reaching them would show as a failure, not pass silently.
    return Executor(
        cfg,
        Adapters(
            tabby=TabbyClient(
                "http://127.0.0.1:9", admin_key=None, health_timeout=1.0, gate=trusted_listener
            ),
            gpu=NvmlGpu(library_path=str(tmp_path / "no-libnvidia-ml.so.1"), call_timeout=1.0),
            units=_no_systemd(tmp_path),
            scanner=ProcScanner.from_config(cfg),
            host=HostProbe.from_config(cfg),
            fallback=LiteLlmRoute(),
            processes=PidfdControl(),
            reset=NvidiaSmiReset((str(tmp_path / "no-nvidia-smi"),)),
        ),
        dry_run=dry_run,
    )


def test_dry_run_never_signals_and_says_would(orphans: Orphans, tmp_path: Path) -> None:
    proc = orphans.spawn()
    actions: list[Action] = [
        _kill_action(proc.pid),
        UnitCommand(UnitVerb.RESTART, "tabbyapi.service", Reason(Rule.DOWN, "refused x3")),
        SetPowerLimit(0, 450.0, Reason(Rule.POWER_LIMIT, "575 W, want 450 W")),
    ]
    results = _executor(tmp_path, dry_run=True).run(actions)
    assert [r.status for r in results] == [ResultStatus.DRY_RUN] * 3
    assert results[0].detail.startswith("would kill orphan")
    assert results[1].detail == "would restart tabbyapi.service"
    assert all(r.succeeded for r in results)
    time.sleep(0.3)
    assert _alive(proc)


def test_after_a_failure_the_rest_of_the_batch_is_skipped(orphans: Orphans, tmp_path: Path) -> None:
    victim, bystander = orphans.spawn(), orphans.spawn()
    _reaper(victim)
    actions: list[Action] = [
        _kill_action(victim.pid),
        UnitCommand(UnitVerb.STOP, "tabbyapi.service", Reason(Rule.FULL_RECOVERY, "stop first")),
        _kill_action(bystander.pid),
        UnitCommand(UnitVerb.START, "tabbyapi.service", Reason(Rule.FULL_RECOVERY, "start")),
    ]
    results = _executor(tmp_path).run(actions)
    assert [r.status for r in results] == [
        ResultStatus.OK,
        ResultStatus.REFUSED,  # no systemd behind the adapter
        ResultStatus.SKIPPED,
        ResultStatus.SKIPPED,
    ]
    assert "stop tabbyapi.service" in results[2].detail
    assert victim.wait(30) == -signal.SIGTERM
    time.sleep(0.3)
    assert _alive(bystander)


def test_an_actuator_that_raises_becomes_a_failed_result(tmp_path: Path) -> None:
    class Exploding:
        def read(self, devices: Sequence[GpuDevice]) -> GpuReport:
            raise AssertionError("not read by the actuator")

        def set_power_limit(self, index: int, watts: float) -> PowerSetOutcome:
            raise RuntimeError("boom")

        def close(self) -> None:
            pass

    ex = _executor(tmp_path)
    ex.adapters = replace(ex.adapters, gpu=Exploding())
    result = ex.run_one(SetPowerLimit(0, 450.0, Reason(Rule.POWER_LIMIT, "drift")))
    assert (result.status, result.error_kind) == (ResultStatus.FAILED, "exception")
    assert "boom" in result.detail


# --- the unit ------------------------------------------------------------------------------------


def _fake_systemd_root(tmp_path: Path) -> str:
    root = tmp_path / "root-with-systemd"
    (root / "run/systemd/system").mkdir(parents=True, exist_ok=True)
    return str(root)


@pytest.mark.parametrize(
    ("prefix", "status", "kind"),
    [
        # The real adapter runs `<prefix> systemctl restart tabbyapi.service`; these prefixes are
        # real programs that stand in for systemctl's answer without touching this host's systemd.
        (("true",), ResultStatus.OK, ""),
        (
            ("sh", "-c", "echo 'Job failed: unit not found' >&2; exit 5", "sh"),
            ResultStatus.FAILED,
            "command_failed",
        ),
    ],
)
def test_unit_command_maps_the_adapters_outcome(
    tmp_path: Path, prefix: tuple[str, ...], status: ResultStatus, kind: str
) -> None:
    units = SystemctlUnit("tabbyapi.service", argv_prefix=prefix, root=_fake_systemd_root(tmp_path))
    action = UnitCommand(UnitVerb.RESTART, "tabbyapi.service", Reason(Rule.DOWN, "503 sticky"))
    result = run_unit_command(action, units, "tabbyapi.service")
    assert (result.status, result.error_kind) == (status, kind)
    assert "restart tabbyapi.service" in result.detail


def test_unit_command_without_systemd_is_refused(tmp_path: Path) -> None:
    action = UnitCommand(UnitVerb.START, "tabbyapi.service", Reason(Rule.BACKOFF_ATTEMPT, "step 2"))
    result = run_unit_command(action, _no_systemd(tmp_path), "tabbyapi.service")
    assert (result.status, result.error_kind) == (ResultStatus.REFUSED, "unavailable")
    assert "not the init system" in result.detail


def test_unit_command_for_another_unit_is_refused(tmp_path: Path) -> None:
    units = SystemctlUnit(
        "tabbyapi.service", argv_prefix=("true",), root=_fake_systemd_root(tmp_path)
    )
    action = UnitCommand(UnitVerb.STOP, "sshd.service", Reason(Rule.DOWN, "x"))
    result = run_unit_command(action, units, "tabbyapi.service")
    assert (result.status, result.error_kind) == (ResultStatus.REFUSED, "wrong_unit")


# --- power limit ---------------------------------------------------------------------------------


@pytest.fixture
def gpu(nvml_sim: NvmlSim) -> Iterator[NvmlGpu]:
    yield NvmlGpu(library_path=str(nvml_sim.library), call_timeout=5.0)


def test_power_limit_is_set_and_read_back(gpu: NvmlGpu, nvml_sim: NvmlSim) -> None:
    result = set_power_limit(SetPowerLimit(0, 450.0, Reason(Rule.POWER_LIMIT, "drift")), gpu)
    assert result.status is ResultStatus.OK, result.detail
    assert nvml_sim.read().device(0).power_limit_mw == 450_000


def test_power_limit_without_permission_says_so(gpu: NvmlGpu, nvml_sim: NvmlSim) -> None:
    ns.set_device(nvml_sim.state, 1, set_permission=False)
    result = set_power_limit(SetPowerLimit(1, 300.0, Reason(Rule.POWER_LIMIT, "drift")), gpu)
    assert (result.status, result.error_kind) == (ResultStatus.FAILED, "no_permission")
    assert nvml_sim.read().device(1).power_limit_mw == 450_000


# --- GPU reset -----------------------------------------------------------------------------------


def _reset_script(tmp_path: Path) -> tuple[str, Path]:
    """A stand-in for nvidia-smi that records its argv (never the real one: it would reset a
    real GPU if this machine had one)."""
    log = tmp_path / "reset-argv"
    script = tmp_path / "fake-nvidia-smi"
    script.write_text(f'#!/bin/sh\necho "$@" > {log}\necho "GPU reset ok"\n')
    script.chmod(0o755)
    return str(script), log


def test_gpu_reset_disabled_is_refused(gpu: NvmlGpu, tmp_path: Path) -> None:
    cmd, log = _reset_script(tmp_path)
    result = reset_gpu(
        ResetGpu(0, Reason(Rule.FULL_RECOVERY, "x")),
        enabled=False,
        gpu=gpu,
        install_dirs=("/opt/tabbyapi",),
        user="root",
        unit="tabbyapi.service",
        processes=PidfdControl(),
        resetter=NvidiaSmiReset((cmd,)),
    )
    assert (result.status, result.error_kind) == (ResultStatus.REFUSED, "disabled")
    assert not log.exists()


def test_gpu_reset_refused_while_a_foreign_process_uses_the_gpu(
    gpu: NvmlGpu,
    nvml_sim: NvmlSim,
    orphans: Orphans,
    tmp_path: Path,
) -> None:
    cmd, log = _reset_script(tmp_path)
    other = orphans.spawn()  # its program lies outside /opt/tabbyapi
    ns.set_process(nvml_sim.state, 0, other.pid, 2 * ns.GIB)
    result = reset_gpu(
        ResetGpu(0, Reason(Rule.FULL_RECOVERY, "x")),
        enabled=True,
        gpu=gpu,
        install_dirs=("/opt/tabbyapi",),
        user="root",
        unit="tabbyapi.service",
        processes=PidfdControl(),
        resetter=NvidiaSmiReset((cmd,)),
    )
    assert (result.status, result.error_kind) == (ResultStatus.REFUSED, "foreign_gpu_user")
    assert str(other.pid) in result.detail
    assert not log.exists()


def test_gpu_reset_runs_when_only_tabbyapi_uses_the_gpu(
    gpu: NvmlGpu,
    nvml_sim: NvmlSim,
    orphans: Orphans,
    tmp_path: Path,
) -> None:
    cmd, log = _reset_script(tmp_path)
    ours = orphans.spawn()
    ns.set_process(nvml_sim.state, 0, ours.pid, 2 * ns.GIB)
    result = reset_gpu(
        ResetGpu(0, Reason(Rule.FULL_RECOVERY, "x")),
        enabled=True,
        gpu=gpu,
        install_dirs=(str(orphans.install),),
        user="root",
        unit="tabbyapi.service",
        processes=PidfdControl(),
        resetter=NvidiaSmiReset((cmd,)),
    )
    assert result.status is ResultStatus.OK, result.detail
    assert log.read_text().split() == ["--gpu-reset", "-i", "0"]


def test_gpu_reset_refused_when_the_gpu_cannot_be_read(
    gpu: NvmlGpu, nvml_sim: NvmlSim, tmp_path: Path
) -> None:
    cmd, log = _reset_script(tmp_path)
    ns.set_driver_loaded(nvml_sim.state, False)
    try:
        result = reset_gpu(
            ResetGpu(0, Reason(Rule.FULL_RECOVERY, "x")),
            enabled=True,
            gpu=gpu,
            install_dirs=("/opt/tabbyapi",),
            user="root",
            unit="tabbyapi.service",
            processes=PidfdControl(),
            resetter=NvidiaSmiReset((cmd,)),
        )
    finally:
        ns.set_driver_loaded(nvml_sim.state, True)
    assert (result.status, result.error_kind) == (ResultStatus.REFUSED, "cannot_verify")
    assert not log.exists()


def test_gpu_reset_refused_when_the_gpu_users_cannot_be_listed(
    gpu: NvmlGpu, nvml_sim: NvmlSim, tmp_path: Path
) -> None:
    cmd, log = _reset_script(tmp_path)
    ns.set_fault(
        nvml_sim.state, "nvmlDeviceGetComputeRunningProcesses_v3", ns.NvmlCode.NO_PERMISSION
    )
    result = reset_gpu(
        ResetGpu(0, Reason(Rule.FULL_RECOVERY, "x")),
        enabled=True,
        gpu=gpu,
        install_dirs=("/opt/tabbyapi",),
        user="root",
        unit="tabbyapi.service",
        processes=PidfdControl(),
        resetter=NvidiaSmiReset((cmd,)),
    )
    assert (result.status, result.error_kind) == (ResultStatus.REFUSED, "cannot_verify")
    assert not log.exists()


# --- model load ----------------------------------------------------------------------------------


def _client(sim: SimProcess) -> TabbyClient:
    return TabbyClient(sim.url, admin_key=ADMIN_KEY, health_timeout=5.0, gate=trusted_listener)


def _modules_done(loader: ModelLoader) -> int:
    progress = loader.progress()
    return progress.module if progress is not None else 0


def _drain_until(loader: ModelLoader, timeout: float) -> tuple[ActionResult, ...]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = loader.drain()
        if done:
            return done
        time.sleep(0.05)
    raise AssertionError(f"no load result within {timeout} s")


def test_load_runs_in_the_background_one_at_a_time(tabby_sim: TabbySims) -> None:
    sim = tabby_sim.start(flavor="exl2", load_seconds=2.0, modules=8)
    loader = ModelLoader(_client(sim), load_timeout=60.0)
    first = loader.start(LoadModel("m1", None, Reason(Rule.NO_MODEL, "no model")))
    assert first.status is ResultStatus.IN_PROGRESS
    second = loader.start(LoadModel("m2", None, Reason(Rule.NO_MODEL, "no model")))
    assert (second.status, second.error_kind) == (ResultStatus.REFUSED, "load_in_flight")
    wait_for(lambda: _modules_done(loader) > 0, 30, "load progress")
    progress = loader.progress()
    assert progress is not None and progress.model == "m1" and progress.modules == 8
    (final,) = _drain_until(loader, 60)
    assert final.status is ResultStatus.OK, final.detail
    assert isinstance(final.action, LoadModel) and final.action.model == "m1"
    assert final.duration_s is not None and 2.0 <= final.duration_s < 60  # loads for 2 s
    assert loader.progress() is None
    assert len(sim.loads()) == 1  # the refused second load never reached TabbyAPI


def test_load_failure_arrives_later_as_failed(tabby_sim: TabbySims) -> None:
    sim = tabby_sim.start(flavor="modern", faults={"load_error": "CUDA out of memory"})
    loader = ModelLoader(_client(sim), load_timeout=60.0)
    assert loader.start(LoadModel("m1", None, Reason(Rule.NO_MODEL, "x"))).status is (
        ResultStatus.IN_PROGRESS
    )
    (final,) = _drain_until(loader, 60)
    assert (final.status, final.error_kind) == (ResultStatus.FAILED, "load_error")
    assert "out of memory" in final.detail
    # the failed one is finished: a new load may start
    assert loader.start(LoadModel("m1", None, Reason(Rule.NO_MODEL, "x"))).status is (
        ResultStatus.IN_PROGRESS
    )
    _drain_until(loader, 60)


def test_shutdown_cancels_a_load_in_flight(tabby_sim: TabbySims) -> None:
    sim = tabby_sim.start(flavor="exl2", load_seconds=60.0, modules=100)
    loader = ModelLoader(_client(sim), load_timeout=600.0)
    loader.start(LoadModel("m1", None, Reason(Rule.NO_MODEL, "x")))
    wait_for(lambda: _modules_done(loader) > 0, 30, "load progress")
    assert loader.cancel(wait=30.0)
    (final,) = loader.drain()
    assert (final.status, final.error_kind) == (ResultStatus.FAILED, "cancelled")


# --- fallback route ------------------------------------------------------------------------------


def test_fallback_route_ok_and_down(tabby_sim: TabbySims) -> None:
    proxy = tabby_sim.start(flavor="modern", auth=False, startup_model="m1")
    client = LiteLlmRoute()
    ok = check_fallback_route(
        CheckFallbackRoute(proxy.url, "m1", Reason(Rule.FALLBACK_ROUTE, "escalated")), client, 10.0
    )
    assert ok.status is ResultStatus.OK, ok.detail
    proxy.stop()
    down = check_fallback_route(
        CheckFallbackRoute(proxy.url, "m1", Reason(Rule.FALLBACK_ROUTE, "escalated")), client, 5.0
    )
    assert (down.status, down.error_kind) == (ResultStatus.FAILED, "refused")


@pytest.mark.systemd
def test_a_process_in_the_units_cgroup_is_never_killed_as_an_orphan(
    systemd_ns: SystemdNamespace,
) -> None:
    """The observation that called it an orphan may predate a restart by systemd: the kill
    itself re-checks the cgroup, under real systemd."""
    ns = systemd_ns
    unit = "kill-guard.service"
    ns.install_unit(unit, "[Service]\nExecStart=/bin/sleep 600\n")
    try:
        assert ns.systemctl("start", unit).returncode == 0
        pid = int(ns.wait_for_state(unit, ["active"])["MainPID"])
        code = (
            "from hydra_watchdog.act.orphans import kill_orphan\n"
            "from hydra_watchdog.actions import KillOrphan, Reason\n"
            "from hydra_watchdog.config import OrphansSection\n"
            "from hydra_watchdog.adapters.identity import read_identity\n"
            "from hydra_watchdog.states import Rule\n"
            f"i = read_identity({pid})\n"
            "why = Reason(Rule.ORPHAN_CLEANUP, 't')\n"
            f"a = KillOrphan({pid}, i.start_ticks, i.cmdline, i.uid, why)\n"
            "from hydra_watchdog.adapters.process_control import PidfdControl\n"
            f"r = kill_orphan(a, OrphansSection(term_grace=0.1), unit={unit!r}, "
            "processes=PidfdControl())\n"
            "print(r.status.value, r.error_kind)\n"
        )
        out = ns.python(code)
        assert out.stdout.split() == ["refused", "in_unit"], out.stdout + out.stderr
        assert ns.show(unit, "ActiveState", "MainPID") == {
            "ActiveState": "active",
            "MainPID": str(pid),
        }
    finally:
        ns.reset_unit(unit, remove=True)
