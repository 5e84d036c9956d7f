"""The library check with the unit's environment under real systemd (PID 1 of a namespace): a
stopped unit's Environment= and EnvironmentFile= as `systemctl show` gives them, and a running
unit's MainPID environment. The extension (built by gcc) finds its library only through them."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hydra_watchdog.adapters.host import HostProbe
from hydra_watchdog.adapters.loader_env import TabbyEnvironment
from hydra_watchdog.adapters.systemd import SystemctlUnit
from tests.elf_kit import LIB, build_extension, build_library, needs_gcc
from tests.harness.systemd_ns import SystemdNamespace

pytest_plugins = ["tests.harness.systemd_fixtures"]

SECRET = "sk-admin-in-the-unit-env"


@pytest.fixture
def unit_name(systemd_ns: SystemdNamespace) -> Iterator[str]:
    name = f"hw-env-{uuid.uuid4().hex[:8]}.service"
    yield name
    systemd_ns.reset_unit(name, remove=True)


def _probe(ns: SystemdNamespace, name: str, venv: Path) -> tuple[SystemctlUnit, HostProbe]:
    units = SystemctlUnit(name, argv_prefix=ns.nsenter, root=ns.root)
    # MainPID is a pid of the namespace: its environ is read through the namespace's /proc.
    env = TabbyEnvironment(unit_env=units.loader_environment, proc_root=f"{ns.root}/proc")
    return units, HostProbe("/", "", venv=str(venv), environment=env)


@needs_gcc
def test_a_stopped_unit_is_checked_with_its_environment_and_environment_file(
    systemd_ns: SystemdNamespace, unit_name: str, tmp_path: Path
) -> None:
    lib_dir = tmp_path / "opengl-driver" / "lib"
    build_library(lib_dir)
    venv = tmp_path / "venv"
    build_extension(venv, lib_dir, rpath=False)
    env_file = f"/etc/hydra-test/{unit_name}.env"
    systemd_ns.write_file(env_file, f"TABBY_ADMIN_KEY={SECRET}\nLD_LIBRARY_PATH={lib_dir}\n")
    systemd_ns.install_unit(
        unit_name,
        "[Service]\nEnvironment=LD_LIBRARY_PATH=/nonexistent\n"
        f"EnvironmentFile={env_file}\nExecStart=/bin/sleep 600\n",
    )
    units, probe = _probe(systemd_ns, unit_name, venv)
    stopped = units.status()
    assert stopped.exists and stopped.main_pid is None
    report = probe.check(libraries=True, unit=stopped)
    assert report.missing_libraries == (), report.libraries_detail
    assert "EnvironmentFile" in report.libraries_detail and SECRET not in report.libraries_detail
    # The watchdog's own environment would have said "not found": the old false alarm.
    assert HostProbe("/", "", venv=str(venv)).check(libraries=True).missing_libraries == (LIB,)

    # Running: its own environment counts (the file changed since it started: not read).
    systemd_ns.systemctl("start", unit_name)
    systemd_ns.wait_for_state(unit_name, ["active"])
    running = units.status()
    assert running.main_pid is not None
    systemd_ns.write_file(env_file, "LD_LIBRARY_PATH=/elsewhere\n")
    report = probe.check(libraries=True, unit=running)
    assert report.missing_libraries == (), report.libraries_detail
    assert f"pid {running.main_pid}" in report.libraries_detail

    # Stopped again, the next start would get the changed file: the library is missing.
    systemd_ns.systemctl("stop", unit_name)
    systemd_ns.wait_for_state(unit_name, ["inactive", "failed"])
    assert probe.check(libraries=True, unit=units.status()).missing_libraries == (LIB,)


@needs_gcc
def test_an_unreadable_environment_file_is_unknown_never_missing(
    systemd_ns: SystemdNamespace, unit_name: str, tmp_path: Path
) -> None:
    lib_dir = tmp_path / "lib"
    build_library(lib_dir)
    venv = tmp_path / "venv"
    build_extension(venv, lib_dir, rpath=False)
    systemd_ns.install_unit(
        unit_name,
        "[Service]\nEnvironmentFile=/etc/hydra-test/absent.env\nExecStart=/bin/sleep 600\n",
    )
    units, probe = _probe(systemd_ns, unit_name, venv)
    report = probe.check(libraries=True, unit=units.status())
    assert report.missing_libraries is None
    assert "unknown" in report.libraries_detail and "absent.env" in report.libraries_detail
