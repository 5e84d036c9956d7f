"""NvmlGpu through the real pynvml binding against the simulated libnvidia-ml.so.1."""

from __future__ import annotations

import ctypes.util
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pynvml
import pytest

from hydra_watchdog.adapters.gpu import (
    CallRunner,
    NvmlFailure,
    NvmlGpu,
    RawCall,
    classify,
    decode_clock_event_reasons,
)
from hydra_watchdog.config import GpuDevice
from hydra_watchdog.observation import GpuReport, GpuSnapshot, NvmlErrorKind
from hydra_watchdog.sim import nvml_state as ns
from tests.harness.nvml import NvmlSim, nvml_sim, nvml_sim_library  # noqa: F401

GPU0 = ns.default_state().devices[0]
GPU1 = ns.default_state().devices[1]
BOTH = (GpuDevice(index=0), GpuDevice(index=1))
TIMEOUT = 0.5  # call_timeout in these tests
MARGIN = 1.0  # "returns within call_timeout + small margin", generous for a loaded 2-core box


def wait_until(cond: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(cond) and cond():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def gpu(nvml_sim: NvmlSim) -> Iterator[NvmlGpu]:  # noqa: F811
    adapter = NvmlGpu(library_path=str(nvml_sim.library), call_timeout=TIMEOUT)
    yield adapter
    # Lift hangs first so a stuck call returns and close() can balance nvmlInit.
    ns.clear_faults(nvml_sim.state)
    ns.set_driver_loaded(nvml_sim.state, True)
    assert wait_until(lambda: not adapter._runner.stuck)
    adapter.close()


def only(report: GpuReport) -> GpuSnapshot:
    assert report.error is None, report.detail
    assert len(report.devices) == 1
    return report.devices[0]


# ---- a healthy read -----------------------------------------------------------------------


def test_reads_every_field_of_both_gpus(gpu: NvmlGpu, nvml_sim: NvmlSim) -> None:  # noqa: F811
    ns.set_process(nvml_sim.state, 0, os.getpid(), 20 * ns.GIB)
    ns.set_device(nvml_sim.state, 1, temperature_c=83, util_gpu=99, reasons=0x4 | 0x40)
    report = gpu.read(BOTH)
    assert report.error is None
    g0, g1 = report.devices
    assert g0.errors == () and g1.errors == ()
    assert (g0.index, g0.uuid, g0.name) == (0, GPU0.uuid, "NVIDIA GeForce RTX 5090")
    assert g0.memory_total == 32 * ns.GIB
    assert g0.memory_used == GPU0.mem_base + 20 * ns.GIB  # v2: without the reservation
    assert g0.memory_free == 32 * ns.GIB - GPU0.mem_reserved - g0.memory_used
    assert [(p.pid, p.used_bytes) for p in g0.processes] == [(os.getpid(), 20 * ns.GIB)]
    assert g0.power.usage_w == 32.0
    assert (g0.power.limit_w, g0.power.enforced_w, g0.power.default_w) == (575.0, 575.0, 575.0)
    assert (g0.power.min_w, g0.power.max_w) == (400.0, 600.0)
    assert g0.temperature_c == GPU0.temperature_c
    assert g0.throttle_reasons == ("gpu_idle",)
    assert (g1.index, g1.uuid, g1.name) == (1, GPU1.uuid, "NVIDIA GeForce RTX 4090")
    assert g1.processes == ()
    assert (g1.power.min_w, g1.power.max_w, g1.power.default_w) == (150.0, 450.0, 450.0)
    assert (g1.temperature_c, g1.utilization_pct) == (83, 99)
    assert g1.throttle_reasons == ("sw_power_cap", "hw_thermal_slowdown")


def test_a_gpu_configured_by_uuid(gpu: NvmlGpu) -> None:
    snap = only(gpu.read([GpuDevice(uuid=GPU1.uuid)]))
    assert (snap.index, snap.uuid, snap.name) == (1, GPU1.uuid, GPU1.name)
    assert snap.errors == ()


@pytest.mark.parametrize(
    "device", [GpuDevice(index=5), GpuDevice(uuid="GPU-00000000-dead-beef-0000-000000000000")]
)
def test_a_gpu_that_is_not_there(gpu: NvmlGpu, device: GpuDevice) -> None:
    snap = only(gpu.read([device]))
    assert snap.errors == (("handle", NvmlErrorKind.NOT_FOUND),)
    assert snap.memory_total is None
    assert snap.index == (5 if device.index is not None else -1)


def test_processes_follow_a_real_child(gpu: NvmlGpu, nvml_sim: NvmlSim) -> None:  # noqa: F811
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ns.set_process(nvml_sim.state, 0, child.pid, 18 * ns.GIB)
        snap = only(gpu.read([GpuDevice(index=0)]))
        assert [p.pid for p in snap.processes] == [child.pid]
        assert snap.memory_used == GPU0.mem_base + 18 * ns.GIB
        child.kill()
        child.wait(10)
        snap = only(gpu.read([GpuDevice(index=0)]))
        assert snap.processes == ()
        assert snap.memory_used == GPU0.mem_base
    finally:
        child.kill()
        child.wait(10)


def test_memory_falls_back_to_v1(gpu: NvmlGpu, nvml_sim: NvmlSim) -> None:  # noqa: F811
    # What pynvml raises when the driver lacks nvmlDeviceGetMemoryInfo_v2.
    ns.set_fault(nvml_sim.state, "nvmlDeviceGetMemoryInfo_v2", ns.NvmlCode.FUNCTION_NOT_FOUND)
    snap = only(gpu.read([GpuDevice(index=0)]))
    assert snap.errors == ()
    assert snap.memory_used == GPU0.mem_reserved + GPU0.mem_base  # v1 counts the reservation
    assert snap.memory_free == 32 * ns.GIB - snap.memory_used


def test_both_memory_calls_failing_is_one_error(gpu: NvmlGpu, nvml_sim: NvmlSim) -> None:  # noqa: F811
    ns.set_fault(nvml_sim.state, "nvmlDeviceGetMemoryInfo_v2", ns.NvmlCode.FUNCTION_NOT_FOUND)
    ns.set_fault(nvml_sim.state, "nvmlDeviceGetMemoryInfo", ns.NvmlCode.NOT_SUPPORTED)
    snap = only(gpu.read([GpuDevice(index=0)]))
    assert snap.errors == (("memory", NvmlErrorKind.NOT_SUPPORTED),)
    assert (snap.memory_total, snap.memory_used, snap.memory_free) == (None, None, None)
    assert snap.temperature_c == GPU0.temperature_c


# ---- typed errors -------------------------------------------------------------------------

FIELD_OF_SYMBOL = [
    ("nvmlDeviceGetTemperature", "temperature"),
    ("nvmlDeviceGetPowerUsage", "power usage"),
    ("nvmlDeviceGetPowerManagementLimit", "power limit"),
    ("nvmlDeviceGetEnforcedPowerLimit", "enforced power limit"),
    ("nvmlDeviceGetPowerManagementDefaultLimit", "default power limit"),
    ("nvmlDeviceGetPowerManagementLimitConstraints", "power constraints"),
    ("nvmlDeviceGetUtilizationRates", "utilization"),
    ("nvmlDeviceGetCurrentClocksEventReasons", "clock event reasons"),
    ("nvmlDeviceGetComputeRunningProcesses_v3", "processes"),
    ("nvmlDeviceGetName", "name"),
    ("nvmlDeviceGetUUID", "uuid"),
]


@pytest.mark.parametrize(("symbol", "field"), FIELD_OF_SYMBOL)
def test_a_failing_field_is_reported_and_the_rest_still_read(
    gpu: NvmlGpu,
    nvml_sim: NvmlSim,  # noqa: F811
    symbol: str,
    field: str,
) -> None:
    ns.set_fault(nvml_sim.state, symbol, ns.NvmlCode.NOT_SUPPORTED, gpu=0)
    g0, g1 = gpu.read(BOTH).devices
    assert g0.errors == ((field, NvmlErrorKind.NOT_SUPPORTED),)
    assert g1.errors == ()
    assert g0.memory_total == 32 * ns.GIB  # read despite the failing field
    assert g0.uuid == ("" if field == "uuid" else GPU0.uuid)
    if field == "temperature":
        assert g0.temperature_c is None and g1.temperature_c == GPU1.temperature_c


ERROR_KINDS = [
    (ns.NvmlCode.NO_PERMISSION, NvmlErrorKind.NO_PERMISSION),
    (ns.NvmlCode.NOT_SUPPORTED, NvmlErrorKind.NOT_SUPPORTED),
    (ns.NvmlCode.GPU_IS_LOST, NvmlErrorKind.GPU_LOST),
    (ns.NvmlCode.FUNCTION_NOT_FOUND, NvmlErrorKind.FUNCTION_NOT_FOUND),
    (ns.NvmlCode.NOT_FOUND, NvmlErrorKind.NOT_FOUND),
    (ns.NvmlCode.INVALID_ARGUMENT, NvmlErrorKind.INVALID_ARGUMENT),
    (ns.NvmlCode.TIMEOUT, NvmlErrorKind.TIMEOUT),
    (ns.NvmlCode.LIB_RM_VERSION_MISMATCH, NvmlErrorKind.LIBRARY_MISMATCH),
    (ns.NvmlCode.UNKNOWN, NvmlErrorKind.OTHER),
]


@pytest.mark.parametrize(("code", "kind"), ERROR_KINDS)
def test_each_nvml_error_maps_to_its_kind(
    gpu: NvmlGpu,
    nvml_sim: NvmlSim,  # noqa: F811
    code: int,
    kind: NvmlErrorKind,
) -> None:
    ns.set_fault(nvml_sim.state, "nvmlDeviceGetUtilizationRates", code)
    snap = only(gpu.read([GpuDevice(index=1)]))
    assert snap.errors == (("utilization", kind),)


def test_the_unversioned_process_call_maps_to_library_mismatch(
    gpu: NvmlGpu,
    nvml_sim: NvmlSim,  # noqa: F811
) -> None:
    # NVMLLibraryMismatchError is not an NVMLError: caught by class all the same.
    ns.set_fault(nvml_sim.state, "nvmlDeviceGetComputeRunningProcesses_v3", 13)
    snap = only(gpu.read([GpuDevice(index=0)]))
    assert snap.errors == (("processes", NvmlErrorKind.LIBRARY_MISMATCH),)


def test_classify_never_compares_instances() -> None:
    # NVMLError.__eq__ would raise AttributeError against a non-NVML exception.
    assert (
        classify(pynvml.NVMLLibraryMismatchError("x"), "w").kind is NvmlErrorKind.LIBRARY_MISMATCH
    )
    assert classify(OSError("no such file"), "w").kind is NvmlErrorKind.LIBRARY_NOT_FOUND
    assert classify(ValueError("odd"), "w").kind is NvmlErrorKind.OTHER
    lost = classify(pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST), "gpu0 name")
    assert (lost.kind, lost.code, lost.reinit) == (NvmlErrorKind.GPU_LOST, 15, True)
    assert lost.detail == "gpu0 name: GPU is lost (NVML code 15)"


