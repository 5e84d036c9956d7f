"""The whole alert loop for real: the chaos node's incidents, scraped by Prometheus, routed by
Alertmanager to a webhook of our own (issue 26). Used by tests/chaos/test_alert_loop.py (what
must hold) and by `make alerts` (bench/alerts.py: the table in bench/RESULTS.md).

Everything runs inside the chaos node's systemd namespace, whose loopback is its own: the
watchdog's exporter (hydra-watchdog.service, the real unit), Debian's `prometheus` and
`prometheus-alertmanager` binaries started here on free ports, and the recorder
(tests/harness/alert_recorder.py): the webhook receiver and a poller of Prometheus's alerts.

Time is compressed by FACTOR, as the chaos node's (and the demo's) watchdog is: its interval is
0.5 s against the default 5 s. The rules are prometheus/alerts.yml itself with every `for:` and
every range selector divided by FACTOR (`compress_rules`; TabbyAPIDown's 1m is 6s,
TabbyAPIRestartLoop's [10m] is [1m]); thresholds stay as they are (2 s of latency is 2 s).
Prometheus scrapes and evaluates every second; Alertmanager waits 3 s (its 30 s default /
FACTOR) before a group's first notification.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hydra_watchdog.incidents import AlertClass
from hydra_watchdog.sim import nvml_state
from tests.chaos.conftest import (
    CHAOS_CONFIG,
    CONFIG,
    GIB,
    PORT,
    STORE_LIB,
    TABBY_UNIT,
    VENV_BIN,
    ChaosNode,
)
from tests.harness.systemd_ns import REPO, SystemdNamespace

FACTOR = 10.0
RULES = REPO / "prometheus" / "alerts.yml"
ROOT = "/srv/hydra-alerts"  # inside the namespace
RECORDER = f"{ROOT}/recorder"
SCRAPE = "1s"
GROUP_WAIT = "3s"  # Alertmanager's 30 s default / FACTOR
GROUP_INTERVAL = "30s"  # its 5 min default / FACTOR
RUNBOOK_ALERTS = tuple(a.value for a in AlertClass)

_PART = re.compile(r"([0-9]+)(ms|s|m|h|d|w|y)")
_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_RANGE = re.compile(r"\[([0-9a-z]+)\]")


def prom_seconds(text: str) -> float:
    """A Prometheus duration ("1m", "1h30m", "500ms") in seconds."""
    parts = _PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{text!r} is not a Prometheus duration")
    return sum(int(n) * _UNIT[u] for n, u in parts)


def prom_duration(seconds: float) -> str:
    """Seconds as a Prometheus duration (whole milliseconds: it takes no fractions)."""
    ms = round(seconds * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def compress_rules(text: str, factor: float = FACTOR) -> str:
    """alerts.yml with every `for:` and range selector divided by `factor`."""
    doc = yaml.safe_load(text)
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = prom_duration(prom_seconds(rule["for"]) / factor)
            rule["expr"] = _RANGE.sub(
                lambda m: f"[{prom_duration(prom_seconds(m[1]) / factor)}]", rule["expr"]
            )
    return yaml.safe_dump(doc, sort_keys=False)


def alerts_config(metrics_port: int) -> str:
    """The chaos node's config with the exporter on and the runbook's numbers where the alerts
    have them: restarts counted in 10 minutes / FACTOR (the runbook's "more than 3 in 10
    minutes" and max_restarts 3 count the same restarts), slow above 2 s (a latency, not
    compressed), and a canary deadline of 30 s / FACTOR, above that latency: a slow TabbyAPI
    is slow, not hung."""
    settings = {
        "listen": f"127.0.0.1:{metrics_port}",
        "window": prom_duration(600 / FACTOR),
        "slow_threshold": "2s",
        "canary_deadline": prom_duration(30 / FACTOR),
    }
    text = CHAOS_CONFIG
    for key, value in settings.items():
        text, n = re.subn(rf'(?m)^{key} = ".*"$', f'{key} = "{value}"', text)
        assert n == 1, f"{key} appears {n} times in the chaos config"
    return text


def prometheus_config(metrics_port: int, alertmanager_port: int) -> str:
    return f"""global:
  scrape_interval: {SCRAPE}
  scrape_timeout: 900ms
  evaluation_interval: {SCRAPE}
rule_files: [{ROOT}/rules.yml]
alerting:
  alertmanagers:
    - static_configs: [{{targets: ["127.0.0.1:{alertmanager_port}"]}}]
scrape_configs:
  - job_name: hydra-watchdog
    static_configs: [{{targets: ["127.0.0.1:{metrics_port}"]}}]
"""


def alertmanager_config(webhook_port: int) -> str:
    return f"""route:
  receiver: webhook
  group_by: [alertname]
  group_wait: {GROUP_WAIT}
  group_interval: {GROUP_INTERVAL}
  repeat_interval: 1h
