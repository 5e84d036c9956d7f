"""Command line: hydra-watchdog run|status|check|verify|pause|resume|events|incidents|check-config|
demo.

Verdicts follow the Nagios plugin convention (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN); a bad
configuration exits 78 (EX_CONFIG) with one line naming the key, never a traceback.
"""

from __future__ import annotations

import os
import sys
import time

from hydra_watchdog import __version__

# `status` runs every few seconds from monitoring: this module imports only what its quick path
# needs (report/status_quick.py); every other command imports what it uses where it uses it.
# Not even states (its enums import enum): `status` passes verdicts as their exit codes.
TYPE_CHECKING = False  # not typing's: importing typing alone costs `status` milliseconds
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence
    from typing import Any, TypeVar

    from hydra_watchdog.config import Config

    Command = Callable[[argparse.Namespace], int]
    T = TypeVar("T")

EX_CONFIG = 78  # config.EX_CONFIG, without importing the config schema


class CliError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _config(args: argparse.Namespace) -> Config:
    from hydra_watchdog.config import ConfigError, load_config  # noqa: PLC0415 - see the top

    try:
        return load_config(args.config)
    except ConfigError as exc:
        raise CliError(EX_CONFIG, f"config error: {exc}") from None


def _config_or_defaults(args: argparse.Namespace) -> tuple[Config, str]:
    """Read-only commands still work when the config cannot be read (an unprivileged user)."""
    from hydra_watchdog.config import Config, ConfigError, load_config  # noqa: PLC0415

    try:
        return load_config(args.config), ""
    except ConfigError as exc:
        return Config(), f"(config not read: {exc}; using defaults)"


# --- commands -----------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from hydra_watchdog.daemon import run_daemon  # noqa: PLC0415 - keep `status` start-up light

    _config(args)  # fail fast with EX_CONFIG before any machinery starts
    return run_daemon(args.config, dry_run=args.dry_run, once=args.once)


def cmd_check_config(args: argparse.Namespace) -> int:
    from hydra_watchdog.config import (  # noqa: PLC0415 - see the top
        Config,
        ConfigError,
        check_host,
        render_config,
    )

    cfg = _config(args)
    if not args.file_only:
        try:
            check_host(cfg)
        except ConfigError as exc:
            raise CliError(EX_CONFIG, f"config error: {exc}") from None
    sys.stdout.write(render_config(cfg))
    if cfg == Config():  # valid, but an empty file (an editor's new file) is rarely what was meant
        print(f"warning: {args.config}: every option is at its default", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Never a traceback: a Nagios plugin that crashes exits 1 (WARNING) and says nothing
    useful; whatever goes wrong here is UNKNOWN with the reason. main() first tries the quick
    path (report/status_quick.py), which prints the same when it answers at all."""
    from hydra_watchdog.report.status import to_json  # noqa: PLC0415
    from hydra_watchdog.report.status_view import UNKNOWN, print_status  # noqa: PLC0415

    now = time.time() if args.now is None else args.now
    try:
        verdict, why, report, note = _status(args, now)
    except Exception as exc:  # see the docstring
        verdict, why, report, note = (
            UNKNOWN,
            f"cannot evaluate the status: {type(exc).__name__}: {exc}",
            None,
            "",
        )
    doc = None
    if report is not None and args.json:
        import json  # noqa: PLC0415

        doc = json.loads(to_json(report))
    return print_status(verdict, why, report, doc, note, as_json=args.json, now=now)


def _status(args: argparse.Namespace, now: float) -> tuple[int, str, Any, str]:
    from pathlib import Path  # noqa: PLC0415

    from hydra_watchdog.report.status import (  # noqa: PLC0415
        daemon_problem,
        evaluate,
        stale_after,
    )
    from hydra_watchdog.report.status_file import STATUS_FILE, read_status  # noqa: PLC0415
    from hydra_watchdog.report.status_view import UNKNOWN  # noqa: PLC0415

    cfg, note = _config_or_defaults(args)
    runtime_dir = Path(args.runtime_dir or cfg.watchdog.runtime_dir)
    path = runtime_dir / STATUS_FILE
    try:
        report = read_status(runtime_dir)
    except ValueError as exc:
        return UNKNOWN, f"{path}: {exc}", None, note
    if report is None:
        why = f"no status file {path}: hydra-watchdog is not running (or never completed a cycle)"
        return UNKNOWN, why, None, note
    gone = daemon_problem(report) if report.stopped_at is None else ""
    verdict, why = evaluate(report, wall_now=now, stale_after=stale_after(cfg), daemon=gone)
    return verdict, why, report, note


def _from_state_dir(cfg: Config, load: Callable[[], T]) -> T:
    """What `load` reads from the state dir (root's), or the CliError saying why it cannot."""
    try:
        return load()
    except PermissionError:
        raise CliError(
            3, f"cannot read {cfg.watchdog.state_dir}: permission denied (run as root)"
        ) from None
    except OSError as exc:  # statefile.UnsafeDirectoryError: says what is wrong and how to fix it
        raise CliError(3, str(exc)) from None


def cmd_events(args: argparse.Namespace) -> int:
    import json  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from hydra_watchdog.policy_state import to_jsonable  # noqa: PLC0415
    from hydra_watchdog.statefile import (  # noqa: PLC0415
        DRY_RUN_STATE_FILE,
        STATE_FILE,
        StateFile,
    )

    cfg, note = _config_or_defaults(args)
    name = DRY_RUN_STATE_FILE if cfg.watchdog.dry_run else STATE_FILE
    persisted = _from_state_dir(
        cfg,
        StateFile(
            Path(cfg.watchdog.state_dir), events_kept=cfg.watchdog.events_kept, name=name
        ).load,
    )
    events = list(persisted.events)[-args.n :] if args.n > 0 else []
    if args.json:
        print(json.dumps([to_jsonable(e) for e in events], indent=2))
        return 0
    if not events:
        print("no events recorded" + (f" {note}" if note else ""))
    for e in events:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.wall))
        rule = f" [{e.rule.value}]" if e.rule else ""
        print(f"{stamp} {e.severity.value:<7} {e.kind.value}{rule}: {e.message}")
        if e.reason and e.reason not in e.message:
            print(f"{'':20}because {e.reason}")
    return 0


