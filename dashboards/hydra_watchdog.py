"""The node's Grafana dashboard as code: `python -m dashboards.hydra_watchdog` writes
dashboards/hydra-watchdog.json (`make dashboard`); tests/test_dashboard.py checks that the
committed file is what this produces, and that every query names a metric the exporter exports.

Built with grafana-foundation-sdk, Grafana Labs' own builders generated from Grafana's schemas
(released with each Grafana version; the 11.6 build is pinned in pyproject's dev extras so the
output is reproducible). grafanalib, the other choice, has had no release since January 2024.

Every query is over the watchdog's own metrics (report/metrics.py), of the instance picked at the
top, from a Prometheus data source picked there too: the file imports into any Grafana, and the
NixOS module provisions it (services.hydra-watchdog.grafanaDashboard).
"""

from __future__ import annotations

import sys
from pathlib import Path

from grafana_foundation_sdk.builders import (
    bargauge,
    dashboard,
    stat,
    statetimeline,
    table,
    timeseries,
)
from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    DynamicConfigValue,
    RangeMap,
    RegexMap,
    SpecialValueMap,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
    VariableRefresh,
)

from hydra_watchdog.incidents import AlertClass
from hydra_watchdog.report.metrics import LATENCY_BUCKETS
from hydra_watchdog.states import Phase

OUT = Path(__file__).with_name("hydra-watchdog.json")
UID = "hydra-watchdog-node"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
SEL = 'instance=~"$instance"'  # every query: the instance picked at the top
SLOW_S = 2.0  # the runbook's TabbyAPISlowHealthCheck threshold, a bucket boundary
LOOP_RESTARTS = 4  # TabbyAPIRestartLoop: more than 3 in 10 minutes
if SLOW_S not in LATENCY_BUCKETS:  # the line would sit between two buckets
    raise RuntimeError(f"{SLOW_S} s is not a bucket of hydra_watchdog_health_latency_seconds")

# Phases by how bad they are, for the verdict and the timeline (states.py's verdicts).
_COLOURS = {"OK": "green", "WARNING": "yellow", "CRITICAL": "red", "UNKNOWN": "purple"}


def q(expr: str, legend: str = "", ref: str = "A") -> Dataquery:
    query = Dataquery().expr(expr).ref_id(ref).datasource(DATASOURCE)
    return query.legend_format(legend) if legend else query


def steps(*pairs: tuple[float | None, str]) -> dashboard.ThresholdsConfig:
    return (
        dashboard.ThresholdsConfig()
        .mode(ThresholdsMode.ABSOLUTE)
        .steps([Threshold(value=v, color=c) for v, c in pairs])
    )


def phase_mapping() -> list[ValueMap | RangeMap | RegexMap | SpecialValueMap]:
    """1 on a phase's series: its name, in the colour of its verdict; 0: nothing."""
    return [
        ValueMap(
            {
                "0": ValueMappingResult(text=" ", color="transparent", index=0),
                "1": ValueMappingResult(text="on", color="blue", index=1),
            }
        )
    ]


def verdict() -> stat.Panel:
    panel = (
        stat.Panel()
        .title("Phase now")
        .description("The watchdog's phase; `hydra-watchdog status` on the node tells why.")
        .with_target(q(f"hydra_watchdog_state{{{SEL}}} == 1", "{{state}}"))
        .text_mode(common.BigValueTextMode.NAME)
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]))
        .height(5)
        .span(6)
    )
    for phase in Phase:
        colour = _COLOURS[phase.verdict.name]
        panel = panel.override_by_name(
            phase.value, [_prop("color", {"mode": "fixed", "fixedColor": colour})]
        )
    return panel


def _prop(name: str, value: object) -> DynamicConfigValue:
    return DynamicConfigValue(id_val=name, value=value)


def open_incident() -> stat.Panel:
    return (
        stat.Panel()
        .title("Open incident (cause)")
        .description(
            "The runbook alert of the incident the watchdog has open, and the rule of the "
            "cause it found; `hydra-watchdog incidents` on the node tells the whole story."
        )
        .with_target(q(f"hydra_watchdog_incident_open{{{SEL}}} == 1", "{{alert}}: {{cause}}"))
        .text_mode(common.BigValueTextMode.NAME)
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .no_value("none")
        .thresholds(steps((None, "orange")))
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]))
        .height(5)
        .span(6)
    )


