"""The world-readable status file: written atomically, readable by any user, never into a dir
others can write, marked stopped on a clean stop, read with a cap, believed only as the daemon
wrote it (owner, mode, no symlink, a trusted runtime dir), found without parsing the config."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hydra_watchdog.config import load_config
from hydra_watchdog.paths import DEFAULT_RUNTIME_DIR
from hydra_watchdog.policy_state import PolicyState
from hydra_watchdog.report.status import StatusReport, from_json, to_json
from hydra_watchdog.report.status_build import build_status
from hydra_watchdog.report.status_file import (
    STATUS_FILE,
    _published_by,
    find_status,
    mark_stopped,
    read_status,
    write_status,
)
from hydra_watchdog.states import Phase
from hydra_watchdog.trusted_path import UnsafeDirectoryError
from tests.harness.adversary import NOBODY, SYSTEM_PYTHON, as_nobody
from tests.test_cli import cli


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    # Not under pytest's tmp_path: its parents are 0700, so another user could not reach it.
    top = Path(tempfile.mkdtemp(prefix="hydra-status-"))
    top.chmod(0o755)
    try:
        yield top
    finally:
        shutil.rmtree(top)


def test_status_file_is_world_readable_and_atomic(shared_dir: Path) -> None:
    runtime = shared_dir / "run"
    write_status(runtime, StatusReport(pid=1, phase=Phase.HEALTHY))
    write_status(runtime, StatusReport(pid=2, phase=Phase.DOWN, summary="refused x3"))
    assert runtime.stat().st_mode & 0o777 == 0o755
    assert (runtime / STATUS_FILE).stat().st_mode & 0o777 == 0o644
    assert read_status(runtime) == StatusReport(pid=2, phase=Phase.DOWN, summary="refused x3")
    assert sorted(p.name for p in runtime.iterdir()) == [STATUS_FILE]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_status_file_is_readable_by_an_unprivileged_user(shared_dir: Path) -> None:
    runtime = shared_dir / "run"
    write_status(runtime, StatusReport(pid=7, phase=Phase.HEALTHY))
    # The venv lives under /root, out of nobody's reach: read with cat, parse here.
    out = subprocess.run(
        ["cat", str(runtime / STATUS_FILE)],
        user=65534,
        group=65534,
        extra_groups=[],
        capture_output=True,
        check=False,
        timeout=60,
        cwd="/",
    )
    assert out.returncode == 0, out.stderr
    report = from_json(out.stdout)
    assert (report.pid, report.phase) == (7, Phase.HEALTHY)


def test_read_status_tolerates_absence_and_explains_garbage(tmp_path: Path) -> None:
    assert read_status(tmp_path) is None
    (tmp_path / STATUS_FILE).write_text("{half")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_status(tmp_path)


@pytest.mark.parametrize("mode", [0o1777, 0o777, 0o775])
def test_status_is_never_written_into_a_dir_others_can_write(tmp_path: Path, mode: int) -> None:
    shared = tmp_path / "tmp-like"
    shared.mkdir()
    shared.chmod(mode)
    with pytest.raises(UnsafeDirectoryError, match="writable by others"):
        write_status(shared, StatusReport(pid=1, phase=Phase.HEALTHY))
    assert list(shared.iterdir()) == []


def test_mark_stopped_keeps_the_last_report_and_says_stopped(tmp_path: Path) -> None:
    run = tmp_path / "run"
    last = StatusReport(pid=os.getpid(), phase=Phase.HEALTHY, heartbeat=100.0, summary="ok")
    write_status(run, last)
    mark_stopped(run, wall=200.0, pid=os.getpid())
    assert read_status(run) == StatusReport(
        pid=os.getpid(), phase=Phase.HEALTHY, heartbeat=100.0, summary="ok", stopped_at=200.0
    )
    # a file of another pid, or garbage: a minimal report that still says stopped
    (run / STATUS_FILE).write_text("{garbage")
    mark_stopped(run, wall=300.0, pid=os.getpid())
    assert read_status(run) == StatusReport(pid=os.getpid(), stopped_at=300.0)


def test_read_status_caps_what_it_reads(tmp_path: Path) -> None:
    with (tmp_path / STATUS_FILE).open("wb") as f:
        f.truncate(300 * 1024**2)  # sparse: reading it whole would take 300 MB of memory
    with pytest.raises(ValueError, match="more than the 4194304 a valid one"):
        read_status(tmp_path)
    (tmp_path / STATUS_FILE).unlink()
    (tmp_path / STATUS_FILE).mkdir()
    with pytest.raises(ValueError, match="not a regular file"):
        read_status(tmp_path)


# --- finding the report without parsing the config (issue 25) ------------------------------------


def _daemon_report(config: Path) -> StatusReport:
    """What the daemon that read `config` publishes (its runtime dir, its view of the file)."""
    cfg = load_config(config)
    report = build_status(
        PolicyState(phase=Phase.HEALTHY), None, cfg, (), wall_now=1.0, mono_now=1.0, pid=1
    )
    write_status(cfg.watchdog.runtime_dir, report)
    return report


def test_the_report_of_the_daemon_that_read_this_config_names_its_runtime_dir(
    tmp_path: Path,
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[watchdog]\nruntime_dir = "{tmp_path / "run"}"  # tmpfs\n')
    _daemon_report(config)
    assert _published_by(str(config), str(tmp_path / "run"))
    assert find_status(str(config)) == (str(tmp_path / "run"), "")


def test_a_config_changed_since_the_daemon_read_it_is_read_again(tmp_path: Path) -> None:
    """The same bytes written again: a new ctime, so the daemon's view of the file is not the
    file's, and status reads the config (which here names another runtime dir)."""
    config = tmp_path / "config.toml"
    config.write_text(f'[watchdog]\nruntime_dir = "{tmp_path / "run"}"\n')
    _daemon_report(config)
    time.sleep(0.01)  # a ctime the filesystem can tell apart
    config.write_text(f'[watchdog]\nruntime_dir = "{tmp_path / "run"}"\n')
    assert not _published_by(str(config), str(tmp_path / "run"))
    config.write_text(f'[watchdog]\nruntime_dir = "{tmp_path / "elsewhere"}"\n')
    assert find_status(str(config)) == (str(tmp_path / "elsewhere"), "")


