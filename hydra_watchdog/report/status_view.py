"""How `hydra-watchdog status` judges and prints a status report: the verdict (evaluate), the
daemon's liveness (daemon_problem) and the text (render_human, summarize).

Split from report/status.py, which holds the report's dataclasses and builds it, so that the
`status` command's quick path (report/status_quick.py) can use the very same code on the report
it reads without importing dataclasses, typing or the config schema: monitoring runs `status`
every few seconds, and each of those costs it milliseconds of start-up. The functions take any
object shaped like a StatusReport (the dataclass, or status_quick's read-only view of one, whose
phase is a plain string and verdict a plain int). Verdicts are the Nagios exit codes as ints:
states.Verdict is an IntEnum, and importing enum alone costs `status` several milliseconds.
"""

from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False  # not typing's: importing typing alone costs `status` milliseconds
if TYPE_CHECKING:
    from hydra_watchdog.report.status import StatusReport

    StrPath = str | os.PathLike[str]

GIB = 1024**3
FUTURE_SKEW = 10.0  # seconds a heartbeat may lie ahead of `now` (clock steps) before it is a lie
PROC = "/proc"
# states.Verdict's names by value (a test keeps them equal): the Nagios plugin exit codes.
VERDICT_NAMES = ("OK", "WARNING", "CRITICAL", "UNKNOWN")
UNKNOWN = 3


def summarize(report: StatusReport, *, now: float | None = None) -> str:
    """One line: the sd_notify STATUS and the first line of `status`."""
    now = report.generated_at if now is None else now
    parts = [str(report.phase)]  # Phase is a StrEnum: its str is its value
    if report.paused.paused:
        parts.append(f"paused: {report.paused.reason}" if report.paused.reason else "paused")
    if report.health is not None:
        h = report.health
        if h.outcome == "ok":
            parts.append(f"health {h.status} in {h.latency_s * 1000:.0f} ms")
        else:
            parts.append(f"health {h.outcome}" + (f" ({h.status})" if h.status else ""))
    if report.load is not None:
        progress = f" {report.load.module}/{report.load.modules}" if report.load.modules else ""
        parts.append(f"loading {report.load.model}{progress}")
    elif report.model.known:
        parts.append(f"model {report.model.loaded}" if report.model.loaded else "no model loaded")
    if report.backoff.step:
        text = f"back-off step {report.backoff.step}"
        if report.backoff.next_attempt_at is not None:
            text += f", next start in {max(0.0, report.backoff.next_attempt_at - now):.0f} s"
        parts.append(text)
    if report.findings:
        parts.append(report.findings[0].message)
    return "; ".join(parts)


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def process_start(pid: int, proc: StrPath = PROC) -> int | None:
    """A process's start time (field 22 of /proc/PID/stat, clock ticks since boot); None when it
    is gone or unreadable. With the pid it names one process for the life of a boot."""
    try:
        text = _read(os.path.join(proc, str(pid), "stat")).decode("ascii", "replace")
        # comm (field 2) may hold spaces and parentheses: fields 3.. follow the last ')'
        return int(text.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def daemon_problem(report: StatusReport, proc: StrPath = PROC) -> str:
    """Why the daemon that wrote `report` is not running, or "" when it is (or when this user
    cannot tell: /proc mounted with hidepid). Reads only world-readable /proc files."""
    pid = report.pid
    if not 0 < pid <= 2**22:  # the kernel's pid_max limit
        return f"the status file names no daemon pid (pid {pid})"
    base = os.path.join(proc, str(pid))
    try:
        cmdline = _read(os.path.join(base, "cmdline"))
        status = _read(os.path.join(base, "stat")).decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError):
        if not os.path.exists(os.path.join(proc, "1")):
            return ""  # hidepid: other users' processes are invisible to us; the heartbeat decides
        return f"daemon pid {pid} is gone: hydra-watchdog is not running (it did not stop cleanly)"
    except OSError:
        return ""  # hidepid=noaccess: cannot tell
    fields = status.rsplit(")", 1)[-1].split()
    if fields and fields[0] in ("Z", "X"):
        return f"daemon pid {pid} is gone: hydra-watchdog exited (a zombie, not yet reaped)"
    # An empty cmdline: an exec in progress (or a kernel thread); the start time still decides.
    if cmdline and b"hydra_watchdog" not in cmdline and b"hydra-watchdog" not in cmdline:
        command = cmdline.replace(b"\0", b" ").decode("utf-8", "replace").strip()[:80]
        return f"daemon pid {pid} is gone: that pid is now another process ({command or '?'})"
    if report.pid_start is not None and process_start(pid, proc) != report.pid_start:
        return f"daemon pid {pid} is gone: that pid is now another hydra-watchdog process"
    return ""


