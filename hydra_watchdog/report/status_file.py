"""The status file: how the daemon's verdict reaches `hydra-watchdog status` as any user.

The daemon writes `status.json` into the runtime dir (0755, file 0644, no secrets) every cycle,
so `hydra-watchdog status` works for an unprivileged user. Each write walks the runtime dir's path
afresh (trusted_path: no component another user could replace, no symlink followed) and writes
relative to the directory it checked. A clean stop marks it stopped, so that `status` never shows
a dead daemon's last verdict as the current one.

`status` believes the file only as the daemon wrote it (issue 22, item 5): the runtime dir is
walked by the same rule, the file is opened in it without following a symlink, and it must be a
regular file owned by root or by the user running `status` (the daemon runs as root; a daemon run
by hand, the demo and the tests run as their user) and writable by no one else. Its size is
capped; its content is judged by report/status.py.

Finding it (`find_status`) must not cost `status` a TOML parser and the config's schema at every
run (tomllib, dataclasses: three times the interpreter's own start-up): the report names the
runtime dir it lies in and the config file its daemon read (report.config_file: device, inode,
size and change times). The runtime dir that a `runtime_dir = "..."` line of the config names,
else the default one, holds a report written by a daemon of that very config file, unchanged
since: then it is the report the config leads to. Anything else (another config, an edited one,
a runtime_dir spelled in a way that line does not match) is settled by reading the config.
"""

from __future__ import annotations

import os

from hydra_watchdog.paths import DEFAULT_RUNTIME_DIR, MAX_CONFIG_BYTES
from hydra_watchdog.regular_file import UnusableFileError, file_identity, read_regular
from hydra_watchdog.report.status import StatusReport, from_json, replace, to_json
from hydra_watchdog.trusted_path import UnsafeDirectoryError
from hydra_watchdog.trusted_path import runtime_dir as trusted_runtime_dir

STATUS_FILE = "status.json"
STATUS_MAX_BYTES = 4 * 1024**2  # ours is a few KiB; `status` must stay light on a huge one


def write_status(runtime_dir: str | os.PathLike[str], report: StatusReport) -> None:
    """Publish the daemon's status for `hydra-watchdog status` (world-readable: no secrets)."""
    from pathlib import Path  # noqa: PLC0415 - the daemon's side: `status` only reads

    from hydra_watchdog.statefile import write_atomic  # noqa: PLC0415

    data = to_json(report).encode()
    with trusted_runtime_dir(runtime_dir, create=True) as dir_fd:
        write_atomic(Path(STATUS_FILE), data, 0o644, dir_fd=dir_fd)


def read_status(runtime_dir: str | os.PathLike[str]) -> StatusReport | None:
    """The last status the daemon wrote; None when there is none. ValueError (saying what is
    wrong) for anything that is not a status this version reads, or that is not the daemon's
    (see the module's doc), never another exception."""
    try:
        with trusted_runtime_dir(runtime_dir) as dir_fd:
            raw, st = read_regular(STATUS_FILE, STATUS_MAX_BYTES, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except UnsafeDirectoryError as exc:
        raise ValueError(f"not trusted: {exc}") from None
    except UnusableFileError as exc:
        raise ValueError(f"the status file is unusable: {exc}") from None
    except OSError as exc:
        raise ValueError(f"cannot read the status file: {exc.strerror or exc}") from None
    owners = (0, os.geteuid())
    if st.st_uid not in owners:
        raise ValueError(
            f"not trusted: the status file is owned by uid {st.st_uid}, not by "
            f"{' or '.join(f'uid {u}' for u in sorted(set(owners)))}: it is not the daemon's"
        )
    if st.st_mode & 0o022:
        raise ValueError(
            f"not trusted: the status file is writable by others (mode {st.st_mode & 0o7777:04o})"
        )
    return from_json(raw)


def mark_stopped(runtime_dir: str | os.PathLike[str], *, wall: float, pid: int) -> None:
    """A clean stop: the status file says so, keeping the last report for `status` to show."""
    try:
        last = read_status(runtime_dir)
    except ValueError:
        last = None
    report = last if last is not None and last.pid == pid else StatusReport(pid=pid)
    write_status(runtime_dir, replace(report, stopped_at=wall))


def _named_runtime_dir(config: bytes) -> str | None:
    """X of the last line `runtime_dir = "X"` of the config (a comment may follow); None when
    there is none. A hint only: _published_by decides."""
    found = None
    for line in config.splitlines():
        key, eq, rest = line.partition(b"=")
        rest = rest.strip()
        if not eq or key.strip() != b"runtime_dir" or not rest.startswith(b'"'):
            continue
        value, quote, tail = rest[1:].partition(b'"')
        if quote and (not tail.strip() or tail.strip().startswith(b"#")):
            found = value
    return None if found is None else found.decode("utf-8", "replace")


def _published_by(config_path: str, runtime_dir: str) -> bool:
    """Whether `runtime_dir` holds a report of a daemon that read the config file at
    `config_path` as it is now (see the module's doc)."""
    try:
        report = read_status(runtime_dir)
        identity = file_identity(os.stat(config_path))
    except (OSError, ValueError):
        return False
    return (
        report is not None
        and report.config_file == identity
        and os.path.normpath(report.runtime_dir) == os.path.normpath(runtime_dir)
    )


def find_status(config_path: str) -> tuple[str, str]:
    """(the runtime dir the config at `config_path` names, a note for the user or ""). The note
    says when the config could not be read and the default runtime dir is used instead."""
    try:
        text, _ = read_regular(config_path, MAX_CONFIG_BYTES, follow=True)
    except (OSError, UnusableFileError):
        text = b""  # unreadable here (another user's 0600 config): the report may still match
    named = _named_runtime_dir(text)
    for candidate in (named, DEFAULT_RUNTIME_DIR) if named else (DEFAULT_RUNTIME_DIR,):
        if _published_by(config_path, candidate):
            return candidate, ""
    from hydra_watchdog.config import ConfigError, load_config  # noqa: PLC0415 - see the doc

    try:
        return load_config(config_path).watchdog.runtime_dir, ""
    except ConfigError as exc:
        return DEFAULT_RUNTIME_DIR, f"(config not read: {exc}; using defaults)"
