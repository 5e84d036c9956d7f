"""The Grafana dashboard (dashboards/): the committed JSON is what the generator writes, and every
query in it names only metrics that the real exporter serves: the daemon's, scraped over HTTP
from its exporter while it watches the demo's simulated node through an incident."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("grafana_foundation_sdk", reason="dev extra grafana-foundation-sdk")

from dashboards import hydra_watchdog as generator
from hydra_watchdog.actions import UnitVerb
from hydra_watchdog.daemon import Daemon
from hydra_watchdog.demo import Demo
from hydra_watchdog.policy import decide
from hydra_watchdog.report.metrics import Metrics
from hydra_watchdog.sim.tabby_server import write_control

# PromQL's own words: functions, aggregations and keywords the queries use.
PROMQL = frozenset(
    {
        "sum",
        "max",
        "min",
        "avg",
        "count",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "rate",
        "increase",
        "histogram_quantile",
        "label_values",
    }
)


def queries(doc: Any) -> Iterator[str]:
    """Every PromQL text in the dashboard: panel targets and query variables."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            # a query variable's "query" is PromQL too; a data source variable's is a type name
            promql = key == "expr" or (key == "query" and "(" in str(value))
            if promql and isinstance(value, str):
                yield value
            else:
                yield from queries(value)
    elif isinstance(doc, list):
        for item in doc:
            yield from queries(item)


def metric_names(expr: str) -> set[str]:
    """The names an expression reads: what is left once label matchers, grouping clauses,
    range selectors, strings, numbers and PromQL's own words are taken out."""
    text = re.sub(r"label_values\(([^,]+),\s*\w+\s*\)", r"\1", expr)  # (metric, label)
    text = re.sub(r'"[^"]*"', "", text)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", text)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text))
    return {w for w in words if w not in PROMQL}


def exported(page: str) -> set[str]:
    """The series names of an exposition (histograms' _bucket/_sum/_count included)."""
    names = set()
    for line in page.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif kind == "counter":
                names |= {f"{name}_total", f"{name}_created"}
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The exporter's page from the real daemon after a crash it recovered from (so the
    incident families have samples too), fetched over HTTP."""
    demo = Demo(tmp_path_factory.mktemp("node"), out=lambda _line: None)
    metrics = Metrics()
    serving = metrics.serve("127.0.0.1:0")
    assert serving.ok, serving.detail
    daemon = Daemon(
        demo.cfg,
        adapters=demo.daemon.adapters,
        decide=decide,
        metrics=metrics,
        emit=lambda _event: None,
    )
    try:
        demo.unit.command(UnitVerb.START)

        def cycles_until(cond: Callable[[], bool], limit: float = 30.0) -> None:
            end = time.monotonic() + limit
            while not cond():
                assert time.monotonic() < end, daemon.state
                daemon.cycle()
                time.sleep(demo.cfg.watchdog.interval)

        def serving_now() -> bool:
            return daemon.state.phase.value == "healthy"

        cycles_until(serving_now)
        write_control(demo.node.control, exit_code=1)
        cycles_until(lambda: not serving_now())
        write_control(demo.node.control)
        cycles_until(serving_now)
        url = f"http://{serving.host}:{serving.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            page: str = resp.read().decode()
    finally:
        metrics.shutdown()
        demo.unit.stop_all()  # the demo's own daemon never ran: only the node to stop
    return page


def test_the_committed_dashboard_is_what_the_generator_writes() -> None:
    committed = generator.OUT.read_text(encoding="utf-8")
    assert committed == generator.render(), "run `make dashboard` and commit the result"


def test_every_query_names_a_metric_the_exporter_exports(scraped: str) -> None:
    names = exported(scraped)
    assert "hydra_watchdog_incidents_total" in names  # the page is the real, full one
    doc = json.loads(generator.OUT.read_text(encoding="utf-8"))
    found = list(queries(doc))
    assert len(found) >= 15, found
    used: set[str] = set()
    for expr in found:
        missing = metric_names(expr) - names
        assert not missing, f"{expr!r} reads {sorted(missing)}, which the exporter does not export"
        used |= metric_names(expr)
    # The dashboard shows what the issue asks for.
    for metric in (
        "hydra_watchdog_state",
        "hydra_watchdog_health_latency_seconds_bucket",
        "hydra_watchdog_vram_free_bytes",
        "hydra_watchdog_vram_required_bytes",
        "hydra_watchdog_power_limit_watts",
        "hydra_watchdog_power_limit_target_watts",
        "hydra_watchdog_restarts_total",
        "hydra_watchdog_incidents_total",
        "hydra_watchdog_incident_seconds_bucket",
    ):
        assert metric in used, metric


def test_the_name_check_catches_a_metric_nobody_exports(scraped: str) -> None:
    names = exported(scraped)
    bad = 'sum by (gpu) (rate(hydra_watchdog_vram_used_bytes{instance=~"$instance"}[5m]))'
    assert metric_names(bad) - names == {"hydra_watchdog_vram_used_bytes"}
    good = 'histogram_quantile(0.5, sum by (le) (rate(x_bucket{a="b"}[$__rate_interval])))'
    assert metric_names(good) == {"x_bucket"}
    assert metric_names("label_values(hydra_watchdog_stat, instance)") == {"hydra_watchdog_stat"}


def test_the_datasource_and_node_are_variables(tmp_path: Path) -> None:
    doc = json.loads(generator.OUT.read_text(encoding="utf-8"))
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for expr in queries(doc["panels"]):
        assert 'instance=~"$instance"' in expr, expr
