"""bench/RESULTS.md has two writers: `make bench` (bench/report.py) writes the file, `make alerts`
(bench/alerts.py) its own section. Each must leave the other's part as it was."""

from __future__ import annotations

import time
from pathlib import Path

from bench.alerts import ALERTS_BEGIN, ALERTS_END, alerts_section, render, with_section
from bench.report import write_report

SECTION = f"{ALERTS_BEGIN}\n## The alert loop\n\n| a | b |\n{ALERTS_END}"


def test_the_alerts_section_is_appended_once_then_replaced_in_place() -> None:
    bench = "# hydra-watchdog benchmarks\n\n## Targets\n\n- MET\n"
    first = with_section(bench, SECTION)
    assert first.startswith(bench.rstrip("\n")) and alerts_section(first) == SECTION
    newer = SECTION.replace("| a | b |", "| c | d |")
    second = with_section(first + "\ntrailing words\n", newer)
    assert alerts_section(second) == newer
    assert second.count(ALERTS_BEGIN) == 1
    assert second.startswith(bench.rstrip("\n")) and second.endswith("\ntrailing words\n")
    assert alerts_section("no section here") == ""


def test_make_bench_keeps_the_alerts_section(tmp_path: Path) -> None:
    (tmp_path / "RESULTS.md").write_text("# old benchmarks\n\nold figures\n\n" + SECTION + "\n")
    md, _ = write_report(
        {"compression": 5.0, "trials": 1},
        tmp_path,
        command="python -m bench",
        started=time.time(),
        finished=time.time(),
    )
    text = md.read_text()
    assert "old figures" not in text  # the benchmarks' part is rewritten
    assert text.startswith("# hydra-watchdog benchmarks")
    assert alerts_section(text) == SECTION  # the alert loop's is kept


def test_the_section_says_how_it_was_made() -> None:
    text = render(["| x |"], command="make alerts", started=0.0, finished=90.0)
    assert text.startswith(ALERTS_BEGIN) and text.endswith(ALERTS_END)
    assert "Made by `make alerts` on 1970-01-01 00:00 UTC, 1.5 min" in text
    assert "compressed 10x" in text and "| x |" in text
