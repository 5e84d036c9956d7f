"""How `hydra-watchdog status` judges a status report and shows it: the verdict (evaluate), the
daemon's liveness (daemon_problem), the one-line summary (summarize, also sd_notify's STATUS) and
the screen (render).

The screen is `systemctl status`'s shape: the verdict and why on the first line (the line a
Nagios check shows), then each fact once, under a right-aligned label, within 100 columns. A
report the CLI cannot vouch for (the daemon stopped, is gone, is stale) shows only what it last
saw and did, dated: never its verdict as if it were current. Every string that came from another
process (a model id, a command line, an error message) is escaped before it is shown.
"""

from __future__ import annotations

import json
import os
import sys
import time

from hydra_watchdog.printable import one_line, printable
from hydra_watchdog.report.screen import LABEL, WIDTH, Style, emit, fact, hanging, wants_colour
from hydra_watchdog.report.status import (
    VERDICT_NAMES,
    ActionEntry,
    HealthInfo,
    ModelInfo,
    StatusReport,
    UnitInfo,
)

GIB = 1024**3
FUTURE_SKEW = 10.0  # seconds a heartbeat may lie ahead of `now` (clock steps) before it is a lie
PROC = "/proc"
UNKNOWN = 3


def _head(report: StatusReport) -> str:
    """The phase, with the pause's reason when paused (said once)."""
    phase = report.phase.replace("_", " ")
    p = report.paused
    if not p.paused:
        return phase
    why = f"paused ({p.reason})" if p.reason else "paused"
    return why if report.phase == "paused" else f"{phase}, {why}"


def summarize(report: StatusReport, *, now: float | None = None) -> str:
    """One line: the `summary` of status.json and sd_notify's STATUS."""
    now = report.generated_at if now is None else now
    parts = [_head(report)]
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