def human_needed() -> stat.Panel:
    return (
        stat.Panel()
        .title("Human needed")
        .with_target(q(f"hydra_watchdog_incident_human_needed{{{SEL}}}"))
        .mappings(
            [
                ValueMap(
                    {
                        "0": ValueMappingResult(text="no", color="green", index=0),
                        "1": ValueMappingResult(text="YES", color="red", index=1),
                    }
                )
            ]
        )
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]))
        .height(5)
        .span(4)
    )


def up_and_model() -> stat.Panel:
    return (
        stat.Panel()
        .title("TabbyAPI up / model loaded")
        .with_target(q(f"hydra_watchdog_tabbyapi_up{{{SEL}}}", "up", "A"))
        .with_target(q(f"hydra_watchdog_model_loaded{{{SEL}}}", "model", "B"))
        .mappings(
            [
                ValueMap(
                    {
                        "0": ValueMappingResult(text="no", color="red", index=0),
                        "1": ValueMappingResult(text="yes", color="green", index=1),
                    }
                )
            ]
        )
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .text_mode(common.BigValueTextMode.VALUE_AND_NAME)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]))
        .height(5)
        .span(8)
    )


def phase_timeline() -> statetimeline.Panel:
    return (
        statetimeline.Panel()
        .title("Phase timeline")
        .with_target(q(f"hydra_watchdog_state{{{SEL}}}", "{{state}}"))
        .mappings(phase_mapping())
        .show_value(common.VisibilityMode.NEVER)
        .merge_values(True)
        .fill_opacity(80)
        .height(8)
        .span(24)
    )


def health_latency() -> timeseries.Panel:
    rate = f"rate(hydra_watchdog_health_latency_seconds_bucket{{{SEL}}}[$__rate_interval])"
    return (
        timeseries.Panel()
        .title(f"/health latency against the runbook's {SLOW_S:g} s")
        .description(
            "Median and 95th percentile of the watchdog's /health probes; TabbyAPISlowHealthCheck "
            f"fires when the 5-minute median stays above {SLOW_S:g} s for 5 minutes."
        )
        .with_target(q(f"histogram_quantile(0.5, sum by (le) ({rate}))", "median", "A"))
        .with_target(q(f"histogram_quantile(0.95, sum by (le) ({rate}))", "p95", "B"))
        .unit("s")
        .min(0)
        .thresholds(steps((None, "green"), (SLOW_S, "red")))
        .thresholds_style(
            cb.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.LINE)
        )
        .height(8)
        .span(12)
    )


def vram() -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title("VRAM free per GPU against the model's need")
        .description(
            "Free VRAM per GPU (NVML) and what the wanted model needs, summed over the GPUs: "
            "the check the watchdog makes before it loads (runbook: Before Loading Large Models)."
        )
        .with_target(q(f"hydra_watchdog_vram_free_bytes{{{SEL}}}", "gpu{{gpu}} free", "A"))
        .with_target(q(f"sum(hydra_watchdog_vram_free_bytes{{{SEL}}})", "all GPUs free", "B"))
        .with_target(q(f"hydra_watchdog_vram_required_bytes{{{SEL}}}", "required", "C"))
        .unit("bytes")
        .min(0)
        .height(8)
        .span(12)
    )


def power() -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title("Power limit per GPU against its target")
        .with_target(q(f"hydra_watchdog_power_limit_watts{{{SEL}}}", "gpu{{gpu}} limit", "A"))
        .with_target(
            q(f"hydra_watchdog_power_limit_target_watts{{{SEL}}}", "gpu{{gpu}} target", "B")
        )
        .unit("watt")
        .height(8)
        .span(12)
    )


