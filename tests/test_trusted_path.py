"""Issue 22 items 4 and 5 (the path rule): the state and runtime dirs are trusted only when no
component of their path can be replaced by another user, and are never reached through a symlink.

The adversary is a real process of uid 65534 (tests/harness/adversary.py) that plants what it can
where it can write; the daemon is the real `hydra-watchdog run`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hydra_watchdog.report.status import StatusReport
from hydra_watchdog.report.status_file import STATUS_FILE, write_status
from hydra_watchdog.statefile import StateFile
from hydra_watchdog.states import Phase
from hydra_watchdog.trusted_path import UnsafeDirectoryError, open_trusted_dir
from tests.harness.adversary import NOBODY, SYSTEM_PYTHON, as_nobody, plant, public_dir
from tests.harness.lines import unwrapped

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as uid 65534")
EX_CONFIG = 78


@pytest.fixture
def top() -> Iterator[Path]:
    """A root-owned folder every user can reach (pytest's tmp_path is root's alone)."""
    with public_dir() as path:
        yield path


def _dir(path: Path, mode: int, uid: int = 0) -> Path:
    path.mkdir()
    path.chmod(mode)
    os.chown(path, uid, uid)
    return path


def _refusal(path: Path, **kwargs: object) -> str:
    with pytest.raises(UnsafeDirectoryError) as caught:
        os.close(open_trusted_dir(path, what="state dir", **kwargs))  # type: ignore[arg-type]
    return str(caught.value)


# --- the rule, component by component -----------------------------------------------------------


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_a_parent_others_can_write_is_refused_by_name(top: Path, mode: int) -> None:
    parent = _dir(top / "shared", mode)
    state = _dir(parent / "state", 0o700)
    said = _refusal(state)
    assert f"{parent} is writable by others (mode {mode:04o})" in said, said


def test_a_parent_of_another_user_is_refused_by_name(top: Path) -> None:
    parent = _dir(top / "theirs", 0o755, NOBODY)
    state = _dir(parent / "state", 0o700)
    said = _refusal(state)
    assert f"{parent} is owned by uid {NOBODY}" in said, said


def test_a_sticky_root_parent_holds_ours_but_not_what_another_user_made_first(top: Path) -> None:
    """/tmp's case: others can add entries to a root-owned sticky dir, never rename or remove
    ours. Ours there is trusted; one they made first is theirs and refused, as is a symlink."""
    sticky = _dir(top / "tmp", 0o1777)
    os.close(open_trusted_dir(sticky / "ours", what="state dir", private=True, create_mode=0o700))
    assert (sticky / "ours").stat().st_mode & 0o7777 == 0o700
    root_only = _dir(top / "root-only", 0o755)
    plant('mkdir "$1/first" && ln -s "$2" "$1/link"', str(sticky), str(root_only))
    said = _refusal(sticky / "first", private=True, create_mode=0o700)
    assert f"{sticky}/first is owned by uid {NOBODY}" in said, said
    said = _refusal(sticky / "link", private=True, create_mode=0o700)
    assert f"{sticky}/link is a symlink" in said, said
    assert list(root_only.iterdir()) == []
    # The sticky dir itself is never the last component: anyone could add files to it.
    assert "writable by others (mode 1777)" in _refusal(sticky)


def test_no_component_is_a_symlink_even_one_of_root(top: Path) -> None:
    real = _dir(top / "real", 0o755)
    (top / "alias").symlink_to(real)
    said = _refusal(top / "alias" / "state", create_mode=0o700)
    assert f"{top}/alias is a symlink" in said, said
    assert list(real.iterdir()) == []


def test_an_unprivileged_daemon_trusts_its_own_temp_dir(top: Path) -> None:
    """`make demo` as a user: its state in a fresh temp dir of its own under /tmp (root's,
    sticky). trusted_path imports only the standard library: the copy runs as nobody."""
    shutil.copy(Path(__file__).parents[1] / "hydra_watchdog" / "trusted_path.py", top)
    code = (
        "import os, sys, tempfile; sys.path.insert(0, sys.argv[1]); import trusted_path as t\n"
        "d = tempfile.mkdtemp(prefix='hydra-demo-')\n"
        "os.close(t.open_trusted_dir(d + '/state', what='s', private=True, create_mode=0o700))\n"
        "os.close(t.open_trusted_dir(d + '/run', what='r', create_mode=0o755))\n"
        "print(d)\n"
    )
    done = subprocess.run(
        as_nobody([SYSTEM_PYTHON, "-c", code, str(top)]),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    made = Path(done.stdout.strip())
    try:
        assert (made / "state").stat().st_uid == NOBODY
    finally:
        shutil.rmtree(made)


# --- the daemon at start ------------------------------------------------------------------------


def _run_once(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hydra_watchdog", "run", "--once", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("key", ["state_dir", "runtime_dir"])
def test_the_daemon_refuses_to_start_under_a_parent_others_can_write(top: Path, key: str) -> None:
    """The issue's set-up: the state (runtime) dir under a parent anyone can write, where a user
    can rename ours away and put one of their own in its place: exit 78, the parent named."""
    shared = _dir(top / "shared", 0o777)
    dirs = {"state_dir": top / "state", "runtime_dir": top / "run"}
    dirs[key] = shared / "dir"
    config = top / "config.toml"
    config.write_text(
        "[watchdog]\n" + "".join(f'{name} = "{path}"\n' for name, path in dirs.items())
    )
    done = _run_once(config)
    assert done.returncode == EX_CONFIG, done.stderr[-2000:]
    what = key.replace("_", " ")
    assert f"refusing to start: {what} {shared}/dir: {shared} is writable by others" in (
        unwrapped(done.stderr)
    ), done.stderr
    assert "Traceback" not in done.stderr


# --- item 5: the status file's writer -----------------------------------------------------------


def test_status_is_never_written_through_a_symlink_another_user_planted(top: Path) -> None:
    """The runtime dir does not exist yet under a sticky /tmp-like dir; the adversary plants
    its name as a symlink to a root-owned dir it wants written (or later swapped): refused,
    nothing written there."""
    sticky = _dir(top / "tmp", 0o1777)
    target = _dir(top / "root-owned", 0o755)
    plant('ln -s "$2" "$1/run"', str(sticky), str(target))
    report = StatusReport(pid=1, phase=Phase.HEALTHY, summary="ok")
    with pytest.raises(UnsafeDirectoryError, match=f"runtime dir {sticky}/run is a symlink"):
        write_status(sticky / "run", report)
    assert list(target.iterdir()) == []


def test_status_is_never_written_under_a_parent_others_can_write(top: Path) -> None:
    shared = _dir(top / "shared", 0o777)
    run = _dir(shared / "run", 0o755)
    report = StatusReport(pid=1, phase=Phase.HEALTHY, summary="ok")
    with pytest.raises(UnsafeDirectoryError, match=f"{shared} is writable by others"):
        write_status(run, report)
    assert not (run / STATUS_FILE).exists()


def test_a_state_dir_swapped_for_a_symlink_after_start_is_never_written_through(top: Path) -> None:
    """Started fine; then the parent is opened to others by mistake and the adversary swaps the
    state dir for a symlink to a root-owned dir: the next save refuses, the target untouched."""
    parent = _dir(top / "parent", 0o755)
    sf = StateFile(parent / "state", events_kept=5, boot_id="b")
    sf.load()
    target = _dir(top / "elsewhere", 0o700)
    parent.chmod(0o777)
    plant('mv "$1/state" "$1/old" && ln -s "$2" "$1/state"', str(parent), str(target))
    from hydra_watchdog.policy_state import PolicyState

    with pytest.raises(UnsafeDirectoryError, match=f"{parent} is writable by others"):
        sf.save(PolicyState(), [])
    parent.chmod(0o755)  # the mistake mended, the symlink is still refused
    with pytest.raises(UnsafeDirectoryError, match="is a symlink"):
        sf.save(PolicyState(), [])
    assert list(target.iterdir()) == []
