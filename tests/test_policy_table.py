"""The plan is a table (policy.PLAN) and the README's runbook table is checked against it: a
rule added to one and not the other fails here."""

from __future__ import annotations

import re
from pathlib import Path

from hydra_watchdog.config import Config
from hydra_watchdog.findings import FINDERS
from hydra_watchdog.policy import PLAN
from hydra_watchdog.policy_state import PolicyState
from hydra_watchdog.situation import Situation
from hydra_watchdog.states import Rule
from tests.policy_kit import obs

README = Path(__file__).resolve().parents[1] / "README.md"


def _runbook_table() -> dict[str, set[str]]:
    """{runbook section: the HYDRA_RULE values its row names}."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## How the runbook maps to rules", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or cells[0] in ("Runbook section", "") or set(cells[0]) <= {"-"}:
            continue
        rows[cells[0]] = set(re.findall(r"`([a-z_]+)`", cells[1]))
    return rows


def test_every_plan_rule_is_in_its_readme_row() -> None:
    table = _runbook_table()
    for rule in PLAN:
        if not rule.runbook:
            continue
        assert rule.runbook in table, f"{rule.name}: no README row {rule.runbook!r}"
        missing = {r.value for r in rule.rules} - table[rule.runbook]
        assert not missing, f"{rule.name}: README row {rule.runbook!r} lacks {sorted(missing)}"


def test_every_rule_value_is_documented_in_the_table() -> None:
    documented = set().union(*_runbook_table().values())
    undocumented = {r.value for r in Rule if r is not Rule.RECOVERED} - documented
    assert not undocumented, f"README's runbook table lacks {sorted(undocumented)}"
    unknown = documented - {r.value for r in Rule}
    assert not unknown, f"README names rules that do not exist: {sorted(unknown)}"


def test_plan_names_are_unique_and_the_last_rule_catches_all() -> None:
    names = [r.name for r in PLAN]
    assert len(names) == len(set(names))
    situation = Situation(PolicyState(), obs(0.0), 0.0, Config(), (), ())
    assert PLAN[-1].name == "down" and PLAN[-1].when(situation)
    # The healthy side settles the back-off; the unhealthy side must not.
    healthy_side = [r.name for r in PLAN if r.settles]
    assert healthy_side == [
        "generation_hang",
        "no_model",
        "loading",
        "key_rejected",
        "key_rejected_serving",
        "unverified",
        "fallback_serving",
        "slow",
        "canary_impossible",
        "model_unknown",
        "healthy",
    ]


def test_diagnose_is_a_tuple_of_finders() -> None:
    assert len(FINDERS) == len(set(FINDERS)) >= 10
    assert all(callable(f) for f in FINDERS)
