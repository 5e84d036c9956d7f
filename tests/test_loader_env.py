"""ldd as TabbyAPI sees its libraries: the environment of its running process, else its unit's.

Real ELF files from gcc whose dependency is found only through LD_LIBRARY_PATH, and real
processes whose /proc/PID/environ carries it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hydra_watchdog.adapters.host import HostProbe
from hydra_watchdog.adapters.loader_env import (
    EnvLookup,
    TabbyEnvironment,
    parse_assignments,
    parse_env_file,
    parse_env_files_property,
    parse_environ,
    unit_env,
)
from hydra_watchdog.observation import UnitStatus
from tests.elf_kit import LIB, build_extension, build_library, needs_gcc

SECRET = "sk-admin-0123456789"


@pytest.fixture
def built(tmp_path: Path) -> tuple[Path, Path]:
    lib_dir = tmp_path / "opengl-driver" / "lib"
    build_library(lib_dir)
    venv = tmp_path / "venv"
    build_extension(venv, lib_dir, rpath=False)
    return venv, lib_dir


@pytest.fixture
def tabby_process(built: tuple[Path, Path]) -> Iterator[subprocess.Popen[bytes]]:
    """A stand-in for TabbyAPI's main process, with its environment (and a secret in it)."""
    _, lib_dir = built
    env = {"LD_LIBRARY_PATH": str(lib_dir), "TABBY_ADMIN_KEY": SECRET, "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], env=env)
    yield proc
    proc.kill()
    proc.wait(10)


def _unit(main_pid: int | None, active: str = "active") -> UnitStatus:
    return UnitStatus(
        name="tabbyapi.service",
        available=True,
        load_state="loaded",
        active_state=active,
        sub_state="running" if active == "active" else "dead",
        main_pid=main_pid,
    )


def _no_unit_env(unit: UnitStatus) -> EnvLookup:
    raise AssertionError("the unit's configured environment must not be read while it runs")


@needs_gcc
def test_the_watchdogs_own_environment_misses_what_tabbyapi_has(
    built: tuple[Path, Path], tabby_process: subprocess.Popen[bytes]
) -> None:
    venv, _ = built
    ours = HostProbe("/", "", venv=str(venv)).check(libraries=True)
    assert ours.missing_libraries == (LIB,)  # the old, wrong answer
    probe = HostProbe("/", "", venv=str(venv), environment=TabbyEnvironment(unit_env=_no_unit_env))
    report = probe.check(libraries=True, unit=_unit(tabby_process.pid))
    assert report.missing_libraries == ()
    assert f"pid {tabby_process.pid}" in report.libraries_detail
    assert SECRET not in report.libraries_detail and "TABBY_ADMIN_KEY" not in repr(report)


@needs_gcc
def test_a_stopped_unit_is_checked_with_its_environment_file(
    built: tuple[Path, Path], tmp_path: Path
) -> None:
    venv, lib_dir = built
    env_file = tmp_path / "tabby.env"
    env_file.write_text(f"# TabbyAPI\nTABBY_ADMIN_KEY={SECRET}\nLD_LIBRARY_PATH='{lib_dir}'\n")

    def configured(unit: UnitStatus) -> EnvLookup:
        return unit_env(unit.name, "LD_LIBRARY_PATH=/nonexistent", [(str(env_file), False)])

    probe = HostProbe("/", "", venv=str(venv), environment=TabbyEnvironment(unit_env=configured))
    report = probe.check(libraries=True, unit=_unit(None, active="inactive"))
    assert report.missing_libraries == ()  # the file overrides Environment=, as systemd does
    assert SECRET not in report.libraries_detail

    env_file.write_text("LD_LIBRARY_PATH=/elsewhere\n")
    again = probe.check(libraries=True, unit=_unit(None, active="inactive"))
    assert again.missing_libraries == (LIB,)


@needs_gcc
def test_an_environment_that_cannot_be_established_is_unknown(built: tuple[Path, Path]) -> None:
    venv, _ = built

    def unreadable(unit: UnitStatus) -> EnvLookup:
        return unit_env(unit.name, "", [("/nonexistent/tabby.env", False)])

    probe = HostProbe("/", "", venv=str(venv), environment=TabbyEnvironment(unit_env=unreadable))
    report = probe.check(libraries=True, unit=_unit(None, active="inactive"))
    assert report.missing_libraries is None  # unknown: never blocks a restart
    assert (
        "unknown" in report.libraries_detail and "/nonexistent/tabby.env" in report.libraries_detail
    )
    no_unit = UnitStatus(name="tabbyapi.service", available=False, detail="no systemd")
    assert probe.check(libraries=True, unit=no_unit).missing_libraries is None


@needs_gcc
def test_without_a_unit_the_verified_listeners_environment_is_used(
    built: tuple[Path, Path], tabby_process: subprocess.Popen[bytes]
) -> None:
    venv, _ = built
    env = TabbyEnvironment(listener_pid=lambda unit: tabby_process.pid)
    probe = HostProbe("/", "", venv=str(venv), environment=env)
    no_unit = UnitStatus(name="tabbyapi.service", available=False, detail="no systemd")
    report = probe.check(libraries=True, unit=no_unit)
    assert report.missing_libraries == ()
    assert "listener" in report.libraries_detail


def test_only_the_loaders_variables_are_kept() -> None:
    raw = f"A=1\0LD_LIBRARY_PATH=/x:/y\0TABBY_ADMIN_KEY={SECRET}\0".encode()
    assert parse_environ(raw) == (("LD_LIBRARY_PATH", "/x:/y"),)
    ours = Path(f"/proc/{os.getpid()}/environ").read_bytes()
    assert parse_environ(ours) == tuple(
        (k, v) for k, v in os.environ.items() if k == "LD_LIBRARY_PATH"
    )


def test_systemd_property_formats_parse() -> None:
    assert parse_assignments('A=1 "LD_LIBRARY_PATH=/a b:/c" KEY=x') == [
        ("A", "1"),
        ("LD_LIBRARY_PATH", "/a b:/c"),
        ("KEY", "x"),
    ]
    assert parse_env_files_property(
        ["/etc/tabby.env (ignore_errors=no)", "/etc/opt.env (ignore_errors=yes)"]
    ) == [("/etc/tabby.env", False), ("/etc/opt.env", True)]
    assert parse_env_file('; c\n# c\nexport LD_LIBRARY_PATH="/q"\nBAD\n') == [
        ("LD_LIBRARY_PATH", "/q")
    ]
    ignored = unit_env("t.service", "LD_LIBRARY_PATH=/a", [("/nonexistent", True)])
    assert ignored.env is not None and ignored.env.as_dict() == {"LD_LIBRARY_PATH": "/a"}
