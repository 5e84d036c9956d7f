"""Real systemd as PID 1 of a throw-away namespace, for tests, the chaos suite and benchmarks.

Theory of operation (facts in ../shared/notes/systemd-in-namespace.md):

* systemd runs `systemd-tmpfiles --boot` when it boots, which EMPTIES /tmp of whatever root it
  sees. So it never sees the host's root: `unshare` gives it fresh pid + mount + net + uts + ipc
  namespaces, and inside them a copy-on-write overlay of `/` (upper layer on a tmpfs) becomes its
  root through pivot_root. Everything it writes (unit files, state, its own /tmp and /run) lands
  in the tmpfs and vanishes with the mount namespace when the last process in it exits.
* The host's cgroup hierarchies are shared (there is no cgroup namespace). Two of these systemds
  booted by engineers side by side would both claim `/system.slice/...`; so the boot script first
  moves itself into a private cgroup `/hydra-ns-<id>` in every hierarchy systemd manages, and
  systemd takes its own cgroup as its root. A unit's ControlGroup therefore reads
  `/hydra-ns-<id>/system.slice/x.service`, the same path `/proc/PID/cgroup` shows.
* Everything is driven from the host with `nsenter -t PID -a ...`: the command sees the
  namespace's root, /proc, loopback network and systemd. The project checkout and its venv are
  visible inside through the overlay's lower layer (files changed on the host after the boot
  usually show through too, but overlayfs does not promise it: write what a test needs with
  `write_file`).
* `shutdown()` asks for poweroff (SIGRTMIN+4), waits, and SIGKILLs PID 1 if it has to (which
  kills the whole pid namespace). `unshare --kill-child` plus a parent-death signal make sure no
  systemd outlives a crashed test run.

Importable without pytest; the pytest fixture lives in tests/harness/systemd_fixtures.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from hydra_watchdog.adapters.systemd import kill_group

CGROUP_HIERARCHIES = ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified", "/sys/fs/cgroup")
_PR_SET_PDEATHSIG = 1

# $1: the private folder to mount the tmpfs on; $2: the private cgroup's name; $3: the unit to
# boot into; $4: a checkout to bind in (empty: the overlay shows it already). Follows the note's
# recipe step by step; the cgroup move comes first because it needs the host's /sys paths only.
_BOOT_SCRIPT = r"""
set -eu
B="$1"; CG="$2"; TARGET="$3"; CHECKOUT="$4"
if [ -e /sys/fs/cgroup/cgroup.controllers ]; then
    mkdir -p "/sys/fs/cgroup/$CG" && echo $$ > "/sys/fs/cgroup/$CG/cgroup.procs"
else
    for h in /sys/fs/cgroup/systemd /sys/fs/cgroup/unified; do
        if [ -e "$h/cgroup.procs" ]; then mkdir -p "$h/$CG" && echo $$ > "$h/$CG/cgroup.procs"; fi
    done
fi
mount -t tmpfs -o mode=0755 hydra-ns "$B"
mkdir -p "$B/upper" "$B/work" "$B/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$B/upper,workdir=$B/work" "$B/root"
mount --rbind /dev "$B/root/dev"
mount -t proc proc "$B/root/proc"
mount --rbind /sys "$B/root/sys"
mount -t tmpfs -o mode=0755 tmpfs "$B/root/run"
mount -t tmpfs -o mode=1777 tmpfs "$B/root/tmp"
if [ -n "$CHECKOUT" ]; then
    mkdir -p "$B/root$CHECKOUT" && mount --rbind "$CHECKOUT" "$B/root$CHECKOUT"
fi
cd "$B/root"
mkdir -p oldroot
pivot_root . oldroot
umount -l /oldroot
exec env -i container=other PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    /usr/bin/systemd --system --log-target=console --show-status=no --unit="$TARGET"
"""


REPO = Path(__file__).resolve().parents[2]


def checkout_hidden(path: Path) -> bool:
    """Whether the namespace would not see `path` through its overlay of `/`: under the /tmp
    and /run it mounts afresh, or on another filesystem (overlayfs shows no submounts). CI may
    clone anywhere; then the checkout is bound in at the same path."""
    if any(path.is_relative_to(top) for top in ("/tmp", "/run")):
        return True
    try:
        return path.stat().st_dev != Path("/").stat().st_dev
    except OSError:
        return True


def hidden_by_hardening(*paths: Path) -> list[str]:
    """Directives that show `paths` (the checkout, the interpreter) to a unit whose sandbox has
    ProtectHome=true and PrivateTmp=true, read-only, and nothing else of /home, /root, /tmp."""
    lines = [f"BindReadOnlyPaths={' '.join(str(p) for p in paths)}"]
    if any(p.is_relative_to("/root") or p.is_relative_to("/home") for p in paths):
        lines.insert(0, "ProtectHome=tmpfs")
    return lines


class SystemdNamespaceError(RuntimeError):
    """The namespace could not be booted or driven; the message says why (and where the log is)."""


def unavailable_reason() -> str | None:
    """Why systemd cannot be booted in a namespace here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (unshare, mount, pivot_root)"
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} not found (Debian package util-linux)"
    if not os.access("/usr/bin/systemd", os.X_OK) and not os.access(
        "/lib/systemd/systemd", os.X_OK
    ):
        return "systemd not installed (Debian package systemd)"
    try:
        filesystems = Path("/proc/filesystems").read_text()
    except OSError as exc:
        return f"cannot read /proc/filesystems: {exc}"
    if "overlay" not in filesystems:
        return "the kernel has no overlay filesystem (the copy-on-write root needs it)"
    return None