def test_decode_clock_event_reasons() -> None:
    assert decode_clock_event_reasons(0) == ()
    assert decode_clock_event_reasons(0x1FF) == (
        "gpu_idle", "applications_clocks_setting", "sw_power_cap", "hw_slowdown", "sync_boost",
        "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown",
        "display_clock_setting",
    )  # fmt: skip
    assert decode_clock_event_reasons(0x20 | 0x400) == ("sw_thermal_slowdown", "unknown_0x400")


# ---- what does not change between nvmlInits is read once --------------------------------

FIXED_SYMBOLS = (
    "nvmlDeviceGetUUID",
    "nvmlDeviceGetName",
    "nvmlDeviceGetPowerManagementDefaultLimit",
    "nvmlDeviceGetPowerManagementLimitConstraints",
)


def test_fixed_answers_are_read_once_per_nvml_init(gpu: NvmlGpu, nvml_sim: NvmlSim) -> None:  # noqa: F811
    first = gpu.read(BOTH).devices[0]
    assert first.errors == () and first.name == GPU0.name
    # Were these calls made again, their failures would show: they are not made.
    for symbol in FIXED_SYMBOLS:
        ns.set_fault(nvml_sim.state, symbol, ns.NvmlCode.UNKNOWN, gpu=0)
    again = gpu.read(BOTH).devices[0]
    assert again.errors == ()
    assert (again.index, again.uuid, again.name) == (first.index, first.uuid, first.name)
    assert again.power == first.power
    # A call that asks for re-initialisation: the next read starts over and asks again.
    ns.set_fault(nvml_sim.state, "nvmlDeviceGetTemperature", ns.NvmlCode.GPU_IS_LOST, gpu=1)
    gpu.read(BOTH)
    ns.clear_faults(nvml_sim.state)
    for symbol in FIXED_SYMBOLS:
        ns.set_fault(nvml_sim.state, symbol, ns.NvmlCode.UNKNOWN, gpu=0)
    after = gpu.read(BOTH).devices[0]
    assert set(after.errors) == {
        (what, NvmlErrorKind.OTHER)
        for what in ("uuid", "name", "default power limit", "power constraints")
    }


