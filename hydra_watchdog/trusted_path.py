"""The directories the watchdog must trust (the state dir, the runtime dir), opened safely.

The rule, in one sentence: a directory is trusted only when no component of its path can be
replaced by another user, that is when every component from / down is a real directory (never a
symlink) owned by root or by this process's euid and writable by group or others only if it is
sticky and not the last one (in /tmp others may add entries but never rename or remove ours, and
an entry they made first is theirs and fails the owner test).

Whoever can replace a component can swap in a directory of their own: a `load.json` there names
any pid for root to SIGTERM, a `status.json` there is the verdict `status` believes. So the walk
starts at / and opens one component at a time relative to the last (openat, O_NOFOLLOW), judges
each by what it opened (fstat), and hands back the descriptor of the last one: files are then
opened relative to it (read_regular(name, ..., dir_fd=fd)), never by path. Every read and write
walks again (`trusted_dir`), so a directory that became replaceable while the daemon ran is
refused at the next read, not trusted from a check made at start.

Its own module, importing only os, stat, contextlib and collections.abc, for `status`, which
reads the status file through it at every run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Collection, Iterator

StrPath = str | os.PathLike[str]

_WALK = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC  # search right is enough
_LAST = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC  # listed and fsynced
_PARENT_MODE = 0o755  # components we create on the way (a umask may make them stricter)


class UnsafeDirectoryError(OSError):
    """A directory we would have to trust but must not: the message names the component, says
    what is wrong with it and how to fix it. An OSError, so that per-cycle readers and writers
    treat it like any other failed read or write."""


def _judge(
    st: os.stat_result,
    subject: str,
    *,
    owners: Collection[int],
    last: bool,
    private: bool,
) -> None:
    """Raise UnsafeDirectoryError when the component `subject` (its stat `st`) breaks the rule."""
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in owners:
        allowed = " or ".join(f"uid {uid}" for uid in sorted(owners))
        raise UnsafeDirectoryError(
            f"{subject} is owned by uid {st.st_uid}, not by {allowed}: its owner could swap what "
            f"it holds; check it, then chown it or choose another path"
        )
    if last and private and mode & 0o077:
        raise UnsafeDirectoryError(
            f"{subject} has mode {mode:04o}, not 0700: others could have planted files in it (a "
            f"pause.json stops every recovery); inspect it, then `chmod 700` it"
        )
    if mode & 0o022 and (last or not mode & stat.S_ISVTX):
        raise UnsafeDirectoryError(
            f"{subject} is writable by others (mode {mode:04o}), who could swap what it holds; "
            f"`chmod go-w` it or choose another path"
        )


def open_trusted_dir(
    path: StrPath,
    *,
    what: str,
    private: bool = False,
    create_mode: int | None = None,
    owners: Collection[int] | None = None,
) -> int:
    """A descriptor (O_RDONLY, close-on-exec) of the directory `path`, walked as the module doc
    says; the caller closes it. `what` names the directory in messages ("state dir").

    `owners`: the uids each component may belong to (default: root and this process's euid).
    `private`: the last component must also be closed to group and others (0700).
    `create_mode`: create what is missing (the last component with this mode, exactly, the ones
    above it 0755); None: a missing component is FileNotFoundError.

    UnsafeDirectoryError when a component breaks the rule (the message names it);
    PermissionError and FileNotFoundError pass through; never follows a symlink."""
    trusted = frozenset((0, os.geteuid()) if owners is None else owners)
    full = os.path.normpath(os.path.abspath(os.fspath(path)))  # no symlink may stand for `..`
    head = f"{what} {full}"
    names = [name for name in full.split("/") if name]
    fd = os.open("/", _LAST if not names else _WALK)
    try:
        subject = head if not names else f"{head}: /"
        _judge(os.fstat(fd), subject, owners=trusted, last=not names, private=private)
        where = ""
        for i, name in enumerate(names):
            last = i == len(names) - 1
            where += "/" + name
            subject = head if last else f"{head}: {where}"
            created = False
            try:
                try:
                    child = os.open(name, _LAST if last else _WALK, dir_fd=fd)
                except FileNotFoundError:
                    if create_mode is None:
                        raise
                    with contextlib.suppress(FileExistsError):  # raced: judged as found
                        os.mkdir(name, create_mode if last else _PARENT_MODE, dir_fd=fd)
                        created = True
                    child = os.open(name, _LAST if last else _WALK, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ENOTDIR, errno.ELOOP):  # the same error, its path said
                    raise type(exc)(exc.errno, f"{subject}: {exc.strerror}") from None
                kind = "a symlink" if os.path.islink(where) else "not a directory"
                raise UnsafeDirectoryError(
                    f"{subject} is {kind}; name the real directory (no component may be a symlink)"
                ) from None
            os.close(fd)
            fd = child
            if created and last and create_mode is not None:
                os.fchmod(fd, create_mode)  # ours, just made: this only undoes a umask
            _judge(os.fstat(fd), subject, owners=trusted, last=last, private=private)
        return fd
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def trusted_dir(
    path: StrPath,
    *,
    what: str,
    private: bool = False,
    create_mode: int | None = None,
    owners: Collection[int] | None = None,
) -> Iterator[int]:
    """open_trusted_dir for the length of a `with`: one read or one write, walked afresh."""
    fd = open_trusted_dir(path, what=what, private=private, create_mode=create_mode, owners=owners)
    try:
        yield fd
    finally:
        os.close(fd)


def state_dir(path: StrPath, *, create: bool = False) -> contextlib.AbstractContextManager[int]:
    """The state dir (pause.json, load records, state.json): trusted and 0700."""
    return trusted_dir(path, what="state dir", private=True, create_mode=0o700 if create else None)


def runtime_dir(path: StrPath, *, create: bool = False) -> contextlib.AbstractContextManager[int]:
    """The runtime dir (status.json, world-readable): trusted, any user may list it."""
    return trusted_dir(path, what="runtime dir", create_mode=0o755 if create else None)