def _set_parent_death_signal() -> None:
    # Runs in the child before exec: if the Python process dies, unshare gets SIGKILL, and its
    # --kill-child takes systemd with it.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class SystemdNamespace:
    """One booted systemd. Use as a context manager, or call boot() and shutdown() yourself."""

    def __init__(
        self,
        *,
        boot_timeout: float = 90.0,
        interpreter: str = sys.executable,
        target: str = "basic.target",
    ) -> None:
        self.boot_timeout = boot_timeout
        # basic.target: journald, sockets and timers, but not the host's enabled services
        # (multi-user.target would start this machine's prometheus, monit, cron... in here).
        self.target = target
        self.interpreter = interpreter  # what `python()` runs inside (the venv's, by default)
        self.id = uuid.uuid4().hex[:12]
        self.cgroup_name = f"hydra-ns-{self.id}"
        self._dir: Path | None = None
        self._unshare: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """systemd's PID as the host sees it (it is PID 1 inside)."""
        if self._pid is None:
            raise SystemdNamespaceError("not booted")
        return self._pid

    @property
    def root(self) -> str:
        """The namespace's root as a host path (read-only use: prefer write_file for writes)."""
        return f"/proc/{self.pid}/root"

    @property
    def log_path(self) -> Path:
        if self._dir is None:
            raise SystemdNamespaceError("not booted")
        return self._dir / "console.log"

    @property
    def nsenter(self) -> tuple[str, ...]:
        """The argv prefix that runs a command inside."""
        return ("nsenter", "-t", str(self.pid), "-a")

    def boot(self) -> SystemdNamespace:
        reason = unavailable_reason()
        if reason is not None:
            raise SystemdNamespaceError(f"cannot boot systemd in a namespace: {reason}")
        if self._unshare is not None:
            raise SystemdNamespaceError("already booted")
        self._dir = Path(tempfile.mkdtemp(prefix="hydra-ns-"))
        mount_point = self._dir / "fs"
        mount_point.mkdir()
        with self.log_path.open("wb") as log:
            self._unshare = subprocess.Popen(
                [
                    "unshare",
                    "--pid",
                    "--fork",
                    "--kill-child=SIGKILL",
                    "--mount",
                    "--net",
                    "--uts",
                    "--ipc",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    _BOOT_SCRIPT,
                    "hydra-ns-boot",
                    str(mount_point),
                    self.cgroup_name,
                    self.target,
                    str(REPO) if checkout_hidden(REPO) else "",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_set_parent_death_signal,  # noqa: PLW1509 - one ctypes call, no locks
            )
        try:
            self._pid = self._wait_for_child()
            self._wait_until_running()
        except BaseException:
            self.shutdown()
            raise
        return self

    def __enter__(self) -> SystemdNamespace:
        return self.boot()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _wait_for_child(self) -> int:
        assert self._unshare is not None
        children = Path(f"/proc/{self._unshare.pid}/task/{self._unshare.pid}/children")
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if self._unshare.poll() is not None:
                raise SystemdNamespaceError(f"unshare exited early; see {self.log_path}")
            try:
                pids = children.read_text().split()
            except OSError:
                pids = []
            if pids:
                return int(pids[0])
            time.sleep(0.02)
        raise SystemdNamespaceError("unshare started no child within 10 s")

    def _wait_until_running(self) -> None:
        deadline = time.monotonic() + self.boot_timeout
        state = ""
        while time.monotonic() < deadline:
            if self._unshare is not None and self._unshare.poll() is not None:
                raise SystemdNamespaceError(
                    f"systemd exited while booting ({self._unshare.returncode}); "
                    f"console log: {self._tail_log()}"
                )
            # The exec into systemd happens after the mounts: until then nsenter would see the
            # boot shell's view, and systemctl cannot connect anyway.
            try:
                state = self.run(["systemctl", "is-system-running"], timeout=15.0).stdout.strip()
            except subprocess.TimeoutExpired:
                state = "(systemctl did not answer)"
            if state in ("running", "degraded"):
                return
            time.sleep(0.2)
        raise SystemdNamespaceError(
            f"systemd not running after {self.boot_timeout:.0f} s (last state {state!r}); "
            f"console log: {self._tail_log()}"
        )

    def _tail_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except (OSError, SystemdNamespaceError):
            return "(no log)"

    def shutdown(self, timeout: float = 30.0) -> None:
        """Power off, wait, SIGKILL if needed; then drop the private cgroups and the temp folder.

        The tmpfs and overlay live only in the namespace's mount table, so they are gone with its
        last process: nothing is left mounted on the host."""
        proc, self._unshare = self._unshare, None
        if proc is not None:
            if self._pid is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._pid, signal.SIGRTMIN + 4)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                for pid in (self._pid, proc.pid):
                    if pid is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                proc.wait(timeout=30.0)
        self._pid = None
        self._remove_cgroups()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _remove_cgroups(self) -> None:
        for hierarchy in CGROUP_HIERARCHIES:
            top = Path(hierarchy) / self.cgroup_name
            if not top.is_dir():
                continue
            # Children before parents; a cgroup dir is removed with rmdir, never rm -r.
            dirs = sorted((Path(d) for d, _, _ in os.walk(top)), key=lambda p: -len(p.parts))
            for d in dirs:
                with contextlib.suppress(OSError):
                    d.rmdir()

    @property
    def alive(self) -> bool:
        return self._unshare is not None and self._unshare.poll() is None

    # -- driving it -------------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        timeout: float = 60.0,
        check: bool = False,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside the namespace and wait for it (stdout/stderr captured as text)."""
        prefix = [*self.nsenter, f"--wd={cwd}"] if cwd else list(self.nsenter)
        # Own process group, killed whole on timeout (see kill_group): nsenter forks the command
        # into the pid namespace, and killing nsenter alone would leave it running in there.
        proc = subprocess.Popen(
            [*prefix, *argv],
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            raise
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check:
            done.check_returncode()
        return done

    def spawn(self, argv: Sequence[str], *, cwd: str | None = None) -> subprocess.Popen[bytes]:
        """Start argv inside the namespace without waiting, outside any unit's cgroup.

        The Popen is nsenter's, which waits for argv; stop both with `kill_spawned`."""
        prefix = [*self.nsenter, f"--wd={cwd}"] if cwd else list(self.nsenter)
        return subprocess.Popen(
            [*prefix, *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    @staticmethod
    def kill_spawned(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            kill_group(proc)

    def systemctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", *args], timeout=timeout)

    def journalctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.run(["journalctl", "--no-pager", *args], timeout=timeout)

    def python(self, code: str, *, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run Python code inside, with the project's interpreter, from the repository root."""
        repo = str(Path(__file__).resolve().parents[2])
        return self.run([self.interpreter, "-c", code], timeout=timeout, cwd=repo)

    def write_file(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write a file inside the namespace (into the overlay, never the host)."""
        if not path.startswith("/"):
            raise ValueError(f"write_file needs an absolute path, got {path!r}")
        script = 'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"'
        self.run(["sh", "-c", script, "sh", path, f"{mode:o}"], input=text, check=True)

    def install_unit(self, name: str, text: str) -> None:
        """Write /etc/systemd/system/<name> and daemon-reload."""
        self.write_file(f"/etc/systemd/system/{name}", text)
        self.daemon_reload()

    def daemon_reload(self) -> None:
        proc = self.systemctl("daemon-reload")
        if proc.returncode != 0:
            raise SystemdNamespaceError(f"daemon-reload failed: {proc.stderr.strip()}")

    def reset_unit(self, name: str, *, remove: bool = False) -> None:
        """Stop the unit, forget its failed state and counters; remove=True deletes its file too."""
        self.systemctl("stop", name)
        self.systemctl("reset-failed", name)
        if remove:
            self.run(["rm", "-f", f"/etc/systemd/system/{name}"])
            self.daemon_reload()

    def show(self, name: str, *props: str) -> dict[str, str]:
        """`systemctl show` as a dict (for test assertions; the product parses it itself)."""
        args = ["show", name]
        for prop in props:
            args += ["-p", prop]
        out = self.systemctl(*args).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_for(
        self,
        predicate: Callable[[], bool],
        *,
        timeout: float = 60.0,
        what: str | Callable[[], str] = "condition",
    ) -> None:
        """Poll predicate until true; raise with `what` after timeout (generous: 2 busy cores).
        `what` may be a callable, to describe the last state seen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        described = what() if callable(what) else what
        raise TimeoutError(f"{described} not reached within {timeout:.0f} s")

    def wait_for_state(
        self, name: str, states: Sequence[str], *, timeout: float = 60.0
    ) -> dict[str, str]:
        """Wait until the unit's ActiveState is one of states; return its last `show`."""
        last: dict[str, str] = {}

        def reached() -> bool:
            nonlocal last
            last = self.show(name, "ActiveState", "SubState", "Result", "NRestarts", "MainPID")
            return last.get("ActiveState") in states

        self.wait_for(
            reached, timeout=timeout, what=lambda: f"{name} in {list(states)} (last {last})"
        )
        return last
