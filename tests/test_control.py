"""Pause/resume through the state dir."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hydra_watchdog import control
from hydra_watchdog.observation import PauseRequest
from hydra_watchdog.trusted_path import UnsafeDirectoryError


def test_pause_until_converts_wall_expiry_to_the_monotonic_clock(tmp_path: Path) -> None:
    control.pause(tmp_path, "driver upgrade", until_wall=10_000.0)
    got = control.read_pause(tmp_path, wall_now=9_000.0, mono_now=50.0)
    assert got == PauseRequest(reason="driver upgrade", until=1_050.0)


def test_pause_without_expiry_lasts_until_resume(tmp_path: Path) -> None:
    control.pause(tmp_path, "maintenance", until_wall=None)
    assert control.read_pause(tmp_path, 1e12, 5.0) == PauseRequest("maintenance", None)
    assert control.resume(tmp_path) is True
    assert control.read_pause(tmp_path, 1e12, 5.0) is None
    assert control.resume(tmp_path) is False


def test_expired_pause_is_no_pause(tmp_path: Path) -> None:
    control.pause(tmp_path, "short", until_wall=100.0)
    assert control.read_pause(tmp_path, wall_now=100.0, mono_now=1.0) is None
    assert control.read_pause(tmp_path, wall_now=99.0, mono_now=1.0) == PauseRequest("short", 2.0)


def test_a_second_pause_replaces_the_first(tmp_path: Path) -> None:
    control.pause(tmp_path, "first", until_wall=None)
    control.pause(tmp_path, "second", until_wall=500.0)
    assert control.read_pause(tmp_path, 400.0, 0.0) == PauseRequest("second", 100.0)


def test_pause_file_is_private(tmp_path: Path) -> None:
    d = tmp_path / "state"
    control.pause(d, "x", None)
    assert d.stat().st_mode & 0o777 == 0o700
    assert (d / control.PAUSE_FILE).stat().st_mode & 0o777 == 0o600


def test_non_finite_expiry_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="finite"):
        control.pause(tmp_path, "x", float("nan"))
    assert not (tmp_path / control.PAUSE_FILE).exists()


@pytest.mark.parametrize(
    "content",
    [
        b"garbage",
        b"[]",
        b'{"reason": 5}',
        b'{"reason": "x", "until_wall": "tomorrow"}',
        b'{"reason": "x", "until_wall": true}',
        b'{"reason": "x", "until_wall": NaN}',
    ],
)
def test_garbage_pauses_nothing_and_is_moved_aside(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / control.PAUSE_FILE).write_bytes(content)
    assert control.read_pause(tmp_path, 1.0, 1.0) is None
    assert not (tmp_path / control.PAUSE_FILE).exists()
    aside = list(tmp_path.glob(f"{control.PAUSE_FILE}.corrupt-*"))
    assert [p.read_bytes() for p in aside] == [content]
    assert any("unusable" in r.getMessage() for r in caplog.records)


def test_pause_from_another_process_is_seen(tmp_path: Path) -> None:
    code = (
        "import sys, time; from hydra_watchdog import control; "
        "control.pause(sys.argv[1], 'from cli', time.time() + 3600)"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=60)
    got = control.read_pause(tmp_path, wall_now=time.time(), mono_now=0.0)
    assert got is not None and got.reason == "from cli"
    assert got.until is not None and 3500 < got.until <= 3600


# --- files this daemon did not write --------------------------------------------------------------


def _valid_pause(path: Path) -> None:
    path.write_text('{"version": 1, "reason": "planted", "until_wall": null}')


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_a_pause_file_of_another_owner_pauses_nothing(tmp_path: Path) -> None:
    pause = tmp_path / control.PAUSE_FILE
    _valid_pause(pause)
    pause.chmod(0o600)
    os.chown(pause, 65534, 65534)
    assert control.read_pause(tmp_path, 1.0, 1.0) is None
    assert not pause.exists()
    assert len(list(tmp_path.glob(f"{control.PAUSE_FILE}.corrupt-*"))) == 1


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666])
def test_a_group_or_world_writable_pause_file_pauses_nothing(tmp_path: Path, mode: int) -> None:
    pause = tmp_path / control.PAUSE_FILE
    _valid_pause(pause)
    pause.chmod(mode)
    assert control.read_pause(tmp_path, 1.0, 1.0) is None
    # the same content, written as `pause` writes it, does pause
    control.pause(tmp_path, "planted", None)
    assert control.read_pause(tmp_path, 1.0, 1.0) == PauseRequest("planted", None)


def test_a_fifo_symlink_or_huge_pause_file_pauses_nothing_and_never_blocks(tmp_path: Path) -> None:
    pause = tmp_path / control.PAUSE_FILE
    os.mkfifo(pause)  # would block a plain open() forever: the loop would hang
    assert control.read_pause(tmp_path, 1.0, 1.0) is None
    real = tmp_path / "elsewhere.json"
    _valid_pause(real)
    real.chmod(0o600)
    pause.symlink_to(real)
    assert control.read_pause(tmp_path, 1.0, 1.0) is None
    with pause.open("wb") as f:
        f.truncate(control.PAUSE_MAX_BYTES + 1)
    assert control.read_pause(tmp_path, 1.0, 1.0) is None
    assert len(list(tmp_path.glob(f"{control.PAUSE_FILE}.corrupt-*"))) == 3


def test_pause_refuses_a_state_dir_it_must_not_trust(tmp_path: Path) -> None:
    loose = tmp_path / "state"
    loose.mkdir()
    loose.chmod(0o777)
    with pytest.raises(UnsafeDirectoryError, match="not 0700"):
        control.pause(loose, "x", None)
    assert list(loose.iterdir()) == []
    assert loose.stat().st_mode & 0o777 == 0o777
