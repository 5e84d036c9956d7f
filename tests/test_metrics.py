"""The Prometheus exporter, served for real on 127.0.0.1 and linted by `promtool check metrics`."""

from __future__ import annotations

import dataclasses
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hydra_watchdog.observation import Health, HttpResult, ModelStatus, Outcome
from hydra_watchdog.report.metrics import LATENCY_BUCKETS, Metrics, parse_listen
from hydra_watchdog.report.status import ModelInfo, PauseInfo, StatusReport, replace
from hydra_watchdog.states import Phase
from tests.test_status_report import STATE, build, observation

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian: prometheus)")


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    m = Metrics()
    yield m
    m.shutdown()


def scrape(host: str, port: int) -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=30) as resp:
        assert resp.status == 200
        body: bytes = resp.read()
    return body.decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, "check", "metrics"],
        check=False,
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
    )


def fed(metrics: Metrics, report: StatusReport) -> Metrics:
    metrics.update(report)
    metrics.record_action("restart_unit", "ok")
    metrics.record_action("restart_unit", "ok")
    metrics.record_action("kill_orphan", "refused")
    metrics.record_restart("watchdog")
    metrics.record_restart("systemd")
    metrics.record_restart("systemd")
    for seconds in (0.012, 0.3, 2.5):
        metrics.observe_health_latency(seconds)
    return metrics


@needs_promtool
def test_served_exposition_passes_promtool(metrics: Metrics) -> None:
    fed(metrics, build())
    serving = metrics.serve("127.0.0.1:0")
    assert serving.ok, serving.detail
    assert serving.host == "127.0.0.1"
    assert serving.port > 0
    text = scrape(serving.host, serving.port)
    result = promtool_check(text)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "", result.stdout  # no lint warnings either


@needs_promtool
def test_exposition_before_the_first_cycle_passes_promtool(metrics: Metrics) -> None:
    text = metrics.exposition().decode()
    result = promtool_check(text)
    assert result.returncode == 0, result.stdout + result.stderr
    values = samples(text)
    assert values[("hydra_watchdog_restarts_total", (("by", "watchdog"),))] == 0
    assert values[("hydra_watchdog_restarts_total", (("by", "systemd"),))] == 0
    assert not any(name == "hydra_watchdog_state" for name, _ in values)


def test_values_from_the_report_and_the_counters(metrics: Metrics) -> None:
    values = samples(fed(metrics, build()).exposition().decode())
    states = {
        labels[0][1]: v for (name, labels), v in values.items() if name == "hydra_watchdog_state"
    }
    assert set(states) == {p.value for p in Phase}
    assert states == {p.value: (1.0 if p is Phase.BACKOFF else 0.0) for p in Phase}
    assert values[("hydra_watchdog_tabbyapi_up", ())] == 0
    assert values[("hydra_watchdog_backoff_seconds", ())] == 60
    assert values[("hydra_watchdog_backoff_step", ())] == 2
    assert values[("hydra_watchdog_vram_free_bytes", (("gpu", "0"),))] == 12 * 1024**3
    assert values[("hydra_watchdog_vram_required_bytes", ())] == 48 * 1024**3
    assert values[("hydra_watchdog_power_limit_watts", (("gpu", "0"),))] == 400
    assert values[("hydra_watchdog_power_limit_target_watts", (("gpu", "0"),))] == 450
    assert values[("hydra_watchdog_paused", ())] == 0
    assert values[("hydra_watchdog_last_cycle_timestamp_seconds", ())] == build().heartbeat
    assert values[("hydra_watchdog_restarts_total", (("by", "systemd"),))] == 2
    assert values[("hydra_watchdog_restarts_total", (("by", "watchdog"),))] == 1
    key = ("hydra_watchdog_actions_total", (("action", "restart_unit"), ("result", "ok")))
    assert values[key] == 2
    key = ("hydra_watchdog_actions_total", (("action", "kill_orphan"), ("result", "refused")))
    assert values[key] == 1
    assert values[("hydra_watchdog_health_latency_seconds_count", ())] == 3
    # 2 s is the runbook's threshold: the 2.5 s probe must land above that boundary.
    assert 2.0 in LATENCY_BUCKETS
    assert values[("hydra_watchdog_health_latency_seconds_bucket", (("le", "2.0"),))] == 2