def test_incomplete_fixed_answers_are_asked_again(gpu: NvmlGpu, nvml_sim: NvmlSim) -> None:  # noqa: F811
    ns.set_fault(nvml_sim.state, "nvmlDeviceGetName", ns.NvmlCode.NOT_SUPPORTED, gpu=0)
    assert gpu.read(BOTH).devices[0].errors == (("name", NvmlErrorKind.NOT_SUPPORTED),)
    assert gpu.read(BOTH).devices[0].errors == (("name", NvmlErrorKind.NOT_SUPPORTED),)
    ns.clear_faults(nvml_sim.state)
    assert gpu.read(BOTH).devices[0].name == GPU0.name
    ns.set_fault(nvml_sim.state, "nvmlDeviceGetName", ns.NvmlCode.NOT_SUPPORTED, gpu=0)
    assert gpu.read(BOTH).devices[0].name == GPU0.name  # complete now: kept


# ---- driver and GPU loss: re-init ---------------------------------------------------------


def test_a_lost_gpu_reinitialises_on_the_next_read(gpu: NvmlGpu, nvml_sim: NvmlSim) -> None:  # noqa: F811
    assert gpu.read(BOTH).error is None
    ns.set_fault(nvml_sim.state, "*", ns.NvmlCode.GPU_IS_LOST, gpu=1)
    report = gpu.read(BOTH)
    assert report.error is None
    assert report.devices[0].errors == ()
    # The handle is known since the first read: every reading it takes fails, none is made up.
    lost = report.devices[1]
    assert lost.errors and {kind for _, kind in lost.errors} == {NvmlErrorKind.GPU_LOST}
    assert (lost.memory_total, lost.temperature_c, lost.power.usage_w) == (None, None, None)
    # Proof that the next read re-initialises: make nvmlInit fail and see it called.
    ns.clear_faults(nvml_sim.state)
    ns.set_fault(nvml_sim.state, "nvmlInitWithFlags", ns.NvmlCode.UNKNOWN)
    report = gpu.read(BOTH)
    assert report.error is NvmlErrorKind.OTHER
    assert "nvmlInit" in report.detail
    ns.clear_faults(nvml_sim.state)
    report = gpu.read(BOTH)
    assert report.error is None and [d.errors for d in report.devices] == [(), ()]


