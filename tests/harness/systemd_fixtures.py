"""pytest fixtures over tests/harness/systemd_ns.py: ONE systemd per test session (2 cores).

Register with `pytest_plugins = ["tests.harness.systemd_fixtures"]` in tests/conftest.py.
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def own_systemd(host_tmp_marker: Path) -> Iterator[SystemdNamespace]:
    """A freshly booted systemd for the length of a `with`, with the harness's safety nets: the
    caller holds `host_tmp_marker` (the host's /tmp is checked at the session's end), and the
    shutdown must leave nothing behind (its PID 1, its temp folder, its private cgroups). For
    the session's one namespace and for a test that must have a systemd of its own."""
    assert host_tmp_marker.exists(), "the host's /tmp was emptied before this systemd booted"
    ns = booted_systemd()
    try:
        yield ns
    finally:
        pid, cgroup, tmp_dir = ns.pid, ns.cgroup_name, ns.log_path.parent
        ns.shutdown()
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
    assert host_tmp_marker.exists(), "the host's /tmp was emptied while this systemd ran"


@pytest.fixture(scope="session")
def systemd_ns(host_tmp_marker: Path) -> Iterator[SystemdNamespace]:
    with own_systemd(host_tmp_marker) as ns:
        yield ns
