"""Command line: hydra-watchdog run|status|check|verify|pause|resume|events|incidents|check-config|
demo.

Verdicts follow the Nagios plugin convention (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN). A config
that cannot be read is exit 78 (EX_CONFIG) for the commands that act on it (run, check-config,
pause, resume) and 3 (UNKNOWN) for the ones that report (status, check, verify), with one line
naming the key, never a traceback.

`status` runs every few seconds from monitoring, so this module holds it and imports no more than
it needs: its three options spelled out are read here (status_args); any other command line goes
to the one parser (arguments.py), every other command to commands.py, both imported when needed.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

from hydra_watchdog.paths import DEFAULT_CONFIG_PATH
from hydra_watchdog.report.status_file import STATUS_FILE, find_status, read_status
from hydra_watchdog.report.status_view import UNKNOWN, daemon_problem, judge, show_status


class StatusArgs:
    """`status`'s options."""

    def __init__(self, config: str, runtime_dir: str | None = None, json: bool = False) -> None:
        self.config = config
        self.runtime_dir = runtime_dir
        self.json = json


def status_args(argv: Sequence[str]) -> StatusArgs | None:
    """`status ARGV`'s options when ARGV spells each out in full (`--json`, `--config PATH`,
    `--config=PATH`, `--runtime-dir DIR`, each at most once); None for anything else (--help, an
    abbreviation, a mistake), which the parser then reads, helps with or refuses."""
    found: dict[str, str] = {}
    rest = list(argv)
    while rest:
        arg = rest.pop(0)
        name, eq, value = arg.partition("=")
        if name in found or name not in ("--json", "--config", "--runtime-dir"):
            return None
        if name == "--json":
            if eq:
                return None
            value = "yes"
        elif not eq:
            if not rest or rest[0].startswith("-"):
                return None
            value = rest.pop(0)
        found[name] = value
    config = found.get("--config", os.environ.get("HYDRA_WATCHDOG_CONFIG", DEFAULT_CONFIG_PATH))
    return StatusArgs(config, found.get("--runtime-dir"), "--json" in found)


def cmd_status(args: StatusArgs) -> int:
    """Never a traceback: a Nagios plugin that crashes exits 1 (WARNING) and says nothing
    useful; whatever goes wrong here is UNKNOWN with the reason."""
    now = time.time()
    report, current, note = None, False, ""
    try:
        runtime_dir = args.runtime_dir
        if runtime_dir is None:
            runtime_dir, note = find_status(args.config)
        path = os.path.join(runtime_dir, STATUS_FILE)
        try:
            report = read_status(runtime_dir)
        except ValueError as exc:
            verdict, why = UNKNOWN, f"{path}: {exc}"
        else:
            if report is None:
                verdict, why = (
                    UNKNOWN,
                    (
                        f"no status file {path}: hydra-watchdog is not running "
                        "(or never completed a cycle)"
                    ),
                )
            else:
                gone = daemon_problem(report) if report.stopped_at is None else ""
                limit = report.stale_after or _stale_after(args.config)
                verdict, why, current = judge(report, wall_now=now, stale_after=limit, daemon=gone)
    except Exception as exc:  # see the docstring
        verdict, why = UNKNOWN, f"cannot evaluate the status: {type(exc).__name__}: {exc}"
        report, current = None, False
    return show_status(verdict, why, report, current=current, note=note, as_json=args.json, now=now)


def _stale_after(config: str) -> float:
    """The staleness limit of a report that does not publish its own (a daemon before 0.1):
    computed from the config, as that daemon did."""
    from hydra_watchdog.config import Config, ConfigError, load_config  # noqa: PLC0415 - rare
    from hydra_watchdog.report.status_build import stale_after  # noqa: PLC0415

    try:
        return stale_after(load_config(config))
    except ConfigError:
        return stale_after(Config())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["status"]:
        spelled = status_args(argv[1:])
        if spelled is not None:
            return cmd_status(spelled)
    from hydra_watchdog.arguments import COMMANDS, build_parser  # noqa: PLC0415 - see the doc

    args = build_parser(argv[0] if argv and argv[0] in COMMANDS else None).parse_args(argv)
    if args.command == "status":
        return cmd_status(StatusArgs(args.config, args.runtime_dir, args.json))
    from hydra_watchdog import commands  # noqa: PLC0415 - see the module's doc

    try:
        code: int = getattr(commands, "cmd_" + args.command.replace("-", "_"))(args)
    except commands.CliError as exc:
        from hydra_watchdog.printable import wrapped  # noqa: PLC0415 - see the module's doc

        print(wrapped(f"hydra-watchdog: {exc}"), file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    return code