def evaluate(
    report: StatusReport | None,
    *,
    wall_now: float,
    stale_after: float,
    daemon: str = "",
) -> tuple[int, str]:
    """The Nagios verdict (the exit code: the report's own, judged by the daemon from its phase)
    of a report and one line saying why (without the verdict's name).
    UNKNOWN when there is no report, the daemon stopped, `daemon` says it is not running (see
    daemon_problem), no cycle completed yet, the heartbeat is in the future or older than
    `stale_after` seconds. Ages are computed from `wall_now`."""
    if report is None:
        return UNKNOWN, (
            "no status: hydra-watchdog is not running (or has not written its status yet)"
        )
    if report.stopped_at is not None:
        return UNKNOWN, (
            f"hydra-watchdog (pid {report.pid}) stopped at {_clock(report.stopped_at)} "
            f"({_ago(report.stopped_at, wall_now)}): nothing is watching TabbyAPI"
        )
    if daemon:
        return UNKNOWN, daemon
    if report.heartbeat is None:
        return UNKNOWN, (f"hydra-watchdog (pid {report.pid}) has not completed a cycle yet")
    age = wall_now - report.heartbeat
    if age < -FUTURE_SKEW:
        return UNKNOWN, (
            f"the status file's last cycle is {-age:.0f} s in the future: the clock was set "
            f"back, or the file was not written by hydra-watchdog (pid {report.pid})"
        )
    if age > stale_after:
        return UNKNOWN, (
            f"status is stale: the last cycle was {age:.0f} s ago (limit {stale_after:.0f} s); "
            f"is hydra-watchdog (pid {report.pid}) hung or stopped?"
        )
    return report.verdict, summarize(report, now=wall_now)


def _clock(t: float | None) -> str:
    if t is None:
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    except (OverflowError, OSError, ValueError):
        return f"{t:.0f} (not a date)"


def _ago(t: float | None, now: float) -> str:
    if t is None:
        return "never"
    delta = now - t
    if delta < 0:
        return f"in {_span(-delta)}"
    return f"{_span(delta)} ago"


