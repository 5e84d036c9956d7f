"""The TabbyAPI unit as systemd sees it: its state over D-Bus (unit_bus.py) read every cycle
(in full when PID 1's signals or its state say something moved), with `systemctl show` as the
fallback; commands and the journal through `systemctl` and
`journalctl`.

The per-cycle read goes over PID 1's private socket because a `systemctl show` subprocess costs
~6 ms of CPU, more than the rest of a healthy cycle. The commands stay subprocesses: they are rare,
and `systemctl` is what an operator would run. When the bus fails (an incident is when it may),
the read falls back to `systemctl show` at once and the bus is tried again BUS_RETRY later, so a
hung bus costs one deadline, not one per cycle. Nothing here raises for an outside failure: no
systemd, a missing systemctl, a hung call or an unknown unit all become typed outcomes with a
reason.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence

import psutil

from hydra_watchdog.actions import UnitVerb
from hydra_watchdog.adapters.loader_env import EnvLookup, parse_env_files_property, unit_env
from hydra_watchdog.adapters.unit_bus import PRIVATE_SOCKET, UnitBus
from hydra_watchdog.interfaces import CommandOutcome
from hydra_watchdog.journal_lines import latest
from hydra_watchdog.observation import UnitStatus
from hydra_watchdog.printable import cut

PROPERTIES = (
    "LoadState",
    "ActiveState",
    "SubState",
    "Result",
    "NRestarts",
    "MainPID",
    "ControlGroup",
    "User",
    "InvocationID",
    "ExecMainStatus",
    "ActiveEnterTimestampMonotonic",
    "Job",
    "ExecStart",
    "WorkingDirectory",
)

BUS_RETRY = 30.0  # seconds on `systemctl show` after the bus failed, before trying it again
BUS_TIMEOUT = 2.0  # seconds for one read over the bus; then `systemctl show` (self.timeout)

# What systemctl prints when there is no service manager to talk to (PID 1 is not systemd, or
# its bus socket is gone): such a failure means "refused", not "the command failed".
_NO_SYSTEMD_MARKERS = (
    "not been booted with systemd",
    "Failed to connect to bus",
    "Failed to connect to system scope bus",
)


def parse_show(name: str, text: str, *, read_via: str = "systemctl") -> UnitStatus:
    """`systemctl show -p ...` output → UnitStatus. Lines are parsed by property name (systemd
    does not promise an order); a property that is absent or unparsable stays None/""."""
    props: dict[str, str] = {}
    commands = 0
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            props[key.strip()] = value.strip()
            commands += key.strip() == "ExecStart"
    if commands > 1:  # a oneshot's several commands: no one program (as over D-Bus)
        props["ExecStart"] = ""
    return status_from_props(name, props, read_via=read_via)


# systemctl's form of one command: "{ path=P ; argv[]=A0 A1 ... ; ignore_errors=no ; ... }". The
# argv is joined with spaces, unquoted: an argument holding a space is read as two (and can then
# only fail to name TabbyAPI's program).
_EXEC_COMMAND = re.compile(r"\{ path=(?P<path>.*?) ; argv\[\]=(?P<argv>.*?) ; ignore_errors=")


def parse_exec(value: str) -> tuple[str, tuple[str, ...]]:
    """ExecStart= as `systemctl show` prints it → (path, argv); ("", ()) when it is not one
    command in that form."""
    found = _EXEC_COMMAND.match(value)
    if found is None:
        return "", ()
    return found["path"], tuple(found["argv"].split(" "))


def status_from_props(name: str, props: Mapping[str, str], *, read_via: str) -> UnitStatus:
    """Properties as `systemctl show` prints them (from systemctl or from D-Bus) → UnitStatus."""
    load_state = props.get("LoadState", "")
    detail = ""
    if load_state == "not-found":
        detail = f"unit {name} not found (no unit file loaded)"
    elif not load_state:
        detail = "systemctl show returned no LoadState"
    main_pid = _int(props, "MainPID")
    enter_us = _int(props, "ActiveEnterTimestampMonotonic")
    exec_path, exec_argv = parse_exec(props.get("ExecStart", ""))
    return UnitStatus(
        name=name,
        available=True,
        load_state=load_state,
        active_state=props.get("ActiveState", ""),
        sub_state=props.get("SubState", ""),
        result=props.get("Result", ""),
        n_restarts=_int(props, "NRestarts"),
        main_pid=main_pid if main_pid else None,  # 0: no main process
        control_group=props.get("ControlGroup", ""),
        user=props.get("User", ""),
        invocation_id=props.get("InvocationID", ""),
        exec_main_status=_int(props, "ExecMainStatus"),
        # Microseconds on CLOCK_MONOTONIC, the clock of time.monotonic(); 0: never active.
        active_enter_mono=enter_us / 1e6 if enter_us else None,
        job_id=_int(props, "Job") or None,  # empty: no job queued or running
        exec_path=exec_path,
        exec_argv=exec_argv,
        working_directory=props.get("WorkingDirectory", ""),
        detail=detail,
        read_via=read_via,
    )


def _int(props: Mapping[str, str], key: str) -> int | None:
    try:
        return int(props[key])
    except (KeyError, ValueError):
        return None


class SystemctlUnit:
    """UnitManager for one unit.

    `argv_prefix` and `root` point the adapter at another machine's systemd, e.g. a container
    entered with ("nsenter", "-t", PID, "-a") and root "/proc/PID/root"; by default it is this
    host's. `timeout` bounds reads, `command_timeout` bounds start/stop/restart/reset-failed.
    `bus=False` reads the unit's state with `systemctl show` only; a UnitBus replaces the default
    one (PID 1's private socket under `root`).
    """

    def __init__(
        self,
        unit: str,
        *,
        timeout: float = 10.0,
        command_timeout: float = 60.0,
        argv_prefix: Sequence[str] = (),
        root: str = "/",
        bus: UnitBus | bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.unit = unit
        self.timeout = timeout
        self.command_timeout = command_timeout
        self._prefix = tuple(argv_prefix)
        self._root = root
        if bus is True:
            bus = UnitBus(
                unit, path=os.path.join(root, PRIVATE_SOCKET.lstrip("/")), timeout=BUS_TIMEOUT
            )
        self._bus = bus or None
        self._clock = clock
        self._bus_failed = ""  # why the last read over the bus failed ("" : it did not)
        self._bus_retry_at = 0.0

    def _no_systemd(self) -> str | None:
        """Why there is no systemd to ask, or None. /run/systemd/system exists exactly when
        systemd is the init system (what sd_booted() checks)."""
        if not os.path.isdir(os.path.join(self._root, "run/systemd/system")):
            return "systemd is not the init system here (no /run/systemd/system)"
        return None

    def _run(self, argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str] | str:
        """Run a command; a string says why it could not run to completion.

        Its own process group, killed whole on timeout: behind a prefix such as nsenter the
        command is a grandchild, which killing the child alone would leave running."""
        full = [*self._prefix, *argv]
        try:
            proc = subprocess.Popen(
                full,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",
                start_new_session=True,
            )
        except FileNotFoundError:
            return f"{full[0]} not found"
        except OSError as exc:
            return f"cannot run {full[0]}: {exc}"
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            return f"`{cut(' '.join(argv), 60)}` did not return within {timeout:g} s"
        return subprocess.CompletedProcess(full, proc.returncode, out, err)

    def close(self) -> None:
        """The bus connection; commands hold nothing between calls."""
        if self._bus is not None:
            self._bus.close()

    def status(self) -> UnitStatus:
        reason = self._no_systemd()
        if reason is not None:
            return UnitStatus(name=self.unit, available=False, detail=reason)
        if self._bus is not None and self._clock() >= self._bus_retry_at:
            props = self._bus.read(PROPERTIES)
            if not isinstance(props, str):
                self._bus_failed = ""
                return status_from_props(self.unit, props, read_via="D-Bus")
            self._bus_failed = props
            self._bus_retry_at = self._clock() + BUS_RETRY
        return self._show()

    def _show(self) -> UnitStatus:
        """The unit's state from `systemctl show`."""
        via = f"systemctl ({self._bus_failed})" if self._bus_failed else "systemctl"
        argv = ["systemctl", "show", self.unit]
        for prop in PROPERTIES:
            argv += ["-p", prop]
        proc = self._run(argv, self.timeout)
        if isinstance(proc, str):
            return UnitStatus(name=self.unit, available=False, detail=proc, read_via=via)
        if proc.returncode != 0:
            # `show` exits 0 even for an unknown unit: a failure here means systemd could not
            # be asked (bus down, bad unit name).
            return UnitStatus(
                name=self.unit,
                available=False,
                detail=f"systemctl show failed ({proc.returncode}): {first_line(proc.stderr)}",
                read_via=via,
            )
        return parse_show(self.unit, proc.stdout, read_via=via)

    def show_text(self, *properties: str) -> tuple[str, str]:
        """`systemctl show -p ...` of the unit as printed: (output, "") or ("", why not)."""
        reason = self._no_systemd()
        if reason is not None:
            return "", reason
        argv = ["systemctl", "show", self.unit]
        for prop in properties:
            argv += ["-p", prop]
        proc = self._run(argv, self.timeout)
        if isinstance(proc, str):
            return "", proc
        if proc.returncode != 0:
            return "", f"systemctl show failed ({proc.returncode}): {first_line(proc.stderr)}"
        return proc.stdout, ""

    def loader_environment(self, unit: UnitStatus) -> EnvLookup:
        """The unit's Environment= and EnvironmentFile= (what a start would get), for the
        library check. Read only when asked: the values are filtered to the loader's variables
        at once (loader_env.LOADER_VARS), the rest may hold secrets."""
        argv = ["systemctl", "show", self.unit, "-p", "Environment", "-p", "EnvironmentFiles"]
        proc = self._run(argv, self.timeout)
        if isinstance(proc, str):
            return EnvLookup(None, proc)
        if proc.returncode != 0:
            return EnvLookup(
                None, f"systemctl show failed ({proc.returncode}): {first_line(proc.stderr)}"
            )
        environment, files = "", []
        for line in proc.stdout.splitlines():
            key, _, value = line.partition("=")
            if key == "Environment":
                environment = value
            elif key == "EnvironmentFiles":
                files.append(value)
        return unit_env(unit.name, environment, parse_env_files_property(files), root=self._root)

    def command(self, verb: UnitVerb) -> CommandOutcome:
        reason = self._no_systemd()
        if reason is not None:
            return CommandOutcome(ok=False, refused=True, detail=f"{verb} refused: {reason}")
        # start/restart do not wait for the start job: TabbyAPI loads its startup model before it
        # is up, which can take minutes (and with Type=simple systemctl returns at once anyway).
        # The policy watches the outcome through status() in later cycles. stop and reset-failed
        # wait, bounded by command_timeout, so a following start sees the unit really stopped.
        no_block = ["--no-block"] if verb in (UnitVerb.START, UnitVerb.RESTART) else []
        proc = self._run(["systemctl", *no_block, str(verb), self.unit], self.command_timeout)
        if isinstance(proc, str):
            return CommandOutcome(ok=False, detail=f"systemctl {verb} {self.unit}: {proc}")
        if proc.returncode == 0:
            return CommandOutcome(ok=True, detail=f"systemctl {verb} {self.unit}: ok")
        err = first_line(proc.stderr) or f"exit code {proc.returncode}"
        if verb is UnitVerb.RESET_FAILED and "not loaded" in err:
            # systemd unloads an inactive unit it no longer needs: nothing is failed to reset.
            return CommandOutcome(
                ok=True, detail=f"systemctl {verb} {self.unit}: not loaded, no failed state"
            )
        refused = any(marker in proc.stderr for marker in _NO_SYSTEMD_MARKERS)
        return CommandOutcome(
            ok=False, refused=refused, detail=f"systemctl {verb} {self.unit}: {err}"
        )

    def journal(self, lines: int) -> tuple[str, ...]:
        """The unit's last `lines` journal lines, oldest first. When the journal cannot be read,
        one line saying why (an excerpt is for humans; an empty one would hide the reason)."""
        if lines <= 0:
            return ()
        # Not `-u`: it also matches records that name the unit in OBJECT_SYSTEMD_UNIT, which
        # are the watchdog's own (journal.py), so each excerpt would quote the last one. The
        # unit's own output, and systemd (PID 1) about the unit (exit codes, kills), each in
        # its own window: PID 1's notes on the unit's files can flood its window, never
        # TabbyAPI's (journal_lines.latest).
        end = self._clock() + self.timeout
        own = self._journal_read(lines, [f"_SYSTEMD_UNIT={self.unit}"], end)
        if isinstance(own, str):
            return (own,)
        pid1 = self._journal_read(lines, ["_PID=1", f"UNIT={self.unit}"], end)
        if isinstance(pid1, str):
            return (pid1,)
        return latest(own, pid1, lines)

    def _journal_read(
        self, lines: int, matches: Sequence[str], end: float
    ) -> tuple[str, ...] | str:
        """The last `lines` entries that `matches` select, or a line saying why not. UTC and
        microseconds, so that two reads' timestamps compare as text."""
        argv = ["journalctl", "--no-pager", "-q", "--utc", "-o", "short-iso-precise"]
        left = max(end - self._clock(), 0.1)  # one budget for both reads of an excerpt
        proc = self._run([*argv, "-n", str(lines), *matches], left)
        if isinstance(proc, str):
            return f"[journal unavailable: {proc}]"
        if proc.returncode != 0:
            return f"[journal unavailable: {first_line(proc.stderr) or proc.returncode}]"
        return tuple(proc.stdout.splitlines())


def kill_group(proc: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    """SIGKILL what `proc` started (psutil's children, descendants all), then reap `proc`; its
    process group too if it does not exit.

    Behind nsenter the command is the leader's child in another pid namespace; killed together,
    it would lose its parent first and linger as a zombie parented outside that namespace
    (holding up its shutdown). Killed first, it is reaped by the leader, which then exits."""
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):  # gone already, or a reused PID: not ours
                child.kill()
    try:
        proc.communicate(timeout=2.0)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def first_line(text: str) -> str:
    """The first line of a command's output that is not blank, stripped ("" when none)."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")
