# ruff: noqa: F811  (pytest fixtures imported from tests/ are redefined as arguments)
"""The rebuild flow end to end: the daemon, the TabbyAPI simulator under a stand-in unit, a fake
NixOS system link in a temp dir, and a venv holding a real gcc-built ExLlamaV2 extension that
links a library through an RPATH in the "old generation". A switch moves the link and removes
the old generation: restart_will_fail names the library, TabbyAPI keeps serving, nothing is
restarted, `status` exits 1."""

from __future__ import annotations

import os
import shutil
import urllib.request
from pathlib import Path

from hydra_watchdog.events import EventKind
from hydra_watchdog.states import Phase
from tests.elf_kit import LIB, build_extension, build_library, needs_gcc
from tests.harness.nvml import nvml_sim, nvml_sim_library  # noqa: F401
from tests.harness.tabby import wait_for
from tests.test_daemon import WAIT, Daemons, Node, _decisions, _status, daemons, node  # noqa: F401


def _point(link: Path, target: Path) -> None:
    """Atomically re-point a symlink, as nixos-rebuild switch does with /run/current-system."""
    tmp = link.with_name(link.name + ".tmp")
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _health(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as reply:
        return int(reply.status)


@needs_gcc
def test_a_switch_that_removes_a_library_warns_before_anything_fails(
    node: Node, daemons: Daemons, tmp_path: Path
) -> None:
    store, profiles = tmp_path / "store", tmp_path / "profiles"
    old_system, new_system = store / "aaa-nixos-system-41", store / "bbb-nixos-system-42"
    old_lib = store / "aaa-cuda" / "lib"
    for d in (old_system, new_system, profiles):
        d.mkdir(parents=True)
    build_library(old_lib)
    venv = tmp_path / "venv"
    build_extension(venv, old_lib, rpath=True)
    os.symlink(old_system, profiles / "system-41-link")
    current = tmp_path / "current-system"
    os.symlink(old_system, current)
    node.write_config(
        tabbyapi={"venv": str(venv)},
        nixos={"current_system": str(current), "profiles_dir": str(profiles)},
    )
    daemons.start(node)
    wait_for(lambda: node.phase() is Phase.HEALTHY, WAIT, "the node to become healthy")
    first = [e for e in node.events() if e.kind is EventKind.DIAGNOSIS]
    assert not any(LIB in e.message for e in first)  # the old generation still has it

    # nixos-rebuild switch, then the old generation is garbage-collected.
    os.symlink(new_system, profiles / "system-42-link")
    _point(current, new_system)
    shutil.rmtree(store / "aaa-cuda")

    def switched() -> bool:
        return any(e.kind is EventKind.SYSTEM_SWITCHED for e in node.events())

    wait_for(switched, WAIT, "the system_switched event")
    event = next(e for e in node.events() if e.kind is EventKind.SYSTEM_SWITCHED)
    # The checks ran in the very cycle that saw the switch: the event carries their result.
    assert "generation 41 -> generation 42" in event.message
    assert f"libraries MISSING: {LIB}" in event.message, event.message
    assert ("HYDRA_GENERATION", "42") in event.fields
    wait_for(lambda: node.phase() is Phase.DEGRADED, WAIT, "the WARNING phase")
    warning = next(
        e for e in node.events() if e.rule is not None and e.rule.value == "restart_will_fail"
    )
    assert LIB in warning.message

    assert _health(node.port) == 200  # TabbyAPI (the simulator) keeps serving
    unit_verbs = [a for a, _, _ in _decisions(node.events()) if a.endswith("_unit")]
    assert unit_verbs == []  # nothing was restarted, stopped or started
    out = _status(node)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "restart_will_fail" in out.stdout and LIB in out.stdout
