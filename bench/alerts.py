"""`make alerts`, `python -m bench.alerts [--only NAME,...]`: the whole alert loop (issue 26).

Boots systemd in a throw-away namespace, lays out the chaos node in it (tests/chaos/conftest.py),
runs every incident of tests/chaos/alert_loop.py under a real Prometheus and Alertmanager, prints
the table, and writes it into bench/RESULTS.md as the section between ALERTS_BEGIN and ALERTS_END
(added at the end the first time); the rest of the file, which `make bench` writes, stays as it
is (and `make bench` keeps this section: bench/report.py). Needs root; without it, says why and
exits 0 (a skip).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
ALERTS_BEGIN = "<!-- alerts: begin (make alerts writes this section; make bench keeps it) -->"
ALERTS_END = "<!-- alerts: end -->"


def alerts_section(text: str) -> str:
    """The section as it stands in `text` (markers included), or "" when there is none."""
    start, end = text.find(ALERTS_BEGIN), text.find(ALERTS_END)
    if start < 0 or end < start:
        return ""
    return text[start : end + len(ALERTS_END)]


def with_section(text: str, section: str) -> str:
    """`text` with its alerts section replaced by `section`, or `section` appended."""
    old = alerts_section(text)
    if old:
        return text.replace(old, section)
    return text.rstrip("\n") + "\n\n" + section + "\n"


def render(lines: list[str], *, command: str, started: float, finished: float) -> str:
    from tests.chaos.alert_loop import FACTOR, GROUP_INTERVAL, GROUP_WAIT, SCRAPE

    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    return "\n".join(
        [
            ALERTS_BEGIN,
            "## The alert loop (issue 26)",
            "",
            f"Made by `{command}` on {when}, {(finished - started) / 60:.1f} min: the chaos "
            "node's incidents under a real systemd 252, hydra-watchdog's real unit and "
            f"exporter, Debian's Prometheus scraping and evaluating every {SCRAPE} with "
            f"prometheus/alerts.yml compressed {FACTOR:g}x (every `for:` and range divided "
            f"by {FACTOR:g}, as the node's clock: TabbyAPIDown pends 6 s, TabbyAPIRestartLoop "
            "counts in 1 min), Alertmanager (group_wait "
            f"{GROUP_WAIT}, group_interval {GROUP_INTERVAL}) paging a webhook. A page is a "
            "notification that reached the webhook; a page avoided, an alert that went "
            "pending and resolved before its `for:` ran out. Times from the fault.",
            "",
            *lines,
            ALERTS_END,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO))  # tests.* is not installed; the checkout has it
    from tests.chaos.alert_loop import SCENARIOS, run, table
    from tests.chaos.conftest import install_chaos_node, remove_chaos_node
    from tests.harness.systemd_ns import SystemdNamespace, unavailable_reason

    parser = argparse.ArgumentParser(prog="python -m bench.alerts", description=__doc__)
    parser.add_argument("--only", default="", help="comma list of incident names (default all)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in {s.name for s in SCENARIOS}]
    if unknown:
        parser.error(f"--only: unknown {unknown}; known: {[s.name for s in SCENARIOS]}")
    chosen = tuple(s for s in SCENARIOS if not names or s.name in names)
    reason = unavailable_reason()
    if reason is not None:
        print(f"alerts skipped: cannot boot systemd in a namespace here: {reason}")
        return 0
    command = (
        "make alerts"
        if argv is None and not sys.argv[1:]
        else ("python -m bench.alerts " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
    )
    started = time.time()
    with SystemdNamespace() as ns:
        node = install_chaos_node(ns)
        try:
            outcomes = run(node, chosen)
        finally:
            remove_chaos_node(node)
    finished = time.time()
    lines = table(outcomes)
    section = render(lines, command=command, started=started, finished=finished)
    old = args.results.read_text(encoding="utf-8") if args.results.exists() else ""
    args.results.write_text(with_section(old, section), encoding="utf-8")
    print("\n".join(lines))
    for o in outcomes:
        print(f"{o.scenario}: pages (s after the fault, cause) {o.pages}; incident {o.incident}")
    print(f"\nwrote the alert loop's section of {args.results}")
    bad = [o.scenario for o in outcomes if o.unresolved or o.healthy_s is None]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
