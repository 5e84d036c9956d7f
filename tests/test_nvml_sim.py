"""The simulated libnvidia-ml.so.1, driven through the real pynvml binding, and its state file."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pynvml
import pytest

from hydra_watchdog.sim import nvml_state as ns
from hydra_watchdog.sim.nvml_build import LIBRARY_NAME, BuildError, build_nvml_sim
from tests.harness.nvml import NvmlSim, nvml_sim, nvml_sim_library  # noqa: F401

GPU0 = ns.default_state().devices[0]
GPU1 = ns.default_state().devices[1]


@pytest.fixture
def nvml(nvml_sim: NvmlSim) -> Iterator[NvmlSim]:  # noqa: F811
    pynvml.nvmlInit()
    yield nvml_sim
    ns.clear_faults(nvml_sim.state)
    ns.set_driver_loaded(nvml_sim.state, True)
    pynvml.nvmlShutdown()


def wait_until(cond: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(cond) and cond():
            return True
        time.sleep(0.01)
    return False


# ---- reading ------------------------------------------------------------------------------


def test_identity_fields(nvml: NvmlSim) -> None:
    assert pynvml.nvmlSystemGetDriverVersion() == "570.133.07"
    assert pynvml.nvmlDeviceGetCount() == 2
    h0 = pynvml.nvmlDeviceGetHandleByIndex(0)
    assert pynvml.nvmlDeviceGetName(h0) == "NVIDIA GeForce RTX 5090"
    assert pynvml.nvmlDeviceGetUUID(h0) == GPU0.uuid
    assert pynvml.nvmlDeviceGetIndex(h0) == 0
    h1 = pynvml.nvmlDeviceGetHandleByUUID(GPU1.uuid)
    assert pynvml.nvmlDeviceGetIndex(h1) == 1
    assert pynvml.nvmlDeviceGetName(h1) == "NVIDIA GeForce RTX 4090"
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceGetHandleByIndex(2)
    with pytest.raises(pynvml.NVMLError_NotFound):
        pynvml.nvmlDeviceGetHandleByUUID("GPU-00000000-0000-0000-0000-000000000000")


def test_memory_v1_counts_the_reservation_and_v2_reports_it_apart(nvml: NvmlSim) -> None:
    ns.set_process(nvml.state, 0, os.getpid(), 3 * ns.GIB)
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    v2 = pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
    assert v2.total == 32 * ns.GIB
    assert v2.reserved == GPU0.mem_reserved
    assert v2.used == GPU0.mem_base + 3 * ns.GIB
    assert v2.free == v2.total - v2.reserved - v2.used
    v1 = pynvml.nvmlDeviceGetMemoryInfo(h)
    assert v1.used == GPU0.mem_reserved + GPU0.mem_base + 3 * ns.GIB
    assert v1.free == v1.total - v1.used
    assert ns.free_bytes(nvml.state, 0) == v2.free


def test_state_changes_are_seen_at_the_next_call(nvml: NvmlSim) -> None:
    h = pynvml.nvmlDeviceGetHandleByIndex(1)
    ns.set_device(
        nvml.state, 1, temperature_c=91, util_gpu=97, util_mem=55, reasons=0x44,
        power_usage_mw=449_500, power_enforced_mw=400_000,
    )  # fmt: skip
    assert pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU) == 91
    util = pynvml.nvmlDeviceGetUtilizationRates(h)
    assert (util.gpu, util.memory) == (97, 55)
    assert pynvml.nvmlDeviceGetCurrentClocksEventReasons(h) == 0x44
    assert pynvml.nvmlDeviceGetPowerUsage(h) == 449_500
    assert pynvml.nvmlDeviceGetEnforcedPowerLimit(h) == 400_000
    assert pynvml.nvmlDeviceGetPowerManagementLimit(h) == 450_000


def test_power_getters(nvml: NvmlSim) -> None:
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    assert pynvml.nvmlDeviceGetPowerManagementLimitConstraints(h) == [400_000, 600_000]
    assert pynvml.nvmlDeviceGetPowerManagementDefaultLimit(h) == 575_000
    assert pynvml.nvmlDeviceGetPowerManagementLimit(h) == 575_000
    assert pynvml.nvmlDeviceGetEnforcedPowerLimit(h) == 575_000  # follows the limit by default
    assert pynvml.nvmlDeviceGetPowerUsage(h) == GPU0.power_usage_mw


# ---- processes ----------------------------------------------------------------------------


def test_processes_of_a_real_child_vanish_when_it_exits(nvml: NvmlSim) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ns.set_process(nvml.state, 0, child.pid, 8 * ns.GIB)
        ns.set_process(nvml.state, 1, os.getpid(), 1 * ns.GIB)
        h0 = pynvml.nvmlDeviceGetHandleByIndex(0)
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h0)
        assert [(p.pid, p.usedGpuMemory) for p in procs] == [(child.pid, 8 * ns.GIB)]
        used_before = pynvml.nvmlDeviceGetMemoryInfo(h0, version=pynvml.nvmlMemory_v2).used
        assert used_before == GPU0.mem_base + 8 * ns.GIB

        child.kill()
        # Not yet reaped: a zombie holds no GPU memory, as with the real driver.
        assert wait_until(lambda: not ns.pid_alive(child.pid))
        assert pynvml.nvmlDeviceGetComputeRunningProcesses(h0) == []
        child.wait(10)
        assert pynvml.nvmlDeviceGetComputeRunningProcesses(h0) == []
        after = pynvml.nvmlDeviceGetMemoryInfo(h0, version=pynvml.nvmlMemory_v2)
        assert after.used == GPU0.mem_base
        assert ns.free_bytes(nvml.state, 0) == after.free
        # The other GPU's live process is untouched.
        h1 = pynvml.nvmlDeviceGetHandleByIndex(1)
        assert [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h1)] == [os.getpid()]
    finally:
        child.kill()
        child.wait(10)


def test_many_processes_and_remove_process(nvml: NvmlSim) -> None:
    me = os.getpid()
    ns.set_process(nvml.state, 0, me, 100)
    ns.set_process(nvml.state, 0, me, 200)  # replaces, not appends
    ns.set_process(nvml.state, 1, me, 300)
    state = nvml.read()
    assert sorted((p.gpu, p.used_bytes) for p in state.processes) == [(0, 200), (1, 300)]
    h0 = pynvml.nvmlDeviceGetHandleByIndex(0)
    assert [p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h0)] == [200]
    ns.remove_process(nvml.state, me)
    assert nvml.read().processes == ()
    assert pynvml.nvmlDeviceGetComputeRunningProcesses(h0) == []


# ---- power limit --------------------------------------------------------------------------


def test_set_power_limit_persists_into_the_state_file(nvml: NvmlSim) -> None:
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    pynvml.nvmlDeviceSetPowerManagementLimit(h, 450_000)
    assert pynvml.nvmlDeviceGetPowerManagementLimit(h) == 450_000
    assert nvml.read().device(0).power_limit_mw == 450_000
    assert nvml.read().device(1).power_limit_mw == 450_000  # the other card untouched
    assert nvml.read().device(0).name == GPU0.name  # the rest of the line survives the rewrite


@pytest.mark.parametrize("mw", [399_999, 600_001, 0])
def test_set_power_limit_outside_the_constraints_is_invalid(nvml: NvmlSim, mw: int) -> None:
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        pynvml.nvmlDeviceSetPowerManagementLimit(h, mw)
    assert nvml.read().device(0).power_limit_mw == 575_000


def test_set_power_limit_without_permission(nvml: NvmlSim) -> None:
    ns.set_device(nvml.state, 1, set_permission=False)
    h = pynvml.nvmlDeviceGetHandleByIndex(1)
    with pytest.raises(pynvml.NVMLError_NoPermission):
        pynvml.nvmlDeviceSetPowerManagementLimit(h, 300_000)
    assert pynvml.nvmlDeviceGetPowerManagementLimit(h) == 450_000


def test_driver_reset_puts_the_default_limit_back(nvml: NvmlSim) -> None:
    h = pynvml.nvmlDeviceGetHandleByIndex(1)
    pynvml.nvmlDeviceSetPowerManagementLimit(h, 300_000)
    assert pynvml.nvmlDeviceGetPowerManagementLimit(h) == 300_000
    ns.driver_reset(nvml.state)
    assert pynvml.nvmlDeviceGetPowerManagementLimit(h) == 450_000


def test_python_and_c_writers_do_not_lose_each_others_changes(nvml: NvmlSim) -> None:
    """The flock: a Python read-modify-write and the C library's limit write interleave."""
    h = pynvml.nvmlDeviceGetHandleByIndex(1)
    limits = [150_000 + 1000 * i for i in range(40)]
    pids = list(range(1_000_000, 1_000_040))  # never alive: only the file content matters

    def python_writer() -> None:
        for pid in pids:
            ns.set_process(nvml.state, 1, pid, pid)

    writer = threading.Thread(target=python_writer)
    writer.start()
    for mw in limits:
        pynvml.nvmlDeviceSetPowerManagementLimit(h, mw)
    writer.join(60)
    state = nvml.read()
    assert sorted(p.pid for p in state.processes) == pids
    assert state.device(1).power_limit_mw == limits[-1]


