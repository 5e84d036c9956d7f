"""The real-systemd harness: booted on an overlay root, isolated, harmless to the host."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.harness.systemd_ns import SystemdNamespace

pytest_plugins = ["tests.harness.systemd_fixtures"]

pytestmark = pytest.mark.systemd


def test_systemd_is_pid_1_and_running(systemd_ns: SystemdNamespace) -> None:
    assert systemd_ns.alive
    assert systemd_ns.systemctl("is-system-running").stdout.strip() in ("running", "degraded")
    assert systemd_ns.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"


def test_host_tmp_survives_the_boot(systemd_ns: SystemdNamespace, host_tmp_marker: Path) -> None:
    assert host_tmp_marker.exists()
    # Inside, /tmp is the namespace's own tmpfs: the host's marker is not there.
    assert systemd_ns.run(["test", "-e", str(host_tmp_marker)]).returncode != 0


def test_writes_land_in_the_overlay_not_on_the_host(systemd_ns: SystemdNamespace) -> None:
    path = f"/etc/hydra-ns-probe-{uuid.uuid4().hex}"
    systemd_ns.write_file(path, "inside\n")
    assert systemd_ns.run(["cat", path]).stdout == "inside\n"
    assert not Path(path).exists()


def test_the_checkout_is_visible_inside(systemd_ns: SystemdNamespace) -> None:
    proc = systemd_ns.python("import hydra_watchdog, sys; print(hydra_watchdog.__file__)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(Path("hydra_watchdog/__init__.py").resolve())


def test_units_live_in_a_private_cgroup(systemd_ns: SystemdNamespace) -> None:
    # Two harnesses booted side by side must not share /system.slice.
    cg = systemd_ns.show("init.scope", "ControlGroup")["ControlGroup"]
    assert cg == f"/{systemd_ns.cgroup_name}/init.scope"


def test_installed_unit_runs_and_resets(systemd_ns: SystemdNamespace) -> None:
    name = f"hw-harness-{uuid.uuid4().hex[:8]}.service"
    systemd_ns.install_unit(name, "[Service]\nExecStart=/bin/sleep 600\n")
    try:
        assert systemd_ns.systemctl("start", name).returncode == 0
        assert systemd_ns.wait_for_state(name, ["active"])["SubState"] == "running"
        systemd_ns.reset_unit(name)
        assert systemd_ns.show(name, "ActiveState")["ActiveState"] == "inactive"
    finally:
        systemd_ns.reset_unit(name, remove=True)
    assert systemd_ns.show(name, "LoadState")["LoadState"] == "not-found"


def test_loopback_network_is_private(systemd_ns: SystemdNamespace) -> None:
    inside = systemd_ns.run(["ip", "-o", "link"]).stdout
    assert inside.split(":")[1].strip() == "lo"
    assert len(inside.splitlines()) == 1, inside
