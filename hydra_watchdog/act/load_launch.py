"""Starting, watching and stopping the load helper (hydra_watchdog/load_helper.py).

Where the helper runs decides whether it outlives the watchdog:

* under systemd (the watchdog is a service: $INVOCATION_ID, /run/systemd/system), a stop or
  restart of hydra-watchdog.service kills every process in its cgroup, so the helper runs in a
  transient unit of its own (`systemd-run --unit=hydra-watchdog-load-<hash> --collect`); the key
  reaches it as the credential `admin_key` (LoadCredential= of the key file, or of our own
  credential: systemd reads the file, so neither argv nor the environment holds the key);
* elsewhere, a detached process (its own session, so a terminal's SIGHUP or a SIGINT to our
  process group does not reach it) that reads the key from an inherited pipe.

Whether it is still running is asked of systemd (the unit's ActiveState) or of /proc (the pid
with the start ticks recorded at launch, so a reused pid never passes for it). When the answer
is unknown (systemctl failed), the load counts as running: a second load is never started on a
guess. Nothing a record names is stopped on the record's word (issue 22 item 4): a unit only
when it is the one launch() names for the record's model (hydra-watchdog-load-<hash>.service;
system units are root's to create), a process only when it is alive with the recorded start
ticks, our uid and the helper's command line for this load id and state dir. A record naming
anything else is moved aside with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from hydra_watchdog.actions import LoadModel
from hydra_watchdog.adapters.admin_key import load_credential_source, locate, read_key_file
from hydra_watchdog.adapters.identity import ProcIdentity, live_start_ticks, read_identity
from hydra_watchdog.adapters.systemd import first_line
from hydra_watchdog.config import Config
from hydra_watchdog.load_record import (
    LoadLaunch,
    LoadReport,
    clear,
    quarantine,
    read_launch,
    read_report,
    report_written_at,
    write_launch,
)
from hydra_watchdog.printable import cut, one_line
from hydra_watchdog.statefile import read_boot_id
from hydra_watchdog.trusted_path import state_dir as private_dir

HELPER_MODULE = "hydra_watchdog.load_helper"
UNIT_PREFIX = "hydra-watchdog-load-"
HELPER_LOG = "load-helper.log"
_RUNNING = frozenset({"active", "activating", "deactivating", "reloading"})
_POLL = 0.1
_COMMAND_TIMEOUT = 30.0
# The helper's own stop: it closes the stream at once on SIGTERM; this is systemd's backstop.
_HELPER_STOP_TIMEOUT = "30s"


def under_systemd(environ: Mapping[str, str] = os.environ) -> bool:
    """True when we run as a systemd service: our cgroup dies with our unit."""
    return (
        bool(environ.get("INVOCATION_ID"))
        and os.path.isdir("/run/systemd/system")
        and shutil.which("systemd-run") is not None
    )


def unit_name(model: str) -> str:
    return f"{UNIT_PREFIX}{hashlib.sha256(model.encode()).hexdigest()[:12]}.service"


def runs_helper(cmdline: Sequence[str], load_id: str, state_dir: Path) -> bool:
    """`cmdline` is the helper's for this load: `-m hydra_watchdog.load_helper` followed by the
    options launch() passed, `--load-id` and `--state-dir` among them. The interpreter before
    `-m` is not compared: a successor watchdog may run another one."""
    args = list(cmdline)
    for i in range(len(args) - 1):
        if args[i] == "-m" and args[i + 1] == HELPER_MODULE:
            options = args[i + 2 :]
            pairs = dict(zip(options[::2], options[1::2], strict=False))
            return pairs.get("--load-id") == load_id and pairs.get("--state-dir") == str(state_dir)
    return False


class LoadHelpers:
    """Launch, watch and stop the helper; the records live in `state_dir` (load_record.py)."""

    def __init__(
        self,
        config_path: Path,
        state_dir: Path,
        admin_key_file: str,
        *,
        systemd: bool,
        python: str = sys.executable,
        environ: Mapping[str, str] = os.environ,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config_path = config_path.resolve()
        self.state_dir = state_dir
        self.admin_key_file = admin_key_file
        self.systemd = systemd
        self.python = python
        self.environ = environ
        self._wall = wall
        self._child: subprocess.Popen[bytes] | None = None  # reaped by alive()

    @classmethod
    def from_config(cls, config_path: Path, cfg: Config) -> LoadHelpers:
        return cls(
            config_path,
            Path(cfg.watchdog.state_dir),
            cfg.tabbyapi.admin_key_file,
            systemd=under_systemd(),
        )

    # --- launch -------------------------------------------------------------------------------

    def launch(self, action: LoadModel, now: float) -> LoadLaunch | str:
        """The helper started (its record written), or why not."""
        launch = LoadLaunch(
            load_id=uuid.uuid4().hex,
            model=action.model,
            vram_needed_bytes=action.vram_needed_bytes,
            rule=action.reason.rule.value,
            evidence=action.reason.evidence,
            boot_id=read_boot_id(),
            started_mono=now,
            started_wall=self._wall(),
        )
        argv = [
            self.python,
            "-m",
            HELPER_MODULE,
            "--config",
            str(self.config_path),
            "--model",
            action.model,
            "--load-id",
            launch.load_id,
            "--state-dir",
            str(self.state_dir),
        ]
        try:
            return self._in_unit(launch, argv) if self.systemd else self._detached(launch, argv)
        except OSError as exc:
            clear(self.state_dir)
            return f"cannot start the load helper: {exc}"

    def _in_unit(self, launch: LoadLaunch, argv: Sequence[str]) -> LoadLaunch | str:
        unit = unit_name(launch.model)
        launch = replace(launch, unit=unit)
        # First the record: a watchdog killed right after systemd-run still finds the unit.
        write_launch(self.state_dir, launch)
        props = ["-p", f"TimeoutStopSec={_HELPER_STOP_TIMEOUT}"]
        # A transient unit starts with systemd's environment, not ours: the interpreter must
        # find the very modules this watchdog runs (a Nix wrapper sets them up in our env only).
        path = os.pathsep.join(p for p in sys.path if p)
        if path:
            props.append(f"--setenv=PYTHONPATH={path}")
        source = self._key_source()
        if source:
            props += ["-p", f"LoadCredential=admin_key:{source}"]
            argv = [*argv, "--key-credential"]  # a credential that does not arrive is an error
        run = [
            "systemd-run",
            "--quiet",
            "--collect",
            f"--unit={unit}",
            f"--description=hydra-watchdog: load {launch.model}",
            "--service-type=exec",
            *props,
            "--",
            *argv,
        ]
        try:
            done = subprocess.run(
                run,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=_COMMAND_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return launch  # it may well have started: the unit's state says so from now on
        if done.returncode != 0:
            clear(self.state_dir)
            why = cut(first_line(done.stderr), 200) or f"exit status {done.returncode}"
            return f"systemd-run could not start the load helper {unit}: {why}"
        return launch

    def _key_source(self) -> str:
        """The file the key is read from now, as the client reads it (adapters/admin_key.py):
        the key file, our credential's source, or our credential."""
        return locate(self.admin_key_file, self.environ, lookup=load_credential_source).path

    def _detached(self, launch: LoadLaunch, argv: Sequence[str]) -> LoadLaunch | str:
        source = self._key_source()
        key = read_key_file(source)[0] if source else None
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            # A key is far below the pipe's capacity: written whole before the helper runs.
            os.write(write_end, (key or "").encode())
            os.close(write_end)
            write_end = -1
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
            with private_dir(self.state_dir) as dir_fd:
                log_fd = os.open(HELPER_LOG, flags, 0o600, dir_fd=dir_fd)
            try:
                proc = subprocess.Popen(
                    [*argv, "--key-fd", str(read_end)],
                    pass_fds=(read_end,),
                    start_new_session=True,
                    stdin=subprocess.DEVNULL,
                    stdout=log_fd,
                    stderr=log_fd,
                )
            finally:
                os.close(log_fd)
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)
        ticks = live_start_ticks(proc.pid)
        launch = replace(launch, pid=proc.pid, start_ticks=ticks or 0)
        self._child = proc
        try:
            write_launch(self.state_dir, launch)
        except OSError as exc:  # unrecorded, it could outlive us unseen: stop it now
            self._signal(launch, signal.SIGTERM)
            return f"cannot record the load helper (stopped it): {exc}"
        return launch

    # --- watch --------------------------------------------------------------------------------

    def current(self) -> LoadLaunch | None:
        """The load handed to a helper and not yet reported; one of another boot is dropped, and
        one that names what is not our helper is moved aside, never acted on."""
        launch = read_launch(self.state_dir)
        if launch is not None and launch.boot_id != read_boot_id():
            clear(self.state_dir)  # its helper died with that boot; its clock means nothing
            return None
        foreign = self._foreign(launch) if launch is not None else ""
        if foreign:
            quarantine(self.state_dir, foreign)
            return None
        return launch

    def _foreign(self, launch: LoadLaunch) -> str:
        """Why the record names something that is not this watchdog's helper; "" when it names
        ours, or a process that has ended (its outcome is then collected as usual)."""
        if launch.unit:
            if launch.unit != unit_name(launch.model):
                return f"its unit {cut(launch.unit, 80)!r} is not {unit_name(launch.model)}"
            return ""
        ident = read_identity(launch.pid) if launch.pid > 0 else None
        if ident is None or ident.start_ticks != launch.start_ticks:
            return ""  # gone (or its pid reused): the helper ended
        return self._not_helper(ident, launch)

    def _not_helper(self, ident: ProcIdentity, launch: LoadLaunch) -> str:
        """Why the live process `ident` is not the helper `launch` started; "" when it is."""
        if (ident.uid, ident.euid) != (os.getuid(), os.geteuid()):
            return f"pid {ident.pid} runs as uid {ident.euid}, not as this watchdog"
        if not runs_helper(ident.cmdline, launch.load_id, self.state_dir):
            return f"pid {ident.pid} is not its load helper ({one_line(ident.command, 80)})"
        return ""

    def _is_helper(self, launch: LoadLaunch) -> bool:
        """The record's process is alive and provably the helper it started: the same start
        ticks (never a reused pid), our uid, the helper's command line for this load id and
        state dir. Not its parent: a successor watchdog adopts its predecessor's helper."""
        ident = read_identity(launch.pid) if launch.pid > 0 and launch.start_ticks > 0 else None
        return (
            ident is not None
            and ident.start_ticks == launch.start_ticks
            and not self._not_helper(ident, launch)
        )

    def alive(self, launch: LoadLaunch) -> bool:
        if launch.unit:
            if launch.unit != unit_name(launch.model):
                return False  # never asked about, never stopped (current() moves it aside)
            state = self._unit_state(launch.unit)
            return state is None or state in _RUNNING
        child = self._child
        if child is not None and child.pid == launch.pid:
            # Our own child ended only once reaped: an exiting one reads as gone in /proc (its
            # command line empties before it is a zombie) while it still runs its exit.
            return child.poll() is None
        return self._is_helper(launch)

    def report(self, launch: LoadLaunch) -> LoadReport | None:
        return read_report(self.state_dir, launch.load_id)

    def duration(self, launch: LoadLaunch, report: LoadReport | None) -> float:
        """How long the ended load ran: from its launch to the helper's outcome, or to now when
        it left none (killed: it ended some time before)."""
        ended = report_written_at(self.state_dir) if report and report.finished else None
        return max(0.0, (ended if ended is not None else self._wall()) - launch.started_wall)

    def _unit_state(self, unit: str) -> str | None:
        """The unit's ActiveState; None when systemd could not be asked."""
        try:
            done = subprocess.run(
                ["systemctl", "show", "-p", "ActiveState", "--value", unit],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=_COMMAND_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    # --- stop ---------------------------------------------------------------------------------

    def stop(self, launch: LoadLaunch, wait: float) -> bool:
        """A deliberate cancel: SIGTERM to the helper (it closes the stream and writes the
        outcome); True when it ended within `wait` s."""
        if launch.unit == unit_name(launch.model):  # only ever one of our own helper units
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(
                    ["systemctl", "stop", "--no-block", launch.unit],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=_COMMAND_TIMEOUT,
                    check=False,
                )
        elif not launch.unit:
            self._signal(launch, signal.SIGTERM)
        deadline = time.monotonic() + wait
        while self.alive(launch):
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL)
        return True

    def _signal(self, launch: LoadLaunch, signum: int) -> None:
        """Through a pidfd, once the process it holds proved to be our helper (_is_helper): a
        reused pid, or a process a record merely names, is never hit."""
        try:
            pidfd = os.pidfd_open(launch.pid)
        except OSError:
            return
        try:
            if self._is_helper(launch):
                signal.pidfd_send_signal(pidfd, signum)
        except OSError:
            pass
        finally:
            os.close(pidfd)

    def forget(self) -> None:
        clear(self.state_dir)
