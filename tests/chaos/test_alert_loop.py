"""The alert loop for real (issue 26): the runbook's incidents on the chaos node under real
systemd, the real exporter scraped every second by Debian's Prometheus with prometheus/alerts.yml
compressed like the node's clock, Alertmanager paging a webhook of our own (alert_loop.py).

What must hold: a restart loop the watchdog cannot fix (a library gone) pages, and the page
carries the cause the watchdog found; every incident the watchdog (or, for the loop, the
operator) fixes has its alert resolved again. The full table, with the incidents only `make
alerts` runs, is in bench/RESULTS.md.
"""

from __future__ import annotations

import shutil

import pytest

from tests.chaos.alert_loop import SCENARIOS, Outcome, compress_rules, prom_seconds, run, table
from tests.chaos.conftest import ChaosNode
from tests.harness.systemd_ns import REPO

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.systemd,
    pytest.mark.skipif(
        shutil.which("prometheus") is None or shutil.which("prometheus-alertmanager") is None,
        reason="Debian packages prometheus and prometheus-alertmanager",
    ),
]


def test_the_compressed_rules_are_the_shipped_ones_with_shorter_clocks() -> None:
    import yaml

    shipped = yaml.safe_load((REPO / "prometheus" / "alerts.yml").read_text())
    compressed = yaml.safe_load(compress_rules((REPO / "prometheus" / "alerts.yml").read_text()))
    pairs = [
        (a, b)
        for g, h in zip(shipped["groups"], compressed["groups"], strict=True)
        for a, b in zip(g["rules"], h["rules"], strict=True)
    ]
    assert len(pairs) == 7
    for a, b in pairs:
        assert (a["alert"], a["labels"], a["annotations"]) == (
            b["alert"],
            b["labels"],
            b["annotations"],
        )
        if "for" in a:
            assert prom_seconds(b["for"]) == prom_seconds(a["for"]) / 10
    loop = next(b for a, b in pairs if a["alert"] == "TabbyAPIRestartLoop")
    assert "[60s]" in loop["expr"]


@pytest.mark.timeout(900)  # about 2 minutes here; a loaded machine takes longer
def test_the_unfixable_loop_pages_with_its_cause_and_the_fixed_incidents_resolve(
    chaos_node: ChaosNode,
) -> None:
    outcomes = run(chaos_node, tuple(s for s in SCENARIOS if s.in_ci))
    shown = "\n".join(table(outcomes))
    print(shown)  # the table of this run, for the log
    by_name: dict[str, Outcome] = {o.scenario: o for o in outcomes}
    loop = by_name["restart loop (library missing)"]
    assert loop.fired and loop.paged, shown
    assert loop.cause == "missing_libraries", shown
    assert loop.incident.get("alert") == "TabbyAPIRestartLoop", loop.incident
    assert loop.incident.get("cause_rule") == "missing_libraries", loop.incident
    assert loop.incident.get("outcome") == "human", loop.incident
    for o in outcomes:
        assert not o.unresolved, shown
        assert o.healthy_s is not None, shown
        assert o.incident, f"{o.scenario}: no incident recorded"
        assert o.incident["alert"] == o.alert, (o.scenario, o.incident)
    # A pending alert that resolved was seen going: its time is measured.
    assert all(o.resolved_s is not None for o in outcomes if o.pending), shown
