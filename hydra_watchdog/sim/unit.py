"""A stand-in for systemd that the demo owns: one "unit" running one real process.

It implements `interfaces.UnitManager` with the systemd semantics the policy relies on: states
active/running, activating/auto-restart, failed/failed and inactive/dead; `Restart=on-failure`
after `restart_sec`; `NRestarts` counting only automatic restarts and zeroed by a manual start;
`Result=exit-code` with `ExecMainStatus`; `ActiveEnterTimestampMonotonic` on CLOCK_MONOTONIC.
It needs no root and no systemd, so `hydra-watchdog demo` runs anywhere.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from hydra_watchdog.actions import UnitVerb
from hydra_watchdog.interfaces import CommandOutcome
from hydra_watchdog.observation import UnitStatus

STOP_TIMEOUT = 5.0


class SimUnit:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        restart_sec: float = 0.5,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        # ExecStart= as systemd reports it: the executable's path, found as Popen finds it
        self._exec_path = (shutil.which(self.argv[0]) or self.argv[0]) if self.argv else ""
        self._cwd = os.getcwd()  # the processes start where the demo runs
        self.log_path = log_path
        self.restart_sec = restart_sec
        self.env = env
        self._lock = threading.RLock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._active, self._sub = "inactive", "dead"
        self._result, self._status = "success", 0
        self._n_restarts = 0
        self.auto_restarts = 0  # every Restart= restart since the stand-in began (never zeroed)
        self._entered: float | None = None
        self._invocation = ""
        self._stopping = False
        self._restart_timer: threading.Timer | None = None
        self._closed = False

    # --- UnitManager ----------------------------------------------------------------------------

    def status(self) -> UnitStatus:
        with self._lock:
            proc = self._proc
            return UnitStatus(
                name=self.name,
                available=True,
                load_state="loaded",
                active_state=self._active,
                sub_state=self._sub,
                result=self._result,
                n_restarts=self._n_restarts,
                main_pid=proc.pid if proc is not None and self._active == "active" else None,
                control_group="",
                user=str(os.getuid()),  # it runs its process as whoever runs the demo
                invocation_id=self._invocation,
                exec_main_status=self._status,
                active_enter_mono=self._entered,
                exec_path=self._exec_path,
                exec_argv=tuple(self.argv),
                working_directory=self._cwd,
            )

    def command(self, verb: UnitVerb) -> CommandOutcome:
        with self._lock:
            if self._closed:
                return CommandOutcome(False, "the demo unit is shut down", refused=True)
            if verb is UnitVerb.START:
                if self._active == "active":
                    return CommandOutcome(True, "already active")
                self._cancel_restart()
                self._n_restarts = 0  # like systemd: a manual start flushes the counter
                self._spawn()
                return CommandOutcome(True, f"started pid {self._pid()}")
            if verb is UnitVerb.STOP:
                self._cancel_restart()
                self._terminate()
                self._active, self._sub = "inactive", "dead"
                return CommandOutcome(True, "stopped")
            if verb is UnitVerb.RESTART:
                self._cancel_restart()
                self._terminate()
                self._n_restarts = 0
                self._spawn()
                return CommandOutcome(True, f"restarted, pid {self._pid()}")
            if verb is UnitVerb.RESET_FAILED:
                if self._active == "failed":
                    self._active, self._sub, self._result = "inactive", "dead", "success"
                self._n_restarts = 0
                return CommandOutcome(True, "reset")
        return CommandOutcome(False, f"unknown verb {verb}")  # pragma: no cover

    def journal(self, lines: int) -> tuple[str, ...]:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ()
        return tuple(deque(text.splitlines(), maxlen=lines))

    # --- process handling -----------------------------------------------------------------------

    def _pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _spawn(self) -> None:
        log = self.log_path.open("ab")
        try:
            proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        finally:
            log.close()
        self._proc = proc
        self._active, self._sub = "active", "running"
        self._result, self._status = "success", 0
        self._entered = time.monotonic()
        self._invocation = uuid.uuid4().hex
        threading.Thread(target=self._reap, args=(proc,), daemon=True, name="simunit-reap").start()

    def _reap(self, proc: subprocess.Popen[bytes]) -> None:
        code = proc.wait()
        with self._lock:
            if proc is not self._proc or self._stopping:
                return
            self._proc = None
            if code == 0:
                self._active, self._sub, self._result, self._status = (
                    "inactive",
                    "dead",
                    "success",
                    0,
                )
                return
            self._result, self._status = ("exit-code", code) if code > 0 else ("signal", -code)
            if self._closed:
                self._active, self._sub = "failed", "failed"
                return
            self._active, self._sub = "activating", "auto-restart"
            self._restart_timer = threading.Timer(self.restart_sec, self._auto_restart)
            self._restart_timer.daemon = True
            self._restart_timer.start()

    def _auto_restart(self) -> None:
        with self._lock:
            if self._closed or self._sub != "auto-restart":
                return
            self._n_restarts += 1
            self.auto_restarts += 1
            self._spawn()

    def _cancel_restart(self) -> None:
        if self._restart_timer is not None:
            self._restart_timer.cancel()
            self._restart_timer = None

    def _terminate(self) -> None:
        proc = self._proc
        if proc is None:
            return
        self._stopping = True
        try:
            # the whole process group, like systemd's KillMode=control-group
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        except ProcessLookupError:
            pass
        finally:
            self._stopping = False
            self._proc = None

    def close(self) -> None:
        """The adapter's close (interfaces.UnitManager): the watchdog lets go of its unit
        manager, which, like systemd, keeps the unit running. stop_all() ends the stand-in."""

    def stop_all(self) -> None:
        """The end of the stand-in init system: its unit is stopped, no restart follows."""
        with self._lock:
            self._closed = True
            self._cancel_restart()
            self._terminate()
            self._active, self._sub = "inactive", "dead"