# ---- faults -------------------------------------------------------------------------------

ERROR_CLASSES = [
    (ns.NvmlCode.NO_PERMISSION, pynvml.NVMLError_NoPermission),
    (ns.NvmlCode.NOT_SUPPORTED, pynvml.NVMLError_NotSupported),
    (ns.NvmlCode.GPU_IS_LOST, pynvml.NVMLError_GpuIsLost),
    (ns.NvmlCode.DRIVER_NOT_LOADED, pynvml.NVMLError_DriverNotLoaded),
    (ns.NvmlCode.FUNCTION_NOT_FOUND, pynvml.NVMLError_FunctionNotFound),
    (ns.NvmlCode.NOT_FOUND, pynvml.NVMLError_NotFound),
    (ns.NvmlCode.TIMEOUT, pynvml.NVMLError_Timeout),
    (ns.NvmlCode.LIB_RM_VERSION_MISMATCH, pynvml.NVMLError_LibRmVersionMismatch),
    (ns.NvmlCode.UNKNOWN, pynvml.NVMLError_Unknown),
]


@pytest.mark.parametrize(("code", "cls"), ERROR_CLASSES)
def test_a_call_fails_with_the_chosen_error(nvml: NvmlSim, code: int, cls: type) -> None:
    ns.set_fault(nvml.state, "nvmlDeviceGetTemperature", code)
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(cls):
        pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)
    assert pynvml.nvmlDeviceGetPowerUsage(h) == GPU0.power_usage_mw  # other calls unaffected
    ns.clear_faults(nvml.state)
    assert pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU) == GPU0.temperature_c