def cmd_incidents(args: argparse.Namespace) -> int:
    import json  # noqa: PLC0415

    from hydra_watchdog.durations import parse_duration  # noqa: PLC0415
    from hydra_watchdog.incidents import incidents_since  # noqa: PLC0415
    from hydra_watchdog.report.incident_file import IncidentFile  # noqa: PLC0415
    from hydra_watchdog.report.incident_view import render, to_json  # noqa: PLC0415

    try:
        since = parse_duration(args.since)
    except ValueError as exc:
        raise CliError(2, f"--since {args.since!r}: {exc}") from None
    cfg, note = _config_or_defaults(args)
    loaded = _from_state_dir(
        cfg, IncidentFile(cfg.watchdog.state_dir, dry_run=cfg.watchdog.dry_run).load
    )
    now = time.time()
    found = incidents_since(loaded.tracker, now - since)
    if args.json:
        print(json.dumps(to_json(found), indent=2))
        return 0
    for line in (loaded.note, note):
        if line:
            print(line, file=sys.stderr)
    print("\n".join(render(found, now=now, since_text=args.since)))
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    from hydra_watchdog import control  # noqa: PLC0415
    from hydra_watchdog.durations import parse_duration  # noqa: PLC0415

    cfg = _config(args)
    until = None
    if args.duration:
        try:
            until = time.time() + parse_duration(args.duration)
        except ValueError as exc:
            raise CliError(2, f"--for {args.duration!r}: {exc}") from None
    try:
        control.pause(cfg.watchdog.state_dir, args.reason, until)
    except OSError as exc:
        raise CliError(3, f"cannot write to {cfg.watchdog.state_dir}: {exc}") from None
    when = (
        "until resumed" if until is None else time.strftime("until %H:%M:%S", time.localtime(until))
    )
    print(f"paused {when}: {args.reason} (the daemon observes only, from its next cycle)")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from hydra_watchdog import control  # noqa: PLC0415

    cfg = _config(args)
    try:
        was = control.resume(cfg.watchdog.state_dir)
    except OSError as exc:
        raise CliError(3, f"cannot write to {cfg.watchdog.state_dir}: {exc}") from None
    print("resumed" if was else "was not paused")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """One real observe + decide cycle: the diagnosis and the plan, never an action."""
    import json  # noqa: PLC0415

    from hydra_watchdog.actions import describe  # noqa: PLC0415
    from hydra_watchdog.daemon import build_adapters  # noqa: PLC0415
    from hydra_watchdog.observation import Probe  # noqa: PLC0415
    from hydra_watchdog.observe import Observer  # noqa: PLC0415
    from hydra_watchdog.policy import decide  # noqa: PLC0415
    from hydra_watchdog.policy_state import PolicyState, to_jsonable  # noqa: PLC0415
    from hydra_watchdog.states import Phase, Verdict  # noqa: PLC0415

    cfg = _config(args)
    adapters = build_adapters(cfg, command=True)  # the key as the watchdog's unit gets it
    observer = Observer.from_adapters(cfg, adapters)
    # Two passes: the first asks for the expensive probes the rules need, the second runs them.
    # Nothing is executed, so the second pass starts afresh with only the probe requests.
    first, _ = decide(PolicyState(), observer.observe(frozenset()), time.monotonic(), cfg)
    # /v1/model afresh too: the first pass's "no model" would otherwise be carried (observe.py)
    wants = first.wants | {Probe.MODEL}
    obs = observer.observe(wants)
    state, actions = decide(PolicyState(wants=wants), obs, obs.at, cfg)
    verdict = Verdict.WARNING if state.phase is Phase.UNKNOWN else state.phase.verdict
    if args.json:
        doc = {
            "verdict": verdict.name,
            "phase": state.phase.value,
            "findings": [to_jsonable(f) for f in state.findings],
            "planned_actions": [
                {"action": describe(a), "rule": a.reason.rule.value, "reason": a.reason.evidence}
                for a in actions
            ],
            "observation": to_jsonable(obs),
        }
        print(json.dumps(doc, indent=2, default=str))
        return int(verdict)
    print(f"{verdict.name}: TabbyAPI is {state.phase.value}")
    h = obs.health.result
    print(f"  health: {h.outcome.value} {h.status or ''} in {h.latency_s * 1000:.0f} ms")
    if obs.model is not None:
        print(f"  model: {obs.model.loaded or 'none loaded'}")
    print(f"  unit: {obs.unit.name} {obs.unit.active_state or 'unknown'}/{obs.unit.sub_state}")
    for g in obs.gpus.devices:
        free = f"{g.memory_free / 2**30:.1f} GiB free" if g.memory_free is not None else "VRAM ?"
        print(f"  gpu{g.index} {g.name}: {free}, limit {g.power.limit_w} W")
    for f in state.findings:
        print(f"  [{f.severity.value}] {f.rule.value}: {f.message}")
    if not actions:
        print("planned: nothing")
    for a in actions:
        print(f"would {describe(a)}  <- {a.reason.rule.value}: {a.reason.evidence}")
    return int(verdict)


