"""Command line: hydra-watchdog run|status|check|verify|pause|resume|events|check-config|demo."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("hydra-watchdog: under construction", file=sys.stderr)
    return 3
