"""Fixtures for the simulated libnvidia-ml.so.1.

- `nvml_sim_library` (session): builds the simulator once into a tmp dir.
- `nvml_sim` (test): a fresh two-GPU state file for this test, $HYDRA_NVML_SIM_STATE pointing at
  it in this process, and the library loaded here (pynvml keeps its library for the life of the
  process, so every test in one process shares the one copy; the per-test state file is what
  isolates tests). Teardown lifts faults and hangs so no call stays stuck in a worker thread.

A subprocess (a daemon under test) is pointed at the simulator with `sim.env()`: the state
variable plus LD_LIBRARY_PATH (read by the loader only at process start), or with
`gpu.nvml_library = str(sim.library)` in its config and `sim.env(ld_path=False)`.

Use from a test module with `from tests.harness.nvml import nvml_sim, nvml_sim_library`, or
register "tests.harness.nvml" in tests/conftest.py's pytest_plugins.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from hydra_watchdog.sim import nvml_state
from hydra_watchdog.sim.nvml_build import build_nvml_sim

_loaded: list[ctypes.CDLL] = []  # keeps the in-process handle alive for the whole session


@dataclass(frozen=True)
class NvmlSim:
    library: Path  # .../libnvidia-ml.so.1
    state: Path  # this test's state file

    def env(self, base: Mapping[str, str] | None = None, *, ld_path: bool = True) -> dict[str, str]:
        """An environment for a subprocess that should see this simulated GPU."""
        env = dict(os.environ if base is None else base)
        env[nvml_state.STATE_ENV] = str(self.state)
        if ld_path:
            old = env.get("LD_LIBRARY_PATH", "")
            env["LD_LIBRARY_PATH"] = (
                f"{self.library.parent}:{old}" if old else str(self.library.parent)
            )
        return env

    def read(self) -> nvml_state.SimState:
        return nvml_state.read_state(self.state)

    def write(self, state: nvml_state.SimState) -> None:
        nvml_state.write_state(self.state, state)


def load_in_process(library: Path) -> None:
    """Load the simulator so that pynvml's CDLL("libnvidia-ml.so.1") finds it by SONAME."""
    if not _loaded:
        _loaded.append(ctypes.CDLL(str(library.resolve())))


@pytest.fixture(scope="session")
def nvml_sim_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_nvml_sim(tmp_path_factory.mktemp("nvml-sim"))


@pytest.fixture
def nvml_sim(
    nvml_sim_library: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[NvmlSim]:
    state = tmp_path / "nvml-state"
    nvml_state.write_state(state, nvml_state.default_state())
    monkeypatch.setenv(nvml_state.STATE_ENV, str(state))
    load_in_process(nvml_sim_library)
    yield NvmlSim(library=nvml_sim_library, state=state)
    if state.exists():
        nvml_state.clear_faults(state)