receivers:
  - name: webhook
    webhook_configs:
      - url: http://127.0.0.1:{webhook_port}/
        send_resolved: true
"""


@dataclass(frozen=True)
class Snapshot:
    t: float  # wall time the recorder saw this set of active alerts
    alerts: tuple[dict[str, Any], ...]

    def state(self, name: str) -> str | None:
        """pending, firing, or None (inactive)."""
        states = {a["state"] for a in self.alerts if a["name"] == name}
        return "firing" if "firing" in states else ("pending" if states else None)


@dataclass
class AlertStack:
    """Prometheus, Alertmanager and the recorder in the namespace, on free loopback ports."""

    ns: SystemdNamespace
    metrics_port: int
    spawned: list[Any] = field(default_factory=list)
    prometheus_port: int = 0
    alertmanager_port: int = 0

    def free_ports(self, n: int) -> list[int]:
        """n ports free on the namespace's loopback (nothing but this stack binds there)."""
        code = (
            f"import socket\nsocks = [socket.socket() for _ in range({n})]\n"
            "for s in socks: s.bind(('127.0.0.1', 0))\n"
            "print(' '.join(str(s.getsockname()[1]) for s in socks))"
        )
        out = self.ns.python(code)
        assert out.returncode == 0, out.stderr
        return [int(p) for p in out.stdout.split()]

    def host_path(self, inside: str) -> Path:
        return Path(self.ns.root + inside)

    def curl(self, url: str) -> str:
        return self.ns.run(["curl", "-sf", "-m", "5", url]).stdout

    def start(self) -> None:
        ns = self.ns
        ns.run(["rm", "-rf", ROOT])
        self.prometheus_port, self.alertmanager_port = self.free_ports(2)
        ns.write_file(f"{ROOT}/rules.yml", compress_rules(RULES.read_text(encoding="utf-8")))
        ns.write_file(
            f"{ROOT}/prometheus.yml", prometheus_config(self.metrics_port, self.alertmanager_port)
        )
        prom = f"http://127.0.0.1:{self.prometheus_port}"
        self.spawned.append(
            ns.spawn(
                [f"{VENV_BIN}/python", "-m", "tests.harness.alert_recorder", RECORDER, prom],
                cwd=str(REPO),
            )
        )
        port_file = self.host_path(f"{RECORDER}/port")
        ns.wait_for(port_file.exists, timeout=30, what="the webhook receiver's port")
        webhook = int(port_file.read_text())
        ns.write_file(f"{ROOT}/alertmanager.yml", alertmanager_config(webhook))
        checked = ns.run(["promtool", "check", "config", f"{ROOT}/prometheus.yml"])
        assert checked.returncode == 0, checked.stdout + checked.stderr
        self.spawned.append(
            ns.spawn(
                [
                    "prometheus-alertmanager",
                    f"--config.file={ROOT}/alertmanager.yml",
                    f"--storage.path={ROOT}/am",
                    f"--web.listen-address=127.0.0.1:{self.alertmanager_port}",
                    "--cluster.listen-address=",  # no gossip port: a single instance
                ]
            )
        )
        self.spawned.append(
            ns.spawn(
                [
                    "prometheus",
                    f"--config.file={ROOT}/prometheus.yml",
                    f"--storage.tsdb.path={ROOT}/tsdb",
                    f"--web.listen-address=127.0.0.1:{self.prometheus_port}",
                    "--rules.alert.resend-delay=1s",
                ]
            )
        )
        am = f"http://127.0.0.1:{self.alertmanager_port}"
        ns.wait_for(lambda: bool(self.curl(f"{am}/-/ready")), timeout=60, what="alertmanager")
        ns.wait_for(lambda: bool(self.curl(f"{prom}/-/ready")), timeout=60, what="prometheus")

    def stop(self) -> None:
        for proc in self.spawned:
            SystemdNamespace.kill_spawned(proc)
            proc.wait(timeout=30)
        self.spawned.clear()

    def target_up(self) -> bool:
        url = f"http://127.0.0.1:{self.prometheus_port}/api/v1/query?query=up"
        try:
            doc = json.loads(self.curl(url) or "{}")
        except ValueError:
            return False
        return any(r["value"][1] == "1" for r in doc.get("data", {}).get("result", []))

    def snapshots(self) -> list[Snapshot]:
        return [
            Snapshot(d["t"], tuple(d["alerts"]))
            for d in _jsonl(self.host_path(f"{RECORDER}/alerts.jsonl"))
        ]

    def notifications(self) -> list[tuple[float, dict[str, Any]]]:
        return [
            (d["t"], d["body"]) for d in _jsonl(self.host_path(f"{RECORDER}/notifications.jsonl"))
        ]

    def pages_since(self, t0: float, name: str) -> list[tuple[float, str]]:
        """(when, its cause annotation) of each notification since t0 with `name` firing."""
        return [
            (t, alert.get("annotations", {}).get("cause", ""))
            for t, body in self.notifications()
            if t >= t0
            for alert in body.get("alerts", [])
            if alert["labels"].get("alertname") == name and alert["status"] == "firing"
        ]

    def active(self, names: tuple[str, ...] = RUNBOOK_ALERTS) -> list[str]:
        snaps = self.snapshots()
        last = snaps[-1] if snaps else Snapshot(0.0, ())
        return [n for n in names if last.state(n) is not None]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --- the incidents ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    alert: str  # the runbook alert this incident is
    inject: Callable[[ChaosNode], None]
    fix: Callable[[ChaosNode], None] | None = None  # what the operator does, once `fix_when`
    fix_when: Callable[[ChaosNode, AlertStack], bool] | None = None
    in_ci: bool = False  # run by the test too, not only by `make alerts`
    note: str = ""