def cmd_verify(args: argparse.Namespace) -> int:
    """The runbook's post-rebuild verification, step by step."""
    from hydra_watchdog.daemon import build_adapters  # noqa: PLC0415
    from hydra_watchdog.observation import Outcome  # noqa: PLC0415
    from hydra_watchdog.states import Verdict  # noqa: PLC0415

    cfg = _config(args)
    adapters = build_adapters(cfg, command=True)  # the key as the watchdog's unit gets it
    checks: list[tuple[str, bool, str]] = []
    # ldd in TabbyAPI's environment: its running process's, else its unit's
    host = adapters.host.check(libraries=True, unit=adapters.units.status())
    libs = host.missing_libraries
    if libs is None:
        # not checkable (no venv configured, no extension found): say so, do not fail on it
        skipped = f"skipped: {host.libraries_detail or 'no venv configured'}"
        checks.append(("libraries resolve", True, skipped))
    else:
        found = f"{', '.join(libs)} not found" if libs else "all found"
        checks.append(("libraries resolve", not libs, found))
    if host.models_dir_ok is None:  # the check could not tell: never a pass
        checks.append(("models mount", False, host.models_dir_detail or "not checked"))
    else:
        mount = host.models_dir_detail or cfg.model.models_dir
        checks.append(("models mount", host.models_dir_ok, mount))
    if cfg.model.name:
        usable = host.model is not None and host.model.usable
        checks.append(("model dir", usable, host.model.path if host.model else "not checked"))
    health = adapters.tabby.health()
    checks.append(
        (
            "health",
            health.healthy,
            f"{health.result.outcome.value} {health.result.latency_s * 1000:.0f} ms",
        )
    )
    # The admin key goes only to a listener verified against the unit (identity.py).
    adapters.tabby.note_unit(adapters.units.status())
    model = adapters.tabby.model() if health.healthy else None
    loaded = model is not None and bool(model.loaded)
    # this command holds no key: no verdict on TabbyAPI, nor on the daemon's key
    keyless = model is not None and model.result.outcome is Outcome.LOCAL_ERROR
    if model is None:
        seen = "not checked"
    elif model.loaded or model.known:
        seen = model.loaded or "none"
    elif keyless:
        seen = f"skipped: {model.result.detail}"
    else:
        seen = f"{model.result.outcome.value}: {model.result.detail}"
    checks.append(("model loaded", loaded or keyless, seen))
    if loaded:
        canary = adapters.tabby.canary(cfg.tabbyapi.canary_deadline)
        r = canary.result
        checks.append(
            (
                "1-token completion",
                r.outcome.value == "ok",
                f"{r.outcome.value} {r.latency_s * 1000:.0f} ms",
            )
        )
    else:
        why = "no admin key for this command" if keyless else "no model"
        checks.append(("1-token completion", keyless, f"skipped: {why}"))
    failed = [c for c in checks if not c[1]]
    for name, good, detail in checks:
        print(f"{'OK  ' if good else 'FAIL'} {name}: {detail}")
    verdict = Verdict.CRITICAL if failed else Verdict.OK
    print(f"{verdict.name}: {len(checks) - len(failed)}/{len(checks)} checks passed")
    return int(verdict)


