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
    from hydra_watchdog.check import run_check  # noqa: PLC0415
    from hydra_watchdog.daemon import build_adapters  # noqa: PLC0415

    cfg = _config(args, code=UNKNOWN)
    adapters = build_adapters(cfg, command=True)  # the key as the watchdog's unit gets it
    return run_check(cfg, adapters, as_json=args.json)


def cmd_verify(args: argparse.Namespace) -> int:
    """The runbook's post-rebuild verification, step by step (verify.py)."""
    from hydra_watchdog.daemon import build_adapters  # noqa: PLC0415
    from hydra_watchdog.verify import run_verify  # noqa: PLC0415

    cfg = _config(args, code=UNKNOWN)
    adapters = build_adapters(cfg, command=True)  # the key as the watchdog's unit gets it
    return run_verify(cfg, adapters)


def cmd_demo(args: argparse.Namespace) -> int:
    from hydra_watchdog.demo import run_demo  # noqa: PLC0415

    return run_demo(fast=args.fast)