# --- is the report current? --------------------------------------------------------------------


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def process_start(pid: int, proc: str = PROC) -> int | None:
    """A process's start time (field 22 of /proc/PID/stat, clock ticks since boot); None when it
    is gone or unreadable. With the pid it names one process for the life of a boot."""
    try:
        text = _read(os.path.join(proc, str(pid), "stat")).decode("ascii", "replace")
        # comm (field 2) may hold spaces and parentheses: fields 3.. follow the last ')'
        return int(text.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def daemon_problem(report: StatusReport, proc: str = PROC) -> str:
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
        command = one_line(cmdline.replace(b"\0", b" ").decode("utf-8", "replace").strip(), 80)
        return f"daemon pid {pid} is gone: that pid is now another process ({command or '?'})"
    if report.pid_start is not None and process_start(pid, proc) != report.pid_start:
        return f"daemon pid {pid} is gone: that pid is now another hydra-watchdog process"
    return ""


def not_current(
    report: StatusReport, *, wall_now: float, stale_after: float, daemon: str = ""
) -> str:
    """Why `report` does not say how things are now ("" when it does): the daemon stopped,
    `daemon` says it is not running (see daemon_problem), it has not completed a cycle yet, or
    its last cycle is in the future or older than `stale_after` seconds."""
    if report.stopped_at is not None:
        return (
            f"hydra-watchdog (pid {report.pid}) stopped at {_clock(report.stopped_at, wall_now)} "
            f"({_ago(report.stopped_at, wall_now)}): nothing is watching TabbyAPI"
        )
    if daemon:
        return daemon
    if report.heartbeat is None:
        return f"hydra-watchdog (pid {report.pid}) has not completed a cycle yet"
    age = wall_now - report.heartbeat
    if age < -FUTURE_SKEW:
        return (
            f"the status file's last cycle is {-age:.0f} s in the future: the clock was set "
            f"back, or the file was not written by hydra-watchdog (pid {report.pid})"
        )
    if age > stale_after:
        return (
            f"status is stale: the last cycle was {age:.0f} s ago (limit {stale_after:.0f} s); "
            f"is hydra-watchdog (pid {report.pid}) hung or stopped?"
        )
    return ""


def headline(report: StatusReport, now: float) -> str:
    """What a current report says first: the phase and since when (a pause: until when)."""
    text = f"{_head(report)} since {_clock(report.since, now)}"
    if report.since is not None:
        text += f" ({_ago(report.since, now)})"
    p = report.paused
    if p.paused:
        text += "; " + (
            f"until {_clock(p.until, now)} ({_ago(p.until, now)})"
            if p.until is not None
            else "until `hydra-watchdog resume`"
        )
    return text


def judge(
    report: StatusReport, *, wall_now: float, stale_after: float, daemon: str = ""
) -> tuple[int, str, bool]:
    """(the Nagios verdict, why, whether the report is current): the report's own verdict,
    judged by the daemon from its phase, and its headline while it is current (not_current);
    UNKNOWN and the reason when it is not. Ages are computed from `wall_now`."""
    problem = not_current(report, wall_now=wall_now, stale_after=stale_after, daemon=daemon)
    if problem:
        return UNKNOWN, problem, False
    return report.verdict, headline(report, wall_now), True


def evaluate(
    report: StatusReport | None,
    *,
    wall_now: float,
    stale_after: float,
    daemon: str = "",
) -> tuple[int, str]:
    """judge()'s verdict and why; UNKNOWN when there is no report at all."""
    if report is None:
        return (
            UNKNOWN,
            "no status: hydra-watchdog is not running (or has not written its status yet)",
        )
    verdict, why, _ = judge(report, wall_now=wall_now, stale_after=stale_after, daemon=daemon)
    return verdict, why


# --- the screen ---------------------------------------------------------------------------------


def _clock(t: float | None, now: float, *, full: bool = False) -> str:
    """A local time: the time of day alone when it falls on `now`'s day."""
    if t is None:
        return "-"
    try:
        day = time.strftime("%Y-%m-%d", time.localtime(t))
        shown = time.strftime("%H:%M:%S", time.localtime(t))
        same = day == time.strftime("%Y-%m-%d", time.localtime(now))
    except (OverflowError, OSError, ValueError):
        return f"{t:.0f} (not a date)"
    return shown if same and not full else f"{day} {shown}"


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


_SEVERITY_TONE = {"crit": "bad", "err": "bad", "warning": "warn"}
Row = tuple[str, str]  # (label, text); text from other processes is escaped when shown


def _health(h: HealthInfo) -> str:
    took = f" in {h.latency_s * 1000:.0f} ms"
    if h.outcome == "ok":
        return f"{h.status}{took}"
    if h.detail and h.outcome in h.detail:  # "connection refused" says "refused" already
        return h.detail
    text = h.outcome + (f" {h.status}{took}" if h.status else "")
    return text + (f": {h.detail}" if h.detail else "")


def _model(m: ModelInfo) -> str:
    if m.known and m.loaded and m.loaded == m.wanted:
        text = f"{m.loaded} loaded"
    elif m.known:
        text = f"{m.loaded or 'none'} loaded, {m.wanted or 'none'} wanted"
    else:
        text = f"{m.wanted or 'none'} wanted (not read this cycle)"
    if m.fallback_in_use:
        text += " (the fallback)"
    if m.vram_needed_bytes is not None:
        text += f"; needs {_gib(m.vram_needed_bytes)} ({m.vram_needed_source})"
    return text


def _found(report: StatusReport, text: str) -> str:
    """The rule of a finding that already says `text` ("" when none does): a fact row then
    points to it instead of saying it again."""
    if not text:
        return ""
    return next((f.rule for f in report.findings if text in f.message), "")


def _unit(u: UnitInfo, said_by: str) -> str:
    if not u.available:
        why = f"see the {said_by} finding" if said_by else u.detail or "no reason given"
        return f"{u.name}: systemd not available ({why})"
    state = u.active_state or "unknown"
    if u.sub_state and u.sub_state != u.active_state:
        state += f" ({u.sub_state})"
    extra = [f"main pid {u.main_pid}"] if u.main_pid else []
    if u.result and u.result != "success":
        extra.append(f"result {u.result}")
    # systemd's count of its Restart= restarts, reset by any start it is told to do (a human's
    # or the watchdog's): the Restarts row counts both kinds, so both are true side by side
    count = "?" if u.n_restarts is None else u.n_restarts
    extra.append(f"NRestarts {count} (systemd's, since the last start by hand or by the watchdog)")
    return f"{u.name} {state}; {', '.join(extra)}"


def _tabby_rows(report: StatusReport, now: float) -> list[Row]:
    rows: list[Row] = []
    if report.health is not None:
        rows.append(("Health", _health(report.health)))
    rows.append(("Model", _model(report.model)))
    if report.load is not None:
        ld = report.load
        progress = f", module {ld.module}/{ld.modules}" if ld.modules else ""
        rows.append(
            (
                "Loading",
                f"{ld.model}{progress}, started {_ago(ld.started_at, now)}, "
                f"gives up at {_clock(ld.deadline_at, now)}",
            )
        )
    if report.unit is not None:
        rows.append(("Unit", _unit(report.unit, _found(report, report.unit.detail))))
    return rows


def _node_rows(report: StatusReport) -> list[Row]:
    rows: list[Row] = []
    if report.gpu_error:
        said_by = _found(report, report.gpu_error)
        text = f" (see the {said_by} finding)" if said_by else f": {report.gpu_error}"
        rows.append(("GPUs", "not readable" + text))
    for g in report.gpus:
        power = f"limit {_watts(g.power_limit_w)}"
        if g.power_target_w is not None and g.power_target_w != g.power_limit_w:
            power += f" (target {_watts(g.power_target_w)})"
        used = "?" if g.vram_used_bytes is None else f"{g.vram_used_bytes / GIB:.1f}"
        text = f"gpu{g.index} {g.name}: {used} of {_gib(g.vram_total_bytes)} used, {power}" + (
            f"; errors: {', '.join(g.errors)}" if g.errors else ""
        )
        rows.append(("" if rows else "GPUs", text))
    listed = {p.pid for p in report.processes}  # shown below with their command lines
    for lst in report.listeners:
        if lst.role == "main":
            owner = f"TabbyAPI (pid {lst.pid})"
        elif lst.pid is None:
            owner = "an unknown owner"
        elif lst.role and lst.pid not in listed:
            owner = f"pid {lst.pid} ({lst.role}: {lst.command})"
        else:
            owner = f"pid {lst.pid}" + (f" ({lst.role})" if lst.role else "")
        rows.append(("Port", f"{lst.port} held by {owner}"))
    rows += [
        (p.role.capitalize() or "Process", f"pid {p.pid}, {_gib(p.gpu_bytes)} on GPU: {p.command}")
        for p in report.processes
    ]
    return rows


def _watchdog_rows(report: StatusReport, now: float) -> list[Row]:
    rows: list[Row] = []
    b = report.backoff
    if b.restarts_in_window:
        rows.append(
            (
                "Restarts",
                f"{b.restarts_in_window} in the last {_span(b.window_s)} "
                f"({b.restarts_by_watchdog} by the watchdog, {b.restarts_by_systemd} by systemd)",
            )
        )
    if b.step:
        text = f"step {b.step}, " + (
            f"next attempt {_clock(b.next_attempt_at, now)} ({_ago(b.next_attempt_at, now)})"
            if b.next_attempt_at is not None
            else "no attempt pending"
        )
        rows.append(("Back-off", text + ("; escalated: a human is needed" if b.escalated else "")))
    daemon = f"pid {report.pid}, last cycle {_ago(report.heartbeat, now)}"
    rows.append(
        ("Daemon", daemon + ("; dry run: actions are only logged" if report.dry_run else ""))
    )
    return rows


def facts(report: StatusReport, now: float, style: Style, *, watchdog: bool = True) -> list[str]:
    """A current report's facts, each once: why, TabbyAPI, the node, and (`watchdog`) the
    watchdog's own: restarts, back-off, the daemon, its last actions."""
    out: list[str] = []
    # the pause's own finding says what the first line says (paused, why): not twice
    findings = [f for f in report.findings if not (f.rule == "paused" and report.paused.paused)]
    for i, f in enumerate(findings):
        tag = style.paint(f"[{f.severity}]", _SEVERITY_TONE.get(f.severity, ""))
        out += fact("" if i else "Findings", tag + printable(f" {f.rule}: {f.message}"), style)
    rows = [*_tabby_rows(report, now), *_node_rows(report)]
    rows += _watchdog_rows(report, now) if watchdog else []
    for label, text in rows:
        out += fact(label, printable(text), style)
    return out + (_actions(report, now, style) if watchdog else [])


def _actions(report: StatusReport, now: float, style: Style) -> list[str]:
    """One entry per action: when, the rule that decided it, what was done and what came of it
    (a load: how it ended). The rule's reason is in the journal (and the findings): repeated on
    every line, it buried the actions (and an orphan's command line, which the action names,
    came twice). Actions cut for room are counted, never silently dropped."""
    lines: list[str] = []
    if report.actions_not_shown:
        cut_off = f"({report.actions_not_shown} earlier not shown: `hydra-watchdog events`)"
        lines += fact("Actions", cut_off, style)
    for a in report.actions:
        outcome = {"action_failed": "FAILED ", "action_refused": "REFUSED "}.get(a.event, "")
        rule = f"[{a.rule}] " if a.rule else ""
        text = f"{_clock(a.at, now)} {printable(rule)}" + style.paint(outcome, "bad")
        text += printable(a.message) + _ended(a, now, style)
        lines.extend(fact("Actions" if not lines else "", text, style))
    return lines


_ENDS = {"ok": ("loaded", "in", ""), "failed": ("FAILED", "after", "bad")}
_ENDS["cancelled"] = ("cancelled", "after", "warn")


def _ended(a: ActionEntry, now: float, style: Style) -> str:
    """How an action that ran on (a load) ended, as its end event said; "" while it runs."""
    if a.outcome not in _ENDS:
        return ""
    word, join, tone = _ENDS[a.outcome]
    if a.duration_s is not None:
        took = f"{a.duration_s:.1f} s" if a.duration_s < 120 else _span(a.duration_s)
        return f"; {style.paint(word, tone)} {join} {took}"
    return f"; {style.paint(word, tone)} at {_clock(a.ended_at, now)}"


def render_first_line(verdict: int, why: str, style: Style) -> list[str]:
    """`VERDICT: why`, the verdict painted, wrapped under the facts' column when too long."""
    name = VERDICT_NAMES[verdict]
    first, *rest = hanging(f"{name}: {printable(why)}", WIDTH, LABEL + 3)
    return [style.paint(name, name) + first[len(name) :], *rest]


def render(
    report: StatusReport | None,
    verdict: int,
    why: str,
    *,
    now: float,
    current: bool,
    style: Style | None = None,
) -> str:
    """The screen: the verdict and why, then the facts of a `current` report; of one that is not,
    what it last saw and did, dated."""
    style = Style(colour=False) if style is None else style
    lines = render_first_line(verdict, why, style)
    if report is not None and current:
        lines += facts(report, now, style)
    elif report is not None and report.heartbeat is not None:
        seen = (
            f"{_clock(report.heartbeat, now)} ({_ago(report.heartbeat, now)}): {_head(report)} then"
        )
        lines += fact("Last cycle", printable(seen), style)
        lines += _actions(report, now, style)
    return "\n".join(lines) + "\n"


def show_status(
    verdict: int,
    why: str,
    report: StatusReport | None,
    *,
    current: bool,
    note: str,
    as_json: bool,
    now: float,
) -> int:
    """Print what `status` says, and return its exit code."""
    why = " ".join(why.split())  # one line, whatever the file held
    if as_json:
        doc = None if report is None else report.to_jsonable()
        out = {
            "verdict": VERDICT_NAMES[verdict],
            "exit_code": verdict,
            "reason": why,
            "report": doc,
        }
        emit(json.dumps(out, indent=2) + "\n")
    else:
        emit(render(report, verdict, why, now=now, current=current, style=Style(wants_colour())))
    if note:
        print(note, file=sys.stderr)
    return verdict