def test_model_loaded_and_up_follow_the_latest_report(metrics: Metrics) -> None:
    healthy = Health(HttpResult(Outcome.OK, 0.01, 200), True)
    empty = build(
        state=dataclasses.replace(STATE, phase=Phase.NO_MODEL),
        obs=observation(
            health=healthy, model=ModelStatus(HttpResult(Outcome.OK, 0.01, 200), None, True)
        ),
    )
    metrics.update(empty)
    values = samples(metrics.exposition().decode())
    assert values[("hydra_watchdog_tabbyapi_up", ())] == 1
    assert values[("hydra_watchdog_model_loaded", ())] == 0
    loaded = replace(empty, model=ModelInfo(wanted=empty.model.wanted, loaded="M", known=True))
    metrics.update(loaded)
    assert samples(metrics.exposition().decode())[("hydra_watchdog_model_loaded", ())] == 1


@pytest.mark.parametrize(
    ("outcome", "why"),
    [
        (Outcome.LOCAL_ERROR, "out of file descriptors"),
        # issue 22: the port's listener is not verified as TabbyAPI, /health was not sent
        (Outcome.WITHHELD, "port 5000 held by pid 9, uid 65534 (...): not TabbyAPI"),
    ],
)
def test_a_probe_not_made_is_no_tabbyapi_up_sample(
    metrics: Metrics, outcome: Outcome, why: str
) -> None:
    # Issue 10: out of descriptors, the watchdog did not ask TabbyAPI; a 0 would fire
    # TabbyAPIDown (hydra_watchdog_tabbyapi_up == 0 for 1m).
    blind = Health(HttpResult(outcome, 0.0, None, why), False)
    metrics.update(build(obs=observation(health=blind)))
    values = samples(metrics.exposition().decode())
    assert ("hydra_watchdog_tabbyapi_up", ()) not in values
    assert values[("hydra_watchdog_paused", ())] == 0  # the rest of the page is there


def test_paused_gauge(metrics: Metrics) -> None:
    report = build()
    metrics.update(replace(report, paused=PauseInfo(paused=True)))
    assert samples(metrics.exposition().decode())[("hydra_watchdog_paused", ())] == 1


def test_unknown_restart_source_is_rejected(metrics: Metrics) -> None:
    with pytest.raises(ValueError, match="watchdog"):
        metrics.record_restart("cron")


def test_instances_have_their_own_registries() -> None:
    a, b = Metrics(), Metrics()
    a.record_restart("watchdog")
    key = ("hydra_watchdog_restarts_total", (("by", "watchdog"),))
    assert samples(a.exposition().decode())[key] == 1
    assert samples(b.exposition().decode())[key] == 0


def test_serve_binds_exactly_the_given_host_and_shuts_down(metrics: Metrics) -> None:
    serving = metrics.serve("127.0.0.1:0")
    assert serving.ok
    assert metrics._server is not None
    assert metrics._server.address[0] == "127.0.0.1"
    assert "hydra_watchdog_restarts_total" in scrape("127.0.0.1", serving.port)
    metrics.shutdown()
    with pytest.raises(urllib.error.URLError):
        scrape("127.0.0.1", serving.port)


def test_serve_ipv6_loopback(metrics: Metrics) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1 on this machine")
    serving = metrics.serve("[::1]:0")
    assert serving.ok, serving.detail
    assert serving.host == "::1"
    assert "hydra_watchdog" in scrape("[::1]", serving.port)


def test_serve_reports_a_busy_port_instead_of_raising(metrics: Metrics) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        serving = metrics.serve(f"127.0.0.1:{port}")
    assert not serving.ok
    assert f"cannot listen on 127.0.0.1:{port}" in serving.detail


@pytest.mark.parametrize("listen", ["", "9835", "localhost:", ":9835", "127.0.0.1:http", "h:70000"])
def test_serve_rejects_bad_listen_values(metrics: Metrics, listen: str) -> None:
    serving = metrics.serve(listen)
    assert not serving.ok
    assert serving.detail


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9835") == ("127.0.0.1", 9835)
    assert parse_listen("[::1]:9835") == ("::1", 9835)
    with pytest.raises(ValueError, match="host:port"):
        parse_listen("0.0.0.0")


def test_restart_will_fail_gauge_follows_the_finding(metrics: Metrics) -> None:
    from hydra_watchdog.policy_state import Finding
    from hydra_watchdog.states import Rule, Severity

    key = ("hydra_watchdog_restart_will_fail", ())
    metrics.update(build(dataclasses.replace(STATE, findings=())))
    assert samples(metrics.exposition().decode())[key] == 0
    warn = Finding(Rule.RESTART_WILL_FAIL, Severity.WARNING, "libcudart.so.12 not found")
    metrics.update(build(dataclasses.replace(STATE, findings=(warn,))))
    assert samples(metrics.exposition().decode())[key] == 1