def restarts() -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title("Restarts in 10 minutes, by origin")
        .description(
            "TabbyAPI restarts issued by the watchdog or by systemd's Restart=; "
            f"TabbyAPIRestartLoop fires at {LOOP_RESTARTS} in 10 minutes (the line)."
        )
        .with_target(
            q(
                f"sum by (by) (increase(hydra_watchdog_restarts_total{{{SEL}}}[10m]))",
                "by {{by}}",
            )
        )
        .draw_style(common.GraphDrawStyle.BARS)
        .stacking(cb.StackingConfig().mode(common.StackingMode.NORMAL))
        .fill_opacity(60)
        .min(0)
        .decimals(0)
        .thresholds(steps((None, "green"), (LOOP_RESTARTS, "red")))
        .thresholds_style(
            cb.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.LINE)
        )
        .height(8)
        .span(12)
    )


def incidents() -> bargauge.Panel:
    return (
        bargauge.Panel()
        .title("Incidents in the range, by alert and outcome")
        .description("Closed incidents: recovered by the watchdog alone, or needing a human.")
        .with_target(
            q(
                "sum by (alert, outcome) "
                f"(increase(hydra_watchdog_incidents_total{{{SEL}}}[$__range]))",
                "{{alert}} {{outcome}}",
            )
        )
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]))
        .decimals(0)
        .min(0)
        .height(8)
        .span(12)
    )


def time_to_recover() -> table.Panel:
    rate = f"increase(hydra_watchdog_incident_seconds_bucket{{{SEL}}}[$__range])"
    mean = (
        f"sum by (alert) (increase(hydra_watchdog_incident_seconds_sum{{{SEL}}}[$__range])) / "
        f"sum by (alert) (increase(hydra_watchdog_incident_seconds_count{{{SEL}}}[$__range]))"
    )
    return (
        table.Panel()
        .title("Time to recover, by alert (range)")
        .description(
            "From the first symptom to healthy again (a passing canary after a restart), per "
            f"runbook alert: {', '.join(a.value for a in AlertClass)}."
        )
        .with_target(q(mean, "mean", "A").instant())
        .with_target(
            q(f"histogram_quantile(0.95, sum by (le, alert) ({rate}))", "p95", "B").instant()
        )
        .unit("s")
        .decimals(1)
        .height(8)
        .span(12)
    )


def actions() -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title("Actions by result")
        .with_target(
            q(
                "sum by (action, result) "
                f"(increase(hydra_watchdog_actions_total{{{SEL}}}[$__rate_interval]))",
                "{{action}} {{result}}",
            )
        )
        .draw_style(common.GraphDrawStyle.BARS)
        .min(0)
        .decimals(0)
        .height(8)
        .span(24)
    )


def build() -> dashboard.Dashboard:
    datasource = dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus")
    instance = (
        dashboard.QueryVariable("instance")
        .label("node")
        .datasource(DataSourceRef(type_val="prometheus", uid="${datasource}"))
        .query("label_values(hydra_watchdog_state, instance)")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .include_all(False)
    )
    return (
        dashboard.Dashboard("hydra-watchdog: TabbyAPI node")
        .uid(UID)
        .description(
            "hydra-watchdog's view of its node: the phase, the runbook's signals and the "
            "incidents it handled (dashboards/hydra_watchdog.py)."
        )
        .tags(["hydra-watchdog", "tabbyapi"])
        .refresh("30s")
        .time("now-6h", "now")
        .timezone(common.TimeZoneBrowser)
        .with_variable(datasource)
        .with_variable(instance)
        .with_row(dashboard.Row("Now"))
        .with_panel(verdict())
        .with_panel(open_incident())
        .with_panel(human_needed())
        .with_panel(up_and_model())
        .with_panel(phase_timeline())
        .with_row(dashboard.Row("The runbook's signals"))
        .with_panel(health_latency())
        .with_panel(restarts())
        .with_panel(vram())
        .with_panel(power())
        .with_row(dashboard.Row("Incidents"))
        .with_panel(incidents())
        .with_panel(time_to_recover())
        .with_panel(actions())
    )


def render() -> str:
    return JSONEncoder(sort_keys=True, indent=2).encode(build().build()) + "\n"


def main(argv: list[str]) -> int:
    if argv == ["--write"]:
        OUT.write_text(render(), encoding="utf-8")
        print(f"wrote {OUT}")
        return 0
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