def _span(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _gib(value: int | None) -> str:
    return "?" if value is None else f"{value / GIB:.1f} GiB"


def _watts(value: float | None) -> str:
    return "?" if value is None else f"{value:g} W"


def render_human(report: StatusReport, *, now: float | None = None) -> str:  # noqa: PLR0912, PLR0915
    """`hydra-watchdog status` for a terminal: everything the runbook asks first. Ages are
    computed from `now` (default: the current time), not from when the file was written."""
    now = time.time() if now is None else now
    daemon = f"pid {report.pid}, last cycle {_ago(report.heartbeat, now)}"
    if report.stopped_at is not None:
        daemon += f", STOPPED at {_clock(report.stopped_at)}"
    lines = [
        f"hydra-watchdog: {str(report.phase).upper()} [{VERDICT_NAMES[report.verdict]}] "
        f"since {_clock(report.since)} ({_ago(report.since, now)})",
        f"  {summarize(report, now=now)}",
        f"daemon:     {daemon}" + (", DRY RUN (actions are only logged)" if report.dry_run else ""),
    ]
    if report.health is not None:
        h = report.health
        text = f"{h.outcome}" + (f" {h.status}" if h.status else "")
        text += f" in {h.latency_s * 1000:.0f} ms" + (f" ({h.detail})" if h.detail else "")
        lines.append(f"health:     {text}")
    if report.unit is not None:
        u = report.unit
        if u.available:
            restarts = "?" if u.n_restarts is None else str(u.n_restarts)
            lines.append(
                f"unit:       {u.name} {u.active_state}/{u.sub_state}, "
                f"result {u.result or '-'}, NRestarts {restarts}"
                + (f", MainPID {u.main_pid}" if u.main_pid else "")
            )
        else:
            lines.append(f"unit:       {u.name} (systemd not available: {u.detail or 'unknown'})")
    m = report.model
    model = f"wanted {m.wanted or '(none)'}"
    if m.known:
        model += f", loaded {m.loaded or '(none)'}"
    if m.fallback_in_use:
        model += " (fallback in use)"
    lines.append(f"model:      {model}")
    if report.load is not None:
        ld = report.load
        progress = f" {ld.module}/{ld.modules} modules" if ld.modules else ""
        lines.append(
            f"loading:    {ld.model}{progress}, started {_ago(ld.started_at, now)}, "
            f"gives up at {_clock(ld.deadline_at)}"
        )
    if m.vram_needed_bytes is not None:
        lines.append(f"VRAM need:  {_gib(m.vram_needed_bytes)} in total ({m.vram_needed_source})")
    if report.gpu_error:
        lines.append(f"GPUs:       not readable: {report.gpu_error}")
    for g in report.gpus:
        power = f"power limit {_watts(g.power_limit_w)}"
        if g.power_target_w is not None:
            power += f" (target {_watts(g.power_target_w)})"
        lines.append(
            f"gpu{g.index}:       {g.name}: VRAM used {_gib(g.vram_used_bytes)}, "
            f"free {_gib(g.vram_free_bytes)} of {_gib(g.vram_total_bytes)}; {power}"
            + (f"; errors: {', '.join(g.errors)}" if g.errors else "")
        )
    for lst in report.listeners:
        owner = f"pid {lst.pid}" if lst.pid is not None else "unknown owner"
        if lst.role:
            owner += f" ({lst.role}: {lst.command})"
        lines.append(f"port {lst.port}:  {owner}")
    for proc in report.processes:
        lines.append(
            f"{proc.role + ':':<11} pid {proc.pid} {proc.command} ({_gib(proc.gpu_bytes)} on GPU)"
        )
    b = report.backoff
    if b.step:
        lines.append(
            f"back-off:   step {b.step}, next attempt {_clock(b.next_attempt_at)} "
            f"({_ago(b.next_attempt_at, now)})" + (", ESCALATED" if b.escalated else "")
        )
    else:
        lines.append("back-off:   none")
    lines.append(
        f"restarts:   {b.restarts_in_window} in the last {_span(b.window_s)} "
        f"({b.restarts_by_watchdog} by the watchdog, {b.restarts_by_systemd} by systemd)"
    )
    p = report.paused
    if p.paused:
        until = f"until {_clock(p.until)}" if p.until is not None else "until `resume`"
        lines.append(f"paused:     yes, {p.reason or 'no reason given'}, {until}")
    else:
        lines.append("paused:     no")
    if report.findings:
        lines.append("findings:")
        lines.extend(f"  [{f.severity}] {f.rule}: {f.message}" for f in report.findings)
    if report.actions:
        lines.append("last actions:")
        for a in report.actions:
            outcome = {"action_failed": " FAILED", "action_refused": " REFUSED"}.get(a.event, "")
            because = f" (because {a.rule}: {a.reason})" if a.reason else ""
            lines.append(f"  {_clock(a.at)}{outcome} {a.message}{because}")
    return "\n".join(lines) + "\n"


def print_status(
    verdict: int,
    why: str,
    report: StatusReport | None,
    doc: object,
    note: str,
    *,
    as_json: bool,
    now: float,
) -> int:
    """What `status` prints, and its exit code; `doc` is the report's JSON form (--json)."""
    why = " ".join(why.split())  # one line, whatever the file held
    if as_json:
        import json  # noqa: PLC0415 - only --json needs it

        name = VERDICT_NAMES[verdict]
        out = {"verdict": name, "exit_code": int(verdict), "reason": why, "report": doc}
        print(json.dumps(out, indent=2))
    else:
        print(f"{VERDICT_NAMES[verdict]}: {why}")
        if report is not None:
            print(render_human(report, now=now))
        if note:
            print(note, file=sys.stderr)
    return int(verdict)
