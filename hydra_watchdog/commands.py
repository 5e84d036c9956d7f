"""Every command but `status` (cli.py), imported only when one of them runs: they import what
they use freely, the config's schema first.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from hydra_watchdog.config import Config, ConfigError, load_config

EX_CONFIG = 78  # config.EX_CONFIG
UNKNOWN = 3  # Verdict.UNKNOWN: a command that reports cannot tell without its config
T = TypeVar("T")


class CliError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _config(args: argparse.Namespace, *, code: int = EX_CONFIG) -> Config:
    """The config, or CliError with `code`: EX_CONFIG for a command that would act on it,
    UNKNOWN for one that reports (check, verify): a report without its config is no verdict."""
    try:
        return load_config(args.config)
    except ConfigError as exc:
        raise CliError(code, f"config error: {exc}") from None


def _config_or_defaults(args: argparse.Namespace) -> tuple[Config, str]:
    """Read-only commands still work when the config cannot be read (an unprivileged user)."""
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
    from hydra_watchdog.config import check_host, render_config  # noqa: PLC0415

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

    cfg = _config(args, code=UNKNOWN)
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

    cfg = _config(args, code=UNKNOWN)
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
