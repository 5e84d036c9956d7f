"""Issue 22 item 7 (files): every file the watchdog reads is opened non-blocking, must be a
regular file and is read with a cap. A FIFO the adversary (uid 65534) plants, or /dev/zero, named
as the config or the admin key file: `run`, `check-config` and `status` answer at once, `run`
exits 78 with the reason; at runtime the reader says why and the cycle goes on.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from hydra_watchdog.adapters.loader_env import unit_env
from hydra_watchdog.adapters.tabby import read_admin_key
from hydra_watchdog.load_record import LAUNCH_FILE, read_launch
from tests.harness.adversary import plant, public_dir
from tests.harness.lines import unwrapped

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as uid 65534")
EX_CONFIG = 78
ANSWER_WITHIN = 30.0  # seconds; a command that blocks on a FIFO never answers
_T = TypeVar("_T")


@pytest.fixture
def fifo() -> Iterator[Path]:
    """A FIFO the adversary made in a folder every user can write."""
    with public_dir() as top:
        top.chmod(0o1777)
        plant('mkfifo -m 0644 "$1/planted"', str(top))
        yield top / "planted"


def _limit_memory() -> None:
    # Before the fix, /dev/zero as the key was read whole: fail fast, never eat the machine.
    resource.setrlimit(resource.RLIMIT_AS, (2 * 1024**3, 2 * 1024**3))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hydra_watchdog", *args],
        capture_output=True,
        text=True,
        timeout=ANSWER_WITHIN,
        check=False,
        preexec_fn=_limit_memory,
    )


def _within(fn: Callable[[], _T], fifo: Path) -> _T:
    """fn() from a thread; fails when it is still blocked after ANSWER_WITHIN s (and then lets
    it go by opening the FIFO's write end, so that no reader stays blocked)."""
    box: list[_T] = []
    worker = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    worker.start()
    worker.join(ANSWER_WITHIN)
    if worker.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(10)
        pytest.fail(f"blocked on the FIFO {fifo}")
    return box[0]


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.parametrize("planted", ["fifo", "/dev/zero"])
def test_a_config_that_is_not_a_regular_file_is_refused_at_once(
    fifo: Path, command: str, planted: str
) -> None:
    path = str(fifo) if planted == "fifo" else planted
    extra = ["--once"] if command == "run" else []
    done = cli(command, *extra, "--config", path)
    assert done.returncode == EX_CONFIG, done.stdout + done.stderr
    kind = "p" if planted == "fifo" else "c"
    said = unwrapped(done.stderr)
    assert f"config file {path} cannot be read: not a regular file (mode {kind}rw" in said
    assert "Traceback" not in done.stderr


def test_status_with_a_fifo_as_its_config_answers(fifo: Path, tmp_path: Path) -> None:
    # With --runtime-dir, status needs no config (report/status_file.py): it answers from the
    # runtime dir; where it reads the config, the FIFO is refused (test_status_file.py).
    done = cli("status", "--config", str(fifo), "--runtime-dir", str(tmp_path))
    assert done.returncode == 3, done.stdout + done.stderr  # UNKNOWN: no daemon ran here
    assert "no status file" in done.stdout
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("planted", ["fifo", "/dev/zero"])
def test_an_admin_key_file_that_is_not_a_regular_file_stops_run_at_start(
    fifo: Path, tmp_path: Path, planted: str
) -> None:
    key = str(fifo) if planted == "fifo" else planted
    config = tmp_path / "config.toml"
    config.write_text(
        f'[watchdog]\nstate_dir = "{tmp_path / "state"}"\nruntime_dir = "{tmp_path / "run"}"\n'
        f'[tabbyapi]\nurl = "http://127.0.0.1:9"\nadmin_key_file = "{key}"\n'
    )
    done = cli("run", "--once", "--config", str(config))
    assert done.returncode == EX_CONFIG, done.stderr[-2000:]
    kind = "p" if planted == "fifo" else "c"
    said = f"refusing to start: tabbyapi.admin_key_file {key} is unusable: not a regular file"
    assert f"{said} (mode {kind}rw" in unwrapped(done.stderr), done.stderr
    assert "Traceback" not in done.stderr and "MemoryError" not in done.stderr


def test_at_runtime_a_fifo_key_or_environment_file_is_said_never_waited_on(fifo: Path) -> None:
    """The key read again while the daemon runs, a unit's EnvironmentFile=: the reason, at once."""
    key, problem = _within(lambda: read_admin_key(str(fifo), {}), fifo)
    assert key is None and "cannot be read (not a regular file (mode prw" in problem, problem
    env = _within(lambda: unit_env("tabbyapi.service", "", [(str(fifo), False)]), fifo)
    assert env.env is None and "unreadable (not a regular file (mode prw" in env.detail, env
    optional = _within(lambda: unit_env("tabbyapi.service", "A=1", [(str(fifo), True)]), fifo)
    assert optional.env is not None  # "-" prefixed: ignored, as systemd does


def test_a_fifo_as_a_load_record_counts_as_none(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.mkfifo(state / LAUNCH_FILE, 0o600)
    assert _within(lambda: read_launch(state), state / LAUNCH_FILE) is None
