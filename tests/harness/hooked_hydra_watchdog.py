"""`hydra-watchdog run` with the tests' hang hook, injected through run_daemon's `before_cycle`.

While the hang file exists, the loop stops at the start of its next cycle, so it stops sending
WATCHDOG=1: what a hung loop looks like to systemd (the chaos suite's scenario 14b, and
tests/test_daemon.py). The production daemon has no such hook and reads no test switch.

Run as a script (the chaos suite's ExecStart) or imported (tests/test_daemon.py's runner). The
file name carries "hydra_watchdog" because `hydra-watchdog status` recognizes the daemon's process
by its command line (report/status.py, daemon_problem).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from hydra_watchdog.daemon import run_daemon

POLL = 0.2  # seconds between looks at the hang file


def hang_while(path: Path) -> Callable[[], None]:
    """A `before_cycle` hook that blocks the loop while `path` exists."""

    def hook() -> None:
        while path.exists():
            time.sleep(POLL)

    return hook


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--hang-file", required=True, type=Path)
    args = parser.parse_args(argv)
    return run_daemon(args.config, before_cycle=hang_while(args.hang_file))


if __name__ == "__main__":
    sys.exit(main())
