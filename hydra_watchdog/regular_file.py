"""The one way the watchdog reads a file: bounded, non-blocking, regular files only. The config
and the admin key (at start and on reload), the state, pause and load records, the status file,
a unit's EnvironmentFile=. (Kernel files under /proc and /sys are read by
adapters/identity.read_bytes, also bounded.)

Its own module, importing only os and stat, because `status` reads with it too and must not pay
for statefile's imports at every start.
"""

from __future__ import annotations

import os
import stat


class UnusableFileError(ValueError):
    """A path that holds something other than a regular file of ours (a directory, a FIFO, a
    symlink, a file too large)."""


def file_identity(st: os.stat_result) -> str:
    """Which file, in which version: device, inode, size and the times of its last change. Any
    write changes the ctime, which no user can set back; another file has another inode."""
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def read_regular(
    path: str | os.PathLike[str], limit: int, *, follow: bool = False, dir_fd: int | None = None
) -> tuple[bytes, os.stat_result]:
    """The bytes of a regular file of at most `limit` bytes, and its stat. Follows a symlink only
    when told (`follow`: a config NixOS links into the store), never blocks on a FIFO. With
    `dir_fd` (trusted_path), `path` is a name in that directory.
    FileNotFoundError and PermissionError pass through; anything else that is not a readable
    regular file within the limit is UnusableFileError. The watchdog's
    own resource failures (EMFILE, ENOMEM...) pass through as OSError: they are not the file's
    fault, and a file must never be moved aside for them."""
    try:
        # Judged before it is opened: opening a device can act (a tape rewinds, /dev/watchdog
        # arms); what changes in between is caught by the fstat below.
        before = os.stat(path, dir_fd=dir_fd, follow_symlinks=follow)
        if not stat.S_ISREG(before.st_mode):
            kind = "a symlink" if stat.S_ISLNK(before.st_mode) else "not a regular file"
            raise UnusableFileError(f"{kind} (mode {stat.filemode(before.st_mode)})")
        nofollow = 0 if follow else os.O_NOFOLLOW
        fd = os.open(path, os.O_RDONLY | nofollow | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except (FileNotFoundError, PermissionError):
        raise
    except OSError as exc:  # ELOOP: a symlink swapped in; ENAMETOOLONG; ...
        from hydra_watchdog.observation import local_failure  # noqa: PLC0415 - see the module doc

        if local_failure(exc):
            raise
        raise UnusableFileError(f"cannot open it: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnusableFileError(f"not a regular file (mode {stat.filemode(st.st_mode)})")
        if st.st_size > limit:
            raise UnusableFileError(
                f"{st.st_size} bytes, more than the {limit} a valid one can have"
            )
        chunks, total = [], 0
        while total <= limit:  # the size may change while we read: the limit holds regardless
            chunk = os.read(fd, min(1024**2, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise UnusableFileError(f"more than the {limit} bytes a valid one can have")
        return b"".join(chunks), st
    except OSError as exc:
        from hydra_watchdog.observation import local_failure  # noqa: PLC0415 - see the module doc

        if local_failure(exc):
            raise
        raise UnusableFileError(f"cannot read it: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