def _crash(node: ChaosNode) -> None:
    before = node.show()["MainPID"]
    node.faults(exit_code=1)
    node.wait(lambda: node.show()["MainPID"] not in ("0", before), 30, "a new MainPID")
    node.faults()


def _sticky(node: ChaosNode) -> None:
    node.faults(sticky_503=True)
    time.sleep(0.3)
    node.faults()  # the 503 stays: TabbyAPI never clears it


def _leak(node: ChaosNode) -> None:
    orphan = node.spawn_tabby_orphan(PORT + 100, "alerts-orphan")
    nvml_state.set_process(node.nvml(), 0, orphan, 28 * GIB)
    nvml_state.set_process(node.nvml(), 1, orphan, 20 * GIB)
    node.unload()


def _slow(node: ChaosNode) -> None:
    node.faults(slow_seconds=2.5)  # above the runbook's 2 s, within the health timeout (3 s)


def _remove_library(node: ChaosNode) -> None:
    node.ns.run(["rm", "-f", STORE_LIB], check=True)  # a NixOS rebuild dropped it
    node.systemctl("restart", TABBY_UNIT)  # and the operator's restart meets it


def _restore_library(node: ChaosNode) -> None:
    node.ns.run(["cp", f"{STORE_LIB}.keep", STORE_LIB], check=True)


def _crash_at_every_start(node: ChaosNode) -> None:
    node.faults(exit_code=1)


def _backoff_step(node: ChaosNode) -> int:
    return int((node.status().get("backoff") or {}).get("step") or 0)


SLOW_HOLD = 60.0  # seconds of slowness (10 minutes uncompressed): the watchdog never restarts


SCENARIOS = (
    Scenario("crash (exit 1)", AlertClass.DOWN, _crash, in_ci=True),
    Scenario("sticky /health 503", AlertClass.DOWN, _sticky, in_ci=True),
    Scenario("model unloaded", AlertClass.NO_MODEL, lambda n: n.unload(), in_ci=True),
    Scenario("leaked VRAM + model unloaded", AlertClass.NO_MODEL, _leak),
    Scenario(
        f"slow health (2.5 s for {SLOW_HOLD:g} s)",
        AlertClass.SLOW_HEALTH,
        _slow,
        fix=lambda n: n.faults(),
        fix_when=lambda n, _s: time.time() - n.t0 >= SLOW_HOLD,
        note="slowness is diagnosed, never restarted for: the operator's to fix",
    ),
    Scenario(
        "restart loop (crash at every start)",
        AlertClass.RESTART_LOOP,
        _crash_at_every_start,
        fix=lambda n: n.faults(),
        fix_when=lambda n, _s: _backoff_step(n) >= 2,
        note="fixed by the operator at back-off step 2",
    ),
    Scenario(
        "restart loop (library missing)",
        AlertClass.RESTART_LOOP,
        _remove_library,
        fix=_restore_library,
        fix_when=lambda n, s: bool(s.pages_since(n.t0, AlertClass.RESTART_LOOP)),
        in_ci=True,
        note="no restart can fix it: paged, the operator restores the library",
    ),
)


@dataclass
class Outcome:
    """What one incident did to the alerts."""

    scenario: str
    alert: str
    pending: bool = False  # the runbook's alert went pending (or firing)
    fired: bool = False  # it fired
    paged: bool = False  # Alertmanager's webhook got it firing: a page
    resolved_s: float | None = None  # fault -> the alert inactive again (None: never active)
    healthy_s: float | None = None  # fault -> the node serving again
    unresolved: bool = False  # still active when the wait ended
    cause: str = ""  # the page's cause annotation
    others: tuple[str, ...] = ()  # other runbook alerts that went pending or fired
    pages: list[tuple[float, str]] = field(default_factory=list)  # (after the fault, cause)
    note: str = ""
    incident: dict[str, Any] = field(default_factory=dict)  # `hydra-watchdog incidents`

    @property
    def page_avoided(self) -> bool:
        return self.pending and not self.fired