def test_driver_not_loaded_at_start_then_loaded(gpu: NvmlGpu, nvml_sim: NvmlSim) -> None:  # noqa: F811
    ns.set_driver_loaded(nvml_sim.state, False)
    report = gpu.read(BOTH)
    assert report.error is NvmlErrorKind.DRIVER_NOT_LOADED
    assert report.devices == ()
    ns.set_driver_loaded(nvml_sim.state, True)
    report = gpu.read(BOTH)
    assert report.error is None and len(report.devices) == 2


def test_driver_unloaded_while_running(gpu: NvmlGpu, nvml_sim: NvmlSim) -> None:  # noqa: F811
    assert gpu.read(BOTH).error is None
    ns.set_driver_loaded(nvml_sim.state, False)
    report = gpu.read(BOTH)
    assert report.error is NvmlErrorKind.DRIVER_NOT_LOADED
    assert "Driver Not Loaded" in report.detail
    ns.set_driver_loaded(nvml_sim.state, True)
    assert [d.name for d in gpu.read(BOTH).devices] == [GPU0.name, GPU1.name]


# ---- the hang -----------------------------------------------------------------------------


def assert_nothing_read(snap: GpuSnapshot) -> None:
    """Every reading of the GPU not attempted (its handle is known from an earlier read, so
    each of them says so, not the handle): TIMEOUT for each, no value made up."""
    assert snap.errors and {kind for _, kind in snap.errors} == {NvmlErrorKind.TIMEOUT}
    fields = {what for what, _ in snap.errors}
    assert {"memory", "temperature", "power usage", "processes"} <= fields
    assert (snap.memory_total, snap.temperature_c, snap.power.usage_w) == (None, None, None)