def test_a_fault_can_target_one_gpu_and_every_call(nvml: NvmlSim) -> None:
    ns.set_fault(nvml.state, "*", ns.NvmlCode.GPU_IS_LOST, gpu=1)
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        pynvml.nvmlDeviceGetHandleByIndex(1)
    h0 = pynvml.nvmlDeviceGetHandleByIndex(0)
    assert pynvml.nvmlDeviceGetName(h0) == GPU0.name
    assert pynvml.nvmlDeviceGetCount() == 2  # not a device call


def test_unversioned_process_call_reports_a_library_mismatch(nvml: NvmlSim) -> None:
    ns.set_fault(nvml.state, "nvmlDeviceGetComputeRunningProcesses_v3", 13)
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLLibraryMismatchError):
        pynvml.nvmlDeviceGetComputeRunningProcesses(h)


def test_driver_not_loaded_fails_init_and_comes_back(nvml: NvmlSim) -> None:
    ns.set_driver_loaded(nvml.state, False)
    with pytest.raises(pynvml.NVMLError_DriverNotLoaded):
        pynvml.nvmlInit()
    with pytest.raises(pynvml.NVMLError_DriverNotLoaded):
        pynvml.nvmlDeviceGetCount()
    ns.set_driver_loaded(nvml.state, True)
    pynvml.nvmlInit()
    assert pynvml.nvmlDeviceGetCount() == 2
    pynvml.nvmlShutdown()


def test_an_open_ended_hang_lasts_until_it_is_lifted(nvml: NvmlSim) -> None:
    ns.set_hang(nvml.state, "nvmlDeviceGetPowerUsage", -1, gpu=0)
    h0 = pynvml.nvmlDeviceGetHandleByIndex(0)
    h1 = pynvml.nvmlDeviceGetHandleByIndex(1)
    got: list[int] = []
    caller = threading.Thread(target=lambda: got.append(pynvml.nvmlDeviceGetPowerUsage(h0)))
    caller.start()
    try:
        caller.join(0.5)
        assert caller.is_alive() and got == []
        assert pynvml.nvmlDeviceGetPowerUsage(h1) == GPU1.power_usage_mw  # only GPU 0 hangs
    finally:
        ns.clear_faults(nvml.state)
    caller.join(30)
    assert got == [GPU0.power_usage_mw]


def test_a_finite_hang_returns_on_its_own(nvml: NvmlSim) -> None:
    ns.set_hang(nvml.state, "nvmlDeviceGetName", 0.2)
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    start = time.monotonic()
    assert pynvml.nvmlDeviceGetName(h) == GPU0.name
    assert time.monotonic() - start >= 0.2  # the hang happened (a lower bound only)