RESOLVE_LIMIT = 150.0  # seconds after healthy for the alert to go (the loop's window is 60 s)


def run_scenario(node: ChaosNode, stack: AlertStack, sc: Scenario) -> Outcome:
    """Reset the node, wait for a quiet sky, inject, let the watchdog (and the operator, where
    the scenario has one) work, then wait for every runbook alert to go; read what happened."""
    node.reset()
    node.ns.write_file(CONFIG, alerts_config(stack.metrics_port))
    node.start()  # serving, marked
    node.wait(stack.target_up, 60, "Prometheus scraping the exporter")
    node.wait(lambda: not stack.active(), RESOLVE_LIMIT, lambda: f"quiet: {stack.active()}")
    node.mark()
    t0 = node.t0
    sc.inject(node)
    fix, fix_when = sc.fix, sc.fix_when
    if fix is not None and fix_when is not None:
        node.wait(lambda: fix_when(node, stack), 180, lambda: f"{sc.name}: {node.describe()}")
        fix(node)
    out = Outcome(sc.name, sc.alert, note=sc.note)
    # status.json from before the fault must not pass for "serving again": first see it go.
    with contextlib.suppress(TimeoutError):
        node.wait(lambda: not node.serving(), 30, "the node not serving")
    out.healthy_s = node.wait(node.serving, 180, node.describe)
    time.sleep(3.0)  # a scrape and an evaluation past healthy: what was coming has come
    try:
        node.wait(lambda: not stack.active(), RESOLVE_LIMIT, "every runbook alert resolved")
    except TimeoutError:
        out.unresolved = True
    snaps = [s for s in stack.snapshots() if s.t >= t0]
    mine = [s.state(sc.alert) for s in snaps]
    out.pending = any(m is not None for m in mine)
    out.fired = "firing" in mine
    if out.pending and not out.unresolved:
        last = max(i for i, m in enumerate(mine) if m is not None)
        after = next((s.t for s in snaps[last + 1 :] if s.state(sc.alert) is None), None)
        out.resolved_s = None if after is None else after - t0
    out.others = tuple(
        n for n in RUNBOOK_ALERTS if n != sc.alert and any(s.state(n) for s in snaps)
    )
    out.pages = [(t - t0, cause) for t, cause in stack.pages_since(t0, sc.alert)]
    out.paged = bool(out.pages)
    out.cause = out.pages[0][1] if out.pages else ""  # what the first page said
    found = node.cli("incidents", "--json", "--since", "1h")
    listed = json.loads(found.stdout) if found.returncode == 0 else []
    out.incident = next((i for i in reversed(listed) if i["began"] >= t0 - 1), {})
    return out


def run(node: ChaosNode, scenarios: tuple[Scenario, ...]) -> list[Outcome]:
    """Every scenario on `node` under one alert stack (started on the node's exporter port)."""
    stack = AlertStack(node.ns, metrics_port=0)
    stack.metrics_port = stack.free_ports(1)[0]
    stack.start()
    try:
        return [run_scenario(node, stack, sc) for sc in scenarios]
    finally:
        stack.stop()


# --- the table ----------------------------------------------------------------------------------


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} s"


def table(outcomes: list[Outcome]) -> list[str]:
    """Markdown: one row per incident, then one per alert class."""
    lines = [
        "| incident | runbook alert | pending | page | fault → alert resolved | fault → "
        "serving | cause on the page | also pending |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        if o.fired:
            page = f"**paged** at {o.pages[0][0]:.1f} s" if o.pages else "fired, no page came"
        else:
            page = "avoided" if o.pending else "-"
        resolved = "NOT RESOLVED" if o.unresolved else _s(o.resolved_s)
        lines.append(
            f"| {o.scenario} | {o.alert} | {'yes' if o.pending else 'no'} | {page} | "
            f"{resolved} | {_s(o.healthy_s)} | {o.cause or '-'} | {', '.join(o.others) or '-'} |"
        )
    lines += [
        "",
        "| alert class | incidents | went pending | pages (fired) | pages avoided | "
        "fault → resolved, longest |",
        "|---|---|---|---|---|---|",
    ]
    for name in RUNBOOK_ALERTS:
        mine = [o for o in outcomes if o.alert == name]
        if not mine:
            continue
        times = [o.resolved_s for o in mine if o.resolved_s is not None]
        lines.append(
            f"| {name} | {len(mine)} | {sum(o.pending for o in mine)} | "
            f"{sum(o.fired for o in mine)} | {sum(o.page_avoided for o in mine)} | "
            f"{_s(max(times)) if times else '-'} |"
        )
    return lines