def test_a_hung_call_is_bounded_and_nothing_piles_up(gpu: NvmlGpu, nvml_sim: NvmlSim) -> None:  # noqa: F811
    assert gpu.read(BOTH).error is None
    threads_before = threading.active_count()
    ns.set_hang(nvml_sim.state, "nvmlDeviceGetTemperature", -1, gpu=0)

    start = time.monotonic()
    report = gpu.read(BOTH)
    assert time.monotonic() - start < TIMEOUT + MARGIN
    g0, g1 = report.devices
    assert g0.memory_total == 32 * ns.GIB  # read before the hang
    assert ("temperature", NvmlErrorKind.TIMEOUT) in g0.errors
    assert all(kind is NvmlErrorKind.TIMEOUT for _, kind in g0.errors)
    assert_nothing_read(g1)  # not attempted: the worker is stuck

    for _ in range(3):  # while stuck, every read answers at once and starts no thread
        start = time.monotonic()
        report = gpu.read(BOTH)
        assert time.monotonic() - start < MARGIN
        for snap in report.devices:
            assert_nothing_read(snap)
    outcome = gpu.set_power_limit(0, 500)
    assert (outcome.ok, outcome.error) == (False, NvmlErrorKind.TIMEOUT)
    assert "has not returned" in outcome.detail
    assert threading.active_count() == threads_before

    ns.clear_faults(nvml_sim.state)  # the GPU answers again
    assert wait_until(lambda: not gpu._runner.stuck)
    report = gpu.read(BOTH)
    assert [d.errors for d in report.devices] == [(), ()]
    assert report.devices[0].temperature_c == GPU0.temperature_c


def test_a_hung_init_is_bounded(gpu: NvmlGpu, nvml_sim: NvmlSim) -> None:  # noqa: F811
    ns.set_hang(nvml_sim.state, "nvmlInitWithFlags", -1)
    start = time.monotonic()
    report = gpu.read(BOTH)
    assert time.monotonic() - start < TIMEOUT + MARGIN
    assert report.error is NvmlErrorKind.TIMEOUT
    ns.clear_faults(nvml_sim.state)
    assert wait_until(lambda: not gpu._runner.stuck)
    assert gpu.read(BOTH).error is None


def test_a_slow_call_within_the_deadline_is_fine(nvml_sim: NvmlSim) -> None:  # noqa: F811
    adapter = NvmlGpu(library_path=str(nvml_sim.library), call_timeout=5.0)
    try:
        ns.set_hang(nvml_sim.state, "nvmlDeviceGetName", 0.1)
        snap = only(adapter.read([GpuDevice(index=0)]))
        assert snap.name == GPU0.name and snap.errors == ()
    finally:
        ns.clear_faults(nvml_sim.state)
        adapter.close()


