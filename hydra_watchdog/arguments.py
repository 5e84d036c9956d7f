"""The command line's grammar: every command of hydra-watchdog and its options (argparse).

Not imported by the `status` that monitoring runs (cli.py parses its three options itself): the
parser's import and construction cost it a third of the interpreter's own start-up (measured).
"""

from __future__ import annotations

import argparse
import os

from hydra_watchdog import __version__
from hydra_watchdog.paths import DEFAULT_CONFIG_PATH


class _Help(argparse.HelpFormatter):
    """Help in the screens' 100 columns. Also spares every command shutil (with bz2 and lzma):
    argparse imports it for the terminal's width whenever it makes a formatter, for every option
    added."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=100)


class _Unused:
    """Where the options of a command that is not this run's go (a parser per command would cost
    every command its gettext look-ups)."""

    def add_argument(self, *args: str, **kwargs: object) -> None:
        pass


_Options = argparse.ArgumentParser | _Unused


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with `only` one command's (argparse spends milliseconds per
    sub-parser: a command gets just its own)."""
    parser = argparse.ArgumentParser(
        prog="hydra-watchdog",
        description="TabbyAPI's incident runbook as an on-node watchdog.",
        formatter_class=_Help,
    )
    parser.add_argument("--version", action="version", version=f"hydra-watchdog {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, *, config: bool = True) -> _Options:
        if only is not None and name != only:
            return _Unused()  # not this run's command: its options go nowhere
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_Help)
        if config:
            p.add_argument(
                "--config",
                default=os.environ.get("HYDRA_WATCHDOG_CONFIG", DEFAULT_CONFIG_PATH),
                help=f"config file (default {DEFAULT_CONFIG_PATH}, or $HYDRA_WATCHDOG_CONFIG)",
            )
        return p

    p = add("run", "run the daemon")
    p.add_argument("--dry-run", action="store_true", help="decide, log 'would …', never act")
    p.add_argument("--once", action="store_true", help="one cycle, then exit")
    p = add("status", "the current verdict (Nagios exit codes)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--runtime-dir", help="where the daemon writes status.json")
    p = add("check", "one observe + decide cycle: diagnosis and plan; never acts")
    p.add_argument("--json", action="store_true")
    add("verify", "the runbook's post-rebuild verification")
    p = add("pause", "maintenance mode: observe only")
    p.add_argument("--for", dest="duration", help='how long, e.g. "30m" (default: until resume)')
    p.add_argument("--reason", default="maintenance", help="shown in status and logs")
    add("resume", "leave maintenance mode")
    p = add("events", "recent events")
    p.add_argument("-n", type=int, default=20, help="how many (default 20)")
    p.add_argument("--json", action="store_true")
    p = add("incidents", "incidents: alert, cause, actions, time to recover")
    p.add_argument("--since", default="24h", help='how far back, e.g. "7d" (default 24h)')
    p.add_argument("--json", action="store_true")
    p = add("check-config", "validate the config; print it with secrets redacted")
    p.add_argument(
        "--file-only",
        action="store_true",
        help="check the file alone, not against this machine (its users): for a build sandbox",
    )
    # the demo builds its own simulated node and config: it takes none
    p = add("demo", "the daemon against a simulated node, with scripted incidents", config=False)
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
