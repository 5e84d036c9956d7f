"""Prometheus metrics: the watchdog's own state and decisions (dcgm-exporter covers the GPUs).

Gauges are read from the last StatusReport by a custom collector at scrape time, so the page is
always one consistent snapshot; counters and the latency histogram are fed as things happen.
Everything lives in this object's own CollectorRegistry (no process-global state, so two
instances, or a test beside the daemon, never clash). Label sets are small and fixed: phase
names, GPU indices, action names and result statuses.

The exporter binds exactly the configured host: prometheus_client's own default is 0.0.0.0,
which would publish the node's recovery state to the whole network. It is served by the bounded
PageServer (report/exporter.py), not prometheus_client's thread-per-connection server: any local
user can connect, and the exporter must not be a way to starve the daemon of descriptors.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from hydra_watchdog.incidents import AlertClass, Incident, IncidentOutcome
from hydra_watchdog.observation import Outcome
from hydra_watchdog.policy_state import RestartOrigin
from hydra_watchdog.report.exporter import PageServer
from hydra_watchdog.report.status import StatusReport
from hydra_watchdog.states import Phase, Rule

PREFIX = "hydra_watchdog"
RESTART_SOURCES = tuple(RestartOrigin)
# 2 s is the runbook's slow-health threshold: it must be a bucket boundary for the alert.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# Time to recover, from seconds (a crash the watchdog fixes) to hours (a human at night).
INCIDENT_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)
RULE_NAMES = frozenset(r.value for r in Rule)
# What generate_latest() writes (named here: older prometheus_client releases lack the constant).
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"
# /health outcomes that say nothing about TabbyAPI: no tabbyapi_up sample for them.
_NO_EVIDENCE = (Outcome.LOCAL_ERROR, Outcome.WITHHELD)


@dataclass(frozen=True)
class Serving:
    """What serve() did: ok with the bound address, or why not."""

    ok: bool
    host: str = ""
    port: int = 0
    detail: str = ""


def parse_listen(listen: str) -> tuple[str, int]:
    """'127.0.0.1:9835' or '[::1]:9835' -> (host, port); ValueError saying what is accepted."""
    host, sep, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{listen!r} is not 'host:port' like '127.0.0.1:9835'")
    return host, int(port)


class _ReportCollector:
    """Turns the last StatusReport into gauges when Prometheus scrapes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._report: StatusReport | None = None
        self._incident: Incident | None = None

    def set(self, report: StatusReport) -> None:
        with self._lock:
            self._report = report

    def set_incident(self, incident: Incident | None) -> None:
        with self._lock:
            self._incident = incident

    def _incident_families(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            inc = self._incident
        open_ = GaugeMetricFamily(
            f"{PREFIX}_incident_open",
            "1 while an incident is open: the runbook alert it stands for, and the rule of the "
            "cause the watchdog found (unknown: none yet; other: a rule this version lacks).",
            labels=["alert", "cause"],
        )
        if inc is not None:
            rule = inc.cause_rule or "unknown"
            open_.add_metric([inc.alert.value, rule if rule in RULE_NAMES else "other"], 1.0)
        yield open_
        yield GaugeMetricFamily(
            f"{PREFIX}_incident_human_needed",
            "1 while the open incident needs a human (escalated, blocked, or a cause no restart "
            "fixes); see `hydra-watchdog incidents`.",
            value=1.0 if inc is not None and inc.human_needed else 0.0,
        )

    def describe(self) -> list[Any]:
        return []  # the set of series depends on the report; nothing to check at registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            report = self._report
        if report is None:
            return
        yield from self._incident_families()
        state = GaugeMetricFamily(
            f"{PREFIX}_state",
            "1 for the watchdog's current phase, 0 for the others.",
            labels=["state"],
        )
        for phase in Phase:
            state.add_metric([phase.value], 1.0 if report.phase == phase.value else 0.0)
        yield state
        yield GaugeMetricFamily(
            f"{PREFIX}_last_cycle_timestamp_seconds",
            "Wall time of the last completed observe-decide-act cycle (0 before the first).",
            value=report.heartbeat if report.heartbeat is not None else 0.0,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_paused",
            "1 while in maintenance mode (observe only).",
            value=1.0 if report.paused.paused else 0.0,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_dry_run",
            "1 when actions are only logged, never executed.",
            value=1.0 if report.dry_run else 0.0,
        )
        # A probe the watchdog itself could not make (out of descriptors...), or did not make
        # (WITHHELD: the port's listener is not verified as TabbyAPI), says nothing about
        # TabbyAPI: no sample rather than a 0 that fires TabbyAPIDown.
        if report.health is not None and report.health.outcome not in _NO_EVIDENCE:
            yield GaugeMetricFamily(
                f"{PREFIX}_tabbyapi_up",
                "1 if TabbyAPI's /health answered healthy in the last cycle.",
                value=1.0 if report.health.healthy else 0.0,
            )
        if report.model.known:
            yield GaugeMetricFamily(
                f"{PREFIX}_model_loaded",
                "1 if TabbyAPI has a model loaded (as read from /v1/model).",
                value=1.0 if report.model.loaded else 0.0,
            )
        if report.model.vram_needed_bytes is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_vram_required_bytes",
                "VRAM the wanted model needs, summed over the GPUs.",
                value=float(report.model.vram_needed_bytes),
            )
        findings = GaugeMetricFamily(
            f"{PREFIX}_findings",
            "Findings (causes) in force, by rule; every rule is present, 0 when clear "
            '(e.g. rule="admin_key_rejected": TabbyAPI refuses the admin key).',
            labels=["rule"],
        )
        for rule in Rule:
            if rule is not Rule.RECOVERED:
                count = sum(1 for f in report.findings if f.rule == rule.value)
                findings.add_metric([rule.value], float(count))
        yield findings
        yield GaugeMetricFamily(
            f"{PREFIX}_restart_will_fail",
            "1 while TabbyAPI runs but its extension misses libraries (after a NixOS rebuild): "
            "the next restart would fail until the venv is rebuilt.",
            value=1.0 if any(f.rule == Rule.RESTART_WILL_FAIL for f in report.findings) else 0.0,
        )
        b = report.backoff
        remaining = 0.0
        if b.step and b.next_attempt_at is not None:
            remaining = max(0.0, b.next_attempt_at - report.generated_at)
        yield GaugeMetricFamily(
            f"{PREFIX}_backoff_seconds",
            "Seconds until the next start attempt of a restart loop (0: not backing off).",
            value=remaining,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_backoff_step", "Back-off step of a restart loop (0: none).", value=b.step
        )
        free = GaugeMetricFamily(f"{PREFIX}_vram_free_bytes", "Free VRAM per GPU.", labels=["gpu"])
        limit = GaugeMetricFamily(
            f"{PREFIX}_power_limit_watts", "Power limit in force per GPU.", labels=["gpu"]
        )
        target = GaugeMetricFamily(
            f"{PREFIX}_power_limit_target_watts",
            "Configured power limit per GPU (absent: left alone).",
            labels=["gpu"],
        )
        for g in report.gpus:
            if g.vram_free_bytes is not None:
                free.add_metric([str(g.index)], float(g.vram_free_bytes))
            if g.power_limit_w is not None:
                limit.add_metric([str(g.index)], g.power_limit_w)
            if g.power_target_w is not None:
                target.add_metric([str(g.index)], g.power_target_w)
        yield free
        yield limit
        yield target


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._report = _ReportCollector()
        self.registry.register(self._report)
        self._restarts = Counter(
            f"{PREFIX}_restarts",
            "TabbyAPI restarts: issued by the watchdog, or by systemd's Restart= (NRestarts).",
            ["by"],
            registry=self.registry,
        )
        for by in RESTART_SOURCES:
            self._restarts.labels(by=by)  # present from the start, so increase() sees the first
        self._actions = Counter(
            f"{PREFIX}_actions",
            "Actions the watchdog ran, by action name and result.",
            ["action", "result"],
            registry=self.registry,
        )
        self._latency = Histogram(
            f"{PREFIX}_health_latency_seconds",
            "Latency of TabbyAPI's /health probes that got an answer.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._incident_seconds = Histogram(
            f"{PREFIX}_incident_seconds",
            "Time to recover of each closed incident, from its first symptom to healthy again, "
            "by the runbook alert it stood for.",
            ["alert"],
            buckets=INCIDENT_BUCKETS,
            registry=self.registry,
        )
        self._incidents = Counter(
            f"{PREFIX}_incidents",
            "Closed incidents by runbook alert and outcome (recovered: by the watchdog alone; "
            "human: a human was needed).",
            ["alert", "outcome"],
            registry=self.registry,
        )
        for alert in AlertClass:
            self._incident_seconds.labels(alert=alert.value)
            for outcome in IncidentOutcome:
                self._incidents.labels(alert=alert.value, outcome=outcome.value)
        self._server: PageServer | None = None

    def record_incident(self, closed: Incident) -> None:
        """A closed incident: counted, and its time to recover observed."""
        seconds = closed.time_to_recover()
        self._incidents.labels(alert=closed.alert.value, outcome=closed.outcome.value).inc()
        if seconds is not None:
            self._incident_seconds.labels(alert=closed.alert.value).observe(seconds)

    def set_open_incident(self, incident: Incident | None) -> None:
        self._report.set_incident(incident)

    def update(self, report: StatusReport) -> None:
        self._report.set(report)

    def record_action(self, name: str, result: str) -> None:
        self._actions.labels(action=name, result=result).inc()

    def record_restart(self, by: str) -> None:
        if by not in RESTART_SOURCES:
            raise ValueError(f"restart source {by!r} is not one of {RESTART_SOURCES}")
        self._restarts.labels(by=by).inc()

    def observe_health_latency(self, seconds: float) -> None:
        self._latency.observe(seconds)

    def exposition(self) -> bytes:
        data: bytes = generate_latest(self.registry)
        return data

    def serve(self, listen: str) -> Serving:
        """Serve /metrics on exactly `listen` ('host:port'; port 0 picks a free one)."""
        if not listen:
            return Serving(ok=False, detail="metrics are off (metrics.listen is empty)")
        if self._server is not None:
            host, port = self._server.address
            return Serving(ok=True, host=host, port=port, detail="already serving")
        try:
            host, port = parse_listen(listen)
        except ValueError as exc:
            return Serving(ok=False, detail=str(exc))
        try:
            server = PageServer(host, port, self.exposition, content_type=TEXT_FORMAT)
        except OSError as exc:
            return Serving(ok=False, detail=f"cannot listen on {listen}: {exc.strerror or exc}")
        server.start()
        self._server = server
        bound_host, bound_port = server.address
        return Serving(ok=True, host=bound_host, port=bound_port)

    def shutdown(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