def test_calls_before_init_are_uninitialized_and_no_state_means_no_driver(
    nvml_sim: NvmlSim,  # noqa: F811
) -> None:
    # A fresh process: the sim's init count in this one is shared by every test.
    code = (
        "import pynvml, os\n"
        "pynvml._LoadNvmlLibrary()\n"
        "try:\n"
        "    pynvml.nvmlDeviceGetCount()\n"
        "except pynvml.NVMLError_Uninitialized:\n"
        "    print('uninitialized')\n"
        "pynvml.nvmlInit(); print(pynvml.nvmlDeviceGetCount()); pynvml.nvmlShutdown()\n"
        "os.environ['HYDRA_NVML_SIM_STATE'] = '/nonexistent/state'\n"
        "try:\n"
        "    pynvml.nvmlInit()\n"
        "except pynvml.NVMLError_DriverNotLoaded:\n"
        "    print('no driver')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=nvml_sim.env(),
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["uninitialized", "2", "no driver"]


# ---- the state file -----------------------------------------------------------------------


def test_state_round_trips_through_text() -> None:
    state = replace(
        ns.default_state(),
        processes=(ns.SimProcess(0, 1234, 5 * ns.GIB),),
        faults=(ns.SimFault("*", 15, 1), ns.SimFault("nvmlShutdown", 999)),
        hangs=(ns.SimHang("nvmlDeviceGetName", -1.0), ns.SimHang("nvmlInitWithFlags", 2.5, 0)),
        driver_loaded=False,
        driver_version="570.133.07 beta",
    )
    assert ns.parse_state(ns.render_state(state)) == state


@pytest.mark.parametrize(
    "text",
    ["device x uuid=a name=b mem_total=1", "device 0 name=b", "proc 0 1", "frobnicate 1",
     "device 0 uuid=a name=b mem_total=1 colour=red", "hang sym soon"],
)  # fmt: skip
def test_bad_state_text_is_a_clear_error(text: str) -> None:
    with pytest.raises(ns.StateFormatError, match="line 1"):
        ns.parse_state(text)


def test_default_state_mirrors_hydra_ai() -> None:
    s = ns.default_state()
    g0, g1 = s.device(0), s.device(1)
    assert (g0.mem_total, g0.power_min_mw, g0.power_max_mw, g0.power_default_mw) == (
        32 * ns.GIB, 400_000, 600_000, 575_000,
    )  # fmt: skip
    assert (g1.mem_total, g1.power_min_mw, g1.power_max_mw, g1.power_default_mw) == (
        24 * ns.GIB, 150_000, 450_000, 450_000,
    )  # fmt: skip
    with pytest.raises(KeyError):
        s.device(2)


def test_set_process_on_a_missing_gpu_is_refused(nvml_sim: NvmlSim) -> None:  # noqa: F811
    with pytest.raises(KeyError):
        ns.set_process(nvml_sim.state, 7, os.getpid(), 1)
    assert nvml_sim.read().processes == ()


# ---- the build ----------------------------------------------------------------------------


def test_build_is_cached_by_source_hash(tmp_path: Path) -> None:
    lib = build_nvml_sim(tmp_path)
    assert lib == tmp_path / LIBRARY_NAME
    first = lib.stat().st_mtime_ns
    assert build_nvml_sim(tmp_path) == lib
    assert lib.stat().st_mtime_ns == first  # not rebuilt
    (tmp_path / f".{LIBRARY_NAME}.sha256").write_text("stale\n")
    build_nvml_sim(tmp_path)
    assert lib.stat().st_mtime_ns != first  # rebuilt when the hash does not match
    soname = subprocess.run(
        ["objdump", "-p", str(lib)], check=False, capture_output=True, text=True
    )
    if soname.returncode == 0:
        assert f"SONAME               {LIBRARY_NAME}" in soname.stdout


def test_build_without_gcc_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing in it
    with pytest.raises(BuildError, match=r"not found on PATH.*apt-get install gcc"):
        build_nvml_sim(tmp_path / "out")


def test_build_as_a_module(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "hydra_watchdog.sim.nvml_build", str(tmp_path)],
        check=False, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / LIBRARY_NAME)
    assert (tmp_path / LIBRARY_NAME).is_file()


def test_a_subprocess_finds_the_sim_through_ld_library_path(nvml_sim: NvmlSim) -> None:  # noqa: F811
    code = "import pynvml; pynvml.nvmlInit(); print(pynvml.nvmlDeviceGetCount())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=nvml_sim.env(),
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2"
