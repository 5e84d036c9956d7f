"""pytest fixtures over tests/harness/systemd_ns.py: ONE systemd per test session (2 cores).

Register with `pytest_plugins = ["tests.harness.systemd_fixtures"]` in tests/conftest.py.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.systemd_ns import SystemdNamespace, SystemdNamespaceError, unavailable_reason


@pytest.fixture(scope="session")
def host_tmp_marker() -> Iterator[Path]:
    """A file in the HOST's /tmp made before systemd boots. A systemd that saw the host's root
    would empty /tmp at boot; the teardown fails the session if the marker is gone."""
    fd, name = tempfile.mkstemp(prefix="hydra-host-tmp-marker-", dir="/tmp")
    os.close(fd)
    marker = Path(name)
    yield marker
    if not marker.exists():
        raise AssertionError(
            f"the host's /tmp was emptied while systemd ran ({marker} is gone): "
            "systemd must only ever boot on the overlay root"
        )
    marker.unlink()


def booted_systemd() -> SystemdNamespace:
    """A freshly booted systemd in a namespace; the test skips where none can boot here and fails
    where booting fails. The caller shuts it down."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"real systemd in a namespace unavailable: {reason}")
    ns = SystemdNamespace()
    try:
        ns.boot()
    except SystemdNamespaceError as exc:
        pytest.fail(f"booting systemd in a namespace failed: {exc}")
    return ns


@pytest.fixture(scope="session")
def systemd_ns(host_tmp_marker: Path) -> Iterator[SystemdNamespace]:
    ns = booted_systemd()
    try:
        yield ns
    finally:
        pid, cgroup, tmp_dir = ns.pid, ns.cgroup_name, ns.log_path.parent
        ns.shutdown()
    # The life cycle is checked here, once, rather than by booting a second systemd in a test.
    leftovers = [
        str(p)
        for p in (
            Path(f"/proc/{pid}"),
            tmp_dir,
            Path("/sys/fs/cgroup/systemd", cgroup),
            Path("/sys/fs/cgroup/unified", cgroup),
        )
        if p.exists()
    ]
    if leftovers:
        raise AssertionError(f"systemd namespace shutdown left behind: {leftovers}")