def cmd_demo(args: argparse.Namespace) -> int:
    from hydra_watchdog.demo import run_demo  # noqa: PLC0415

    return run_demo(fast=args.fast)


# --- parser -------------------------------------------------------------------------------------


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with `only` one command's (argparse spends milliseconds per
    sub-parser, and `status` is run by monitoring every few seconds: it gets just its own)."""
    import argparse  # noqa: PLC0415 - see the top
    from pathlib import Path  # noqa: PLC0415

    from hydra_watchdog.config import DEFAULT_CONFIG_PATH  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="hydra-watchdog",
        description="TabbyAPI's incident runbook as an on-node watchdog.",
    )
    parser.add_argument("--version", action="version", version=f"hydra-watchdog {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    unused = argparse.ArgumentParser(add_help=False, conflict_handler="resolve")

    def add(name: str, fn: Command, help_text: str) -> argparse.ArgumentParser:
        if only is not None and name != only:
            return unused  # not this run's command: its options go nowhere
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--config",
            type=Path,
            default=Path(os.environ.get("HYDRA_WATCHDOG_CONFIG", DEFAULT_CONFIG_PATH)),
            help=f"config file (default {DEFAULT_CONFIG_PATH}, or $HYDRA_WATCHDOG_CONFIG)",
        )
        p.set_defaults(func=fn)
        return p

    p = add("run", cmd_run, "run the daemon")
    p.add_argument("--dry-run", action="store_true", help="decide, log 'would …', never act")
    p.add_argument("--once", action="store_true", help="one cycle, then exit")
    p = add("status", cmd_status, "the current verdict (Nagios exit codes)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--runtime-dir", help="where the daemon writes status.json")
    p.set_defaults(now=None)  # tests pass the clock of a quick_status run they compare with
    p = add("check", cmd_check, "one observe + decide cycle: diagnosis and plan; never acts")
    p.add_argument("--json", action="store_true")
    add("verify", cmd_verify, "the runbook's post-rebuild verification")
    p = add("pause", cmd_pause, "maintenance mode: observe only")
    p.add_argument("--for", dest="duration", help='how long, e.g. "30m" (default: until resume)')
    p.add_argument("--reason", default="maintenance", help="shown in status and logs")
    add("resume", cmd_resume, "leave maintenance mode")
    p = add("events", cmd_events, "recent events")
    p.add_argument("-n", type=int, default=20, help="how many (default 20)")
    p.add_argument("--json", action="store_true")
    p = add("incidents", cmd_incidents, "incidents: alert, cause, actions, time to recover")
    p.add_argument("--since", default="24h", help='how far back, e.g. "7d" (default 24h)')
    p.add_argument("--json", action="store_true")
    p = add("check-config", cmd_check_config, "validate the config; print it with secrets redacted")
    p.add_argument(
        "--file-only",
        action="store_true",
        help="check the file alone, not against this machine (its users): for a build sandbox",
    )
    p = add("demo", cmd_demo, "the daemon against a simulated node, with scripted incidents")
    p.add_argument("--fast", action="store_true", help="shorter scenario timings")
    return parser


COMMANDS = frozenset(
    (
        "run",
        "status",
        "check",
        "verify",
        "pause",
        "resume",
        "events",
        "incidents",
        "check-config",
        "demo",
    )
)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argv[0] if argv else ""
    if first == "status":
        from hydra_watchdog.report.status_quick import quick_status  # noqa: PLC0415

        quick = quick_status(argv[1:])
        if quick is not None:
            return quick
    args = build_parser(first if first in COMMANDS else None).parse_args(argv)
    try:
        code: int = args.func(args)
    except CliError as exc:
        print(f"hydra-watchdog: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    return code