def test_call_runner_returns_values_and_exceptions_typed() -> None:
    runner = CallRunner(timeout=5.0)
    try:
        assert runner.call("add", lambda: 1 + 1) == 2
        failed = runner.call("boom", lambda: 1 // 0)
        assert isinstance(failed, NvmlFailure)
        assert failed.kind is NvmlErrorKind.OTHER and failed.detail.startswith("boom:")
    finally:
        runner.close()
    closed = runner.call("late", lambda: 1)
    assert isinstance(closed, NvmlFailure) and "closed" in closed.detail


def test_a_batch_runs_on_the_lane_and_is_bounded_per_call() -> None:
    """CallRunner.batch: every call on the lane in one hand-off, the body replayed on the
    caller's thread with the recorded answers; a call past the timeout is TIMEOUT, the rest
    "not attempted" and never made, and the lane stays stuck until that call returns."""
    runner = CallRunner(timeout=TIMEOUT)
    release = threading.Event()
    made: list[tuple[str, int]] = []  # (thread, value) of every call that reached "NVML"

    def nvml(value: int) -> int:
        made.append((threading.current_thread().name, value))
        return value

    def body(call: RawCall) -> list[object]:
        answers: list[object] = [call("one", lambda: nvml(1))]
        answers.append(call("two", lambda: nvml(2 // 0)))
        answers.append(call("hang", lambda: release.wait(30) and nvml(3)))
        answers.append(call("four", lambda: nvml(4)))
        return answers

    try:
        release.set()
        one, two, three, four = runner.batch(body)
        assert (one, three, four) == (1, 3, 4)
        assert isinstance(two, NvmlFailure) and two.detail.startswith("two: ")
        assert made == [("nvml-calls", 1), ("nvml-calls", 3), ("nvml-calls", 4)]

        made.clear()
        release.clear()
        start = time.monotonic()
        one, two, hung, four = runner.batch(body)
        assert time.monotonic() - start < TIMEOUT + MARGIN
        assert one == 1 and isinstance(two, NvmlFailure)
        assert isinstance(hung, NvmlFailure) and hung.kind is NvmlErrorKind.TIMEOUT
        assert hung.detail.startswith(f"hang: no answer within {TIMEOUT:g} s")
        assert isinstance(four, NvmlFailure) and four.kind is NvmlErrorKind.TIMEOUT
        assert four.detail.startswith("four: not attempted, hang has not returned")

        refused = runner.batch(body)  # stuck: nothing reaches the lane, every call is told why
        assert all(
            isinstance(a, NvmlFailure) and "not attempted, hang has not returned" in a.detail
            for a in refused
        )
        alone = runner.call("alone", lambda: 5)  # call() is refused the same way
        assert isinstance(alone, NvmlFailure) and "hang has not returned" in alone.detail
        release.set()
        assert wait_until(lambda: not runner.stuck)
        # The hung call returned; the read that gave up on it made no call after it.
        assert made == [("nvml-calls", 1), ("nvml-calls", 3)]
        assert runner.batch(body)[::2] == [1, 3]
    finally:
        release.set()
        runner.close()


# ---- power limit --------------------------------------------------------------------------


def test_set_power_limit_within_the_constraints(gpu: NvmlGpu, nvml_sim: NvmlSim) -> None:  # noqa: F811
    outcome = gpu.set_power_limit(0, 450)
    assert (outcome.ok, outcome.requested_w, outcome.applied_w, outcome.error) == (
        True, 450, 450.0, None,
    )  # fmt: skip
    assert nvml_sim.read().device(0).power_limit_mw == 450_000
    assert only(gpu.read([GpuDevice(index=0)])).power.limit_w == 450.0


@pytest.mark.parametrize(
    ("index", "watts", "applied"),
    [(0, 300, 400.0), (0, 700, 600.0), (1, 100, 150.0), (1, 451.7, 450.0)],
)
def test_set_power_limit_is_clamped(
    gpu: NvmlGpu,
    nvml_sim: NvmlSim,  # noqa: F811
    index: int,
    watts: float,
    applied: float,
) -> None:
    outcome = gpu.set_power_limit(index, watts)
    assert outcome.ok and outcome.applied_w == applied and outcome.requested_w == watts
    assert "clamped" in outcome.detail
    assert nvml_sim.read().device(index).power_limit_mw == applied * 1000


def test_set_power_limit_without_permission(gpu: NvmlGpu, nvml_sim: NvmlSim) -> None:  # noqa: F811
    ns.set_device(nvml_sim.state, 1, set_permission=False)
    outcome = gpu.set_power_limit(1, 300)
    assert (outcome.ok, outcome.error) == (False, NvmlErrorKind.NO_PERMISSION)
    assert outcome.applied_w == 450.0  # what the card still has
    assert "CAP_SYS_ADMIN" in outcome.detail
    assert nvml_sim.read().device(1).power_limit_mw == 450_000


def test_set_power_limit_rejected_by_the_driver(gpu: NvmlGpu, nvml_sim: NvmlSim) -> None:  # noqa: F811
    ns.set_fault(nvml_sim.state, "nvmlDeviceSetPowerManagementLimit", ns.NvmlCode.INVALID_ARGUMENT)
    outcome = gpu.set_power_limit(0, 500)
    assert (outcome.ok, outcome.error, outcome.applied_w) == (
        False, NvmlErrorKind.INVALID_ARGUMENT, 575.0,
    )  # fmt: skip


def test_set_power_limit_unclamped_when_constraints_are_unknown(
    gpu: NvmlGpu,
    nvml_sim: NvmlSim,  # noqa: F811
) -> None:
    ns.set_fault(
        nvml_sim.state, "nvmlDeviceGetPowerManagementLimitConstraints", ns.NvmlCode.NOT_SUPPORTED
    )
    outcome = gpu.set_power_limit(0, 300)  # below the 400 W minimum: the driver refuses
    assert (outcome.ok, outcome.error) == (False, NvmlErrorKind.INVALID_ARGUMENT)
    assert "constraints unknown" in outcome.detail
    assert gpu.set_power_limit(0, 420).ok


@pytest.mark.parametrize("watts", [math.nan, math.inf])
def test_set_power_limit_refuses_a_non_number(gpu: NvmlGpu, watts: float) -> None:
    outcome = gpu.set_power_limit(0, watts)
    assert (outcome.ok, outcome.error, outcome.applied_w) == (
        False, NvmlErrorKind.INVALID_ARGUMENT, None,
    )  # fmt: skip


def test_set_power_limit_on_a_missing_gpu(gpu: NvmlGpu) -> None:
    outcome = gpu.set_power_limit(3, 300)
    assert (outcome.ok, outcome.error) == (False, NvmlErrorKind.NOT_FOUND)


def test_a_driver_reset_shows_as_drift(gpu: NvmlGpu, nvml_sim: NvmlSim) -> None:  # noqa: F811
    assert gpu.set_power_limit(1, 300).ok
    assert only(gpu.read([GpuDevice(index=1)])).power.limit_w == 300.0
    ns.driver_reset(nvml_sim.state)
    assert only(gpu.read([GpuDevice(index=1)])).power.limit_w == 450.0
    assert gpu.set_power_limit(1, 300).applied_w == 300.0


# ---- the library --------------------------------------------------------------------------

PROBE = """
import json, sys
from hydra_watchdog.config import GpuDevice
from hydra_watchdog.adapters.gpu import NvmlGpu
gpu = NvmlGpu(library_path=sys.argv[1], call_timeout=5.0)
r = gpu.read([GpuDevice(index=0)])
s = gpu.set_power_limit(0, 450)
print(json.dumps({"error": r.error, "detail": r.detail, "names": [d.name for d in r.devices],
                  "set_error": s.error}))
gpu.close()
"""


def run_probe(library_path: str, env: dict[str, str]) -> dict[str, object]:
    env = {k: v for k, v in env.items() if k != "LD_LIBRARY_PATH"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, library_path],
        env=env, check=False, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_nvml_library_path_is_honoured_without_ld_library_path(nvml_sim: NvmlSim) -> None:  # noqa: F811
    result = run_probe(str(nvml_sim.library), nvml_sim.env(ld_path=False))
    assert result == {"error": None, "detail": "", "names": [GPU0.name], "set_error": None}
    assert nvml_sim.read().device(0).power_limit_mw == 450_000


@pytest.mark.parametrize("library", ["/nonexistent/libnvidia-ml.so.1", ""])
def test_library_not_found(nvml_sim: NvmlSim, library: str) -> None:  # noqa: F811
    # "": the loader's search path, where a machine without an NVIDIA driver has none.
    if not library and ctypes.util.find_library("nvidia-ml"):
        pytest.skip("this machine has a real libnvidia-ml on the loader's path")
    result = run_probe(library, nvml_sim.env(ld_path=False))
    assert result["error"] == "library_not_found"
    assert result["set_error"] == "library_not_found"
    assert result["names"] == []
    hint = "check gpu.nvml_library" if library else "set gpu.nvml_library"
    assert hint in str(result["detail"])
    if library:  # the loader's error names the file the attempt names: once (review 1 item 13)
        assert str(result["detail"]).count(library) == 1, result


def test_a_garbage_state_file_never_raises(gpu: NvmlGpu, nvml_sim: NvmlSim) -> None:  # noqa: F811
    nvml_sim.state.write_text("device\nproc x y z\ndevice 0 mem_total=-5 name=%zz\n\x00\xff\n")
    try:
        report = gpu.read(BOTH)
    finally:
        nvml_sim.write(ns.default_state())  # so the teardown can read it again
    assert report.error is None
    g0, g1 = report.devices
    assert g0.name == "%zz" and g0.memory_total is not None
    assert g1.errors == (("handle", NvmlErrorKind.NOT_FOUND),)


def test_read_after_close_is_a_typed_failure(nvml_sim: NvmlSim) -> None:  # noqa: F811
    adapter = NvmlGpu(library_path=str(nvml_sim.library), call_timeout=TIMEOUT)
    assert adapter.read(BOTH).error is None
    adapter.close()
    report = adapter.read(BOTH)
    assert report.error is not None  # never an exception
    assert "closed" in report.detail