def test_a_report_moved_from_its_runtime_dir_is_not_the_configs(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[watchdog]\nruntime_dir = "{tmp_path / "run"}"\n')
    report = _daemon_report(config)
    write_status(tmp_path / "copy", report)
    assert not _published_by(str(config), str(tmp_path / "copy"))


@pytest.mark.parametrize(
    ("name", "why"), [("missing.toml", "does not exist"), ("fifo", "not a regular file (mode p")]
)
def test_a_config_that_cannot_be_read_falls_back_to_the_default_runtime_dir(
    tmp_path: Path, name: str, why: str
) -> None:
    config = tmp_path / name
    if name == "fifo":
        os.mkfifo(config)  # read without blocking, refused: not a regular file
    runtime, note = find_status(str(config))
    assert runtime == DEFAULT_RUNTIME_DIR
    assert note.startswith("(config not read: config file") and "using defaults" in note
    assert why in note


# --- a forged status is not believed (issue 22, item 5, the reader's side) ----------------------

FORGER = r"""
import json, os, sys
os.makedirs(sys.argv[1], exist_ok=True)
with open(os.path.join(sys.argv[1], "status.json"), "w") as out:
    out.write(sys.stdin.read())
"""


def _forged(pid: int) -> str:
    """A fresh, plausible OK from a live process that calls itself hydra_watchdog."""
    now = time.time()
    report = StatusReport(
        pid=pid, phase="healthy", verdict=0, heartbeat=now, since=now, stale_after=60.0
    )
    return to_json(report)


def _status(runtime: Path) -> subprocess.CompletedProcess[str]:
    """`status --runtime-dir RUNTIME`, its screen's wrapped lines joined again."""
    out = cli("status", "--runtime-dir", str(runtime))
    out.stdout = " ".join(out.stdout.split())
    return out


@pytest.fixture
def standin() -> Iterator[int]:
    """A live process whose command line names hydra_watchdog (a forger can run one too)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "hydra_watchdog"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_a_status_in_another_users_directory_is_not_believed(
    shared_dir: Path, standin: int
) -> None:
    """uid 65534 writes a fresh OK into a directory of its own, where runtime_dir points (the
    swapped-in directory of issue 22): root's `status` says UNKNOWN and why, not OK."""
    theirs = shared_dir / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    forge = subprocess.run(
        as_nobody([SYSTEM_PYTHON, "-c", FORGER, str(theirs / "run")]),
        input=_forged(standin),
        text=True,
        capture_output=True,
        check=False,
    )
    assert forge.returncode == 0, forge.stderr
    assert (theirs / "run" / STATUS_FILE).stat().st_uid == NOBODY
    out = _status(theirs / "run")
    assert out.returncode == 3, out.stdout
    assert "not trusted: runtime dir" in out.stdout and "owned by uid 65534" in out.stdout
    assert "healthy" not in out.stdout


def test_a_status_file_someone_else_owns_or_can_write_is_not_believed(
    shared_dir: Path, standin: int
) -> None:
    runtime = shared_dir / "run"
    runtime.mkdir(mode=0o755)
    path = runtime / STATUS_FILE
    path.write_text(_forged(standin))
    assert _status(runtime).returncode == 0  # the daemon's own file: believed
    os.chown(path, NOBODY, NOBODY)  # planted by another user
    out = _status(runtime)
    assert out.returncode == 3 and "the status file is owned by uid 65534" in out.stdout
    os.chown(path, 0, 0)
    path.chmod(0o666)
    out = _status(runtime)
    assert out.returncode == 3 and "writable by others (mode 0666)" in out.stdout


def test_a_runtime_dir_reached_through_a_symlink_is_not_followed(
    shared_dir: Path, standin: int
) -> None:
    real = shared_dir / "real"
    real.mkdir()
    (real / STATUS_FILE).write_text(_forged(standin))
    (shared_dir / "link").symlink_to(real)
    out = _status(shared_dir / "link")
    assert out.returncode == 3 and "is a symlink" in out.stdout
