"""The status file: how the daemon's verdict reaches `hydra-watchdog status` as any user.

The daemon writes `status.json` into the runtime dir (0755, file 0644, no secrets) every cycle,
so `hydra-watchdog status` works for an unprivileged user. Each write walks the runtime dir's path
afresh (trusted_path: no component another user could replace, no symlink followed) and writes
relative to the directory it checked. A clean stop marks it stopped, so that
`status` never shows a dead daemon's last verdict as the current one. The file is read with a
size cap and without following symlinks; its content is judged by report/status.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hydra_watchdog.regular_file import UnusableFileError, read_regular
from hydra_watchdog.report.status import StatusReport, from_json, to_json
from hydra_watchdog.statefile import write_atomic
from hydra_watchdog.trusted_path import runtime_dir as trusted_runtime_dir

STATUS_FILE = "status.json"
STATUS_MAX_BYTES = 4 * 1024**2  # ours is a few KiB; `status` must stay light on a huge one


def write_status(runtime_dir: Path | str, report: StatusReport) -> None:
    """Publish the daemon's status for `hydra-watchdog status` (world-readable: no secrets)."""
    data = to_json(report).encode()
    with trusted_runtime_dir(runtime_dir, create=True) as dir_fd:
        write_atomic(Path(STATUS_FILE), data, 0o644, dir_fd=dir_fd)


def read_status(runtime_dir: Path | str) -> StatusReport | None:
    """The last status the daemon wrote; None when there is none. ValueError (saying what is
    wrong) for anything that is not a status this version reads, never another exception."""
    path = Path(runtime_dir) / STATUS_FILE
    try:
        raw, _ = read_regular(path, STATUS_MAX_BYTES)
    except FileNotFoundError:
        return None
    except UnusableFileError as exc:
        raise ValueError(f"the status file is unusable: {exc}") from None
    except OSError as exc:
        raise ValueError(f"cannot read the status file: {exc.strerror or exc}") from None
    return from_json(raw)


def mark_stopped(runtime_dir: Path | str, *, wall: float, pid: int) -> None:
    """A clean stop: the status file says so, keeping the last report for `status` to show."""
    try:
        last = read_status(runtime_dir)
    except ValueError:
        last = None
    report = last if last is not None and last.pid == pid else StatusReport(pid=pid)
    write_status(runtime_dir, dataclasses.replace(report, stopped_at=wall))
