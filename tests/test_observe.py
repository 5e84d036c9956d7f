# ruff: noqa: F811  (pytest fixtures imported from tests/harness are redefined as arguments)
"""The Observer against real adapters: TabbyAPI's simulator over HTTP, NVML through pynvml and
the simulated library, the /proc scanner, the host checks, and systemctl without systemd."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra_watchdog.actions import ActionResult, LoadModel, Reason, ResultStatus
from hydra_watchdog.adapters.gpu import NvmlGpu
from hydra_watchdog.adapters.host import HostProbe
from hydra_watchdog.adapters.procs import ProcScanner
from hydra_watchdog.adapters.systemd import SystemctlUnit
from hydra_watchdog.adapters.tabby import TabbyClient
from hydra_watchdog.config import Config, parse_config
from hydra_watchdog.interfaces import HostChecker, TabbyApi
from hydra_watchdog.observation import (
    Canary,
    Health,
    HostReport,
    HttpResult,
    Observation,
    Outcome,
    Probe,
    ProcessRole,
    UnitStatus,
)
from hydra_watchdog.observe import (
    MAX_CONFIRMATIONS,
    MODEL_QUIET,
    Observer,
    confirm_after,
    confirmations,
    judge_probes,
)
from hydra_watchdog.policy import decide
from hydra_watchdog.policy_state import PolicyState
from hydra_watchdog.states import Rule
from tests.harness.nvml import NvmlSim, nvml_sim, nvml_sim_library  # noqa: F401
from tests.harness.raw_http import RawServer, reply
from tests.harness.tabby import (  # noqa: F401
    ADMIN_KEY,
    SimProcess,
    TabbySims,
    tabby_sim,
    trusted_listener,
)


def _observer(
    sim: SimProcess,
    nvml: NvmlSim,
    tmp_path: Path,
    clock: Callable[[], float] = time.monotonic,
    **tabbyapi: Any,
) -> tuple[Observer, Config]:
    key = tmp_path / "admin_key"
    key.write_text(ADMIN_KEY)
    cfg = parse_config(
        {
            "tabbyapi": {
                "url": sim.url,
                "admin_key_file": str(key),
                "health_timeout": "1s",
                "slow_threshold": "500ms",
                "canary_deadline": "1s",
                "venv": "",
                "cmdline_patterns": [str(sim.install_dir)],
                **tabbyapi,
            },
            "model": {"name": "m1", "models_dir": str(sim.models_dir)},
            "gpu": {"nvml_library": str(nvml.library), "device": [{"index": 0}, {"index": 1}]},
        }
    )
    no_systemd = tmp_path / "root"
    no_systemd.mkdir()
    observer = Observer(
        cfg,
        tabby=TabbyClient.from_config(cfg),
        gpu=NvmlGpu.from_config(cfg),
        units=SystemctlUnit(cfg.tabbyapi.unit, root=str(no_systemd)),
        scanner=ProcScanner.from_config(cfg),
        host=HostProbe.from_config(cfg),
        clock=clock,
    )
    return observer, cfg


def test_cheap_probes_every_cycle(tabby_sim: TabbySims, nvml_sim: NvmlSim, tmp_path: Path) -> None:
    sim = tabby_sim.start(flavor="exl2", startup_model="m1")
    observer, _ = _observer(sim, nvml_sim, tmp_path)
    obs = observer.observe(frozenset())
    assert obs.health.healthy and obs.health.result.outcome is Outcome.OK
    assert obs.model is not None and obs.model.loaded == "m1"
    assert not obs.unit.available and "init system" in obs.unit.detail
    assert [g.index for g in obs.gpus.devices] == [0, 1]
    assert obs.port is not None and obs.port.owners(sim.port) == (sim.proc.pid,)
    assert obs.port.full_scan is False
    sim_proc = obs.process(sim.proc.pid)
    assert sim_proc is not None and sim_proc.role is ProcessRole.ORPHAN  # no unit owns it here
    assert obs.host.models_dir_ok and obs.host.model is not None and obs.host.model.usable
    # expensive probes were not asked for, so they did not run
    assert obs.canary is None
    assert obs.host.libraries_detail == "" and obs.host.journal_excerpt is None
    assert not any(r["path"] == "/v1/completions" for r in sim.requests())


def test_expensive_probes_only_when_wanted(
    tabby_sim: TabbySims, nvml_sim: NvmlSim, tmp_path: Path
) -> None:
    sim = tabby_sim.start(flavor="exl2", startup_model="m1")
    observer, _ = _observer(sim, nvml_sim, tmp_path)
    wants = frozenset({Probe.CANARY, Probe.PORT_SCAN, Probe.LIBRARIES, Probe.JOURNAL})
    obs = observer.observe(wants)
    assert obs.canary is not None and obs.canary.result.outcome is Outcome.OK
    assert obs.port is not None and obs.port.full_scan
    assert obs.host.libraries_detail == "no venv configured"  # the check ran
    assert obs.host.journal_excerpt is not None  # read (empty: no journal without systemd)
    # The simulator logs a request after answering it: the line may come just after the answer.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not _completions(sim):
        time.sleep(0.05)
    assert _completions(sim) == 1


def _completions(sim: SimProcess) -> int:
    return sum(r["path"] == "/v1/completions" for r in sim.requests())


def test_a_hung_tabbyapi_never_overruns_the_cycle_deadline(
    tabby_sim: TabbySims, nvml_sim: NvmlSim, tmp_path: Path
) -> None:
    sim = tabby_sim.start(flavor="exl2", startup_model="m1", faults={"hang": True})
    observer, _ = _observer(sim, nvml_sim, tmp_path)
    wants = frozenset({Probe.CANARY})
    started = time.monotonic()
    obs = observer.observe(wants)
    elapsed = time.monotonic() - started
    # issue 4: a cycle never overruns interval + the longest deadline (observation's part)
    assert elapsed <= observer.deadline(wants) + 0.1
    assert obs.health.result.outcome is Outcome.TIMEOUT and not obs.health.healthy
    # No model confirmed this cycle: no canary (on the exl2 build a completion sent with no
    # model loaded leaks the load lock and hangs every completion after it).
    assert obs.canary is None
    assert obs.gpus.devices  # the other probes still answered


class _StuckCanary:
    """The real client, except that its canary never comes back: a bug on our side, which the
    real client's deadline makes impossible to produce otherwise."""

    def __init__(self, inner: TabbyApi, release: threading.Event) -> None:
        self._inner = inner
        self._release = release

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def canary(self, deadline: float) -> Canary:
        self._release.wait(30)
        raise RuntimeError("released")


def test_a_canary_our_thread_failed_to_deliver_is_unknown_not_a_hang(
    tabby_sim: TabbySims, nvml_sim: NvmlSim, tmp_path: Path
) -> None:
    sim = tabby_sim.start(flavor="exl2", startup_model="m1")
    observer, _ = _observer(sim, nvml_sim, tmp_path)
    release = threading.Event()
    observer.tabby = _StuckCanary(observer.tabby, release)
    try:
        obs = observer.observe(frozenset({Probe.CANARY}))
        assert obs.health.healthy
        assert obs.canary is None  # never a made-up TIMEOUT: that would restart TabbyAPI
        again = observer.observe(frozenset({Probe.CANARY}))  # still stuck: not started again
        assert again.canary is None
    finally:
        release.set()


class _StuckHost:
    """The real host checks, except that they never come back in time: a bug on our side (the
    real checks bound their own calls), as a hung mount would look to an unbounded one."""

    def __init__(self, inner: HostChecker, release: threading.Event) -> None:
        self._inner = inner
        self._release = release

    def close(self) -> None:
        self._inner.close()

    def check(self, *, libraries: bool, unit: UnitStatus | None = None) -> HostReport:
        self._release.wait(30)
        return self._inner.check(libraries=libraries)


def test_a_host_check_that_did_not_answer_is_unknown_not_a_missing_mount(
    tabby_sim: TabbySims, nvml_sim: NvmlSim, tmp_path: Path
) -> None:
    sim = tabby_sim.start(flavor="exl2", startup_model="m1")
    observer, _ = _observer(sim, nvml_sim, tmp_path)
    release = threading.Event()
    observer.host = _StuckHost(observer.host, release)
    try:
        obs = observer.observe(frozenset())
        assert obs.health.healthy  # the other probes answered
        # never a made-up "missing": that would block every load and say CRITICAL
        assert obs.host.models_dir_ok is None
        assert obs.host.models_dir_detail.startswith("not checked: ")
    finally:
        release.set()
        observer.close()


def test_probes_run_on_long_lived_threads_not_one_per_cycle(
    tabby_sim: TabbySims, nvml_sim: NvmlSim, tmp_path: Path
) -> None:
    sim = tabby_sim.start(flavor="exl2", startup_model="m1")
    observer, _ = _observer(sim, nvml_sim, tmp_path)
    try:
        observer.observe(frozenset({Probe.CANARY}))
        lanes = {t for t in threading.enumerate() if t.name.startswith("probe-")}
        for _ in range(5):
            obs = observer.observe(frozenset({Probe.CANARY}))
            assert obs.health.healthy
        now = {t for t in threading.enumerate() if t.name.startswith("probe-")}
        assert now == lanes  # the same threads, none added per cycle
    finally:
        observer.close()


# --- a hang is confirmed within its cycle -------------------------------------------------------


def _health(outcome: Outcome, status: int | None = None) -> Health:
    return Health(HttpResult(outcome, 0.01, status, outcome.value), healthy=outcome is Outcome.OK)


def test_confirmations_go_out_after_a_tenth_of_the_timeout_at_most_half_a_second() -> None:
    assert confirm_after(5.0) == 0.5  # the production default: confirmations 0.5 s into the probe
    assert confirm_after(1.0) == 0.1
    assert confirm_after(30.0) == 0.5
    assert confirmations(3) == 2  # the first probe plus two make failures_before_down
    assert confirmations(1) == 0  # the first failed probe is the outage: nothing to confirm
    assert confirmations(50) == MAX_CONFIRMATIONS


def test_judge_probes_counts_failed_confirmations_and_any_healthy_answer_wins() -> None:
    ok, hung = _health(Outcome.OK, 200), _health(Outcome.TIMEOUT)
    refused, ours = _health(Outcome.REFUSED), _health(Outcome.LOCAL_ERROR)
    assert judge_probes(ok, ()) == (ok, 0)
    assert judge_probes(hung, ()) == (hung, 0)
    assert judge_probes(hung, (hung, refused)) == (hung, 2)
    # overlapping probes have no order: one healthy answer means the failed one was dropped
    assert judge_probes(hung, (hung, ok)) == (ok, 0)
    # no evidence about TabbyAPI: a confirmation our thread did not deliver or could not send
    assert judge_probes(hung, (None, ours)) == (hung, 0)
    assert judge_probes(hung, (None, hung)) == (hung, 1)


def _probing(url: str, observer: Observer, cfg: Config) -> Observer:
    """`observer` probing the test's own server at `url`, taken as TabbyAPI unchecked (no
    install tree of TabbyAPI's holds the test's process; the gate is tested in
    test_identity.py)."""
    observer.tabby = TabbyClient(
        url, admin_key=None, health_timeout=cfg.tabbyapi.health_timeout, gate=trusted_listener
    )
    return observer


class _HangingServer:
    """A real HTTP server on 127.0.0.1 that reads every request and never answers (TabbyAPI's
    hang): it records each request line with the client port of the connection it came on."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._lock = threading.Lock()
        self._requests: list[tuple[int, str]] = []
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self, line: str) -> list[int]:
        """The client ports that sent `line`, in arrival order."""
        with self._lock:
            return [port for port, got in self._requests if got == line]

    def _accept(self) -> None:
        while True:
            try:
                conn, addr = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._read, args=(conn, addr[1]), daemon=True).start()

    def _read(self, conn: socket.socket, port: int) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            try:
                chunk = conn.recv(4096)
            except OSError:
                return
            if not chunk:
                return
            data += chunk
        line = data.split(b"\r\n", 1)[0].decode("latin-1")
        with self._lock:
            self._requests.append((port, line))

    def close(self) -> None:
        self._sock.close()
        with self._lock:
            for conn in self._conns:
                conn.close()


def test_a_hang_is_confirmed_by_probes_on_their_own_connections_in_the_same_cycle(
    tabby_sim: TabbySims, nvml_sim: NvmlSim, tmp_path: Path
) -> None:
    sim = tabby_sim.start(flavor="exl2", startup_model="m1")
    server = _HangingServer()
    observer, cfg = _observer(sim, nvml_sim, tmp_path, url=server.url, failures_before_down=3)
    observer = _probing(server.url, observer, cfg)
    try:
        obs = observer.observe(frozenset())
        health = server.requests("GET /health HTTP/1.1")
        # the first probe and its two confirmations, each on a connection of its own
        assert len(health) == 3 and len(set(health)) == 3
        assert obs.health.result.outcome is Outcome.TIMEOUT and not obs.health.healthy
        assert obs.confirmations_failed == 2
        # ... which makes failures_before_down in this one cycle: the policy restarts now
        state, _ = decide(PolicyState(), obs, obs.at, cfg)
        assert state.failures == 3

        # Every confirmation ended within the cycle: the next cycle confirms again.
        again = observer.observe(frozenset())
        assert again.confirmations_failed == 2
        health = server.requests("GET /health HTTP/1.1")
        assert len(health) == 6 and len(set(health)) == 6
    finally:
        observer.close()
        server.close()


def test_failures_before_down_1_sends_no_confirmation(
    tabby_sim: TabbySims, nvml_sim: NvmlSim, tmp_path: Path
) -> None:
    sim = tabby_sim.start(flavor="exl2", startup_model="m1")
    server = _HangingServer()
    observer, cfg = _observer(sim, nvml_sim, tmp_path, url=server.url, failures_before_down=1)
    observer = _probing(server.url, observer, cfg)
    try:
        obs = observer.observe(frozenset())
        assert len(server.requests("GET /health HTTP/1.1")) == 1
        assert obs.health.result.outcome is Outcome.TIMEOUT and obs.confirmations_failed == 0
    finally:
        observer.close()
        server.close()


def _confirm_lanes() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("probe-confirm-")}


def test_a_probe_that_answers_in_time_sends_no_confirmation(
    tabby_sim: TabbySims, nvml_sim: NvmlSim, tmp_path: Path
) -> None:
    sim = tabby_sim.start(flavor="exl2", startup_model="m1")
    # confirmations 0.5 s into the probe: a loopback /health answers long before
    observer, _ = _observer(sim, nvml_sim, tmp_path, health_timeout="5s", slow_threshold="2s")
    before = _confirm_lanes()
    try:
        for _ in range(3):
            obs = observer.observe(frozenset())
            assert obs.health.healthy and obs.confirmations_failed == 0
        assert _confirm_lanes() == before  # no confirmation lane was ever started
    finally:
        observer.close()


def test_a_slow_but_healthy_tabbyapi_answers_its_confirmations_and_stays_healthy(
    tabby_sim: TabbySims, nvml_sim: NvmlSim, tmp_path: Path
) -> None:
    # Every answer takes 0.5 s, past confirm_after(1 s) = 0.1 s and within the 1 s timeout.
    sim = tabby_sim.start(flavor="exl2", startup_model="m1", faults={"slow_seconds": 0.5})
    observer, cfg = _observer(sim, nvml_sim, tmp_path)
    try:
        obs = observer.observe(frozenset())
        assert obs.health.healthy and obs.confirmations_failed == 0
        state, _ = decide(PolicyState(), obs, obs.at, cfg)
        assert state.failures == 0
        # the confirmations did go out (the first probe was late), and were answered
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(_answered_health(sim)) < 3:
            time.sleep(0.05)
        assert [r["status"] for r in _answered_health(sim)] == [200, 200, 200]
    finally:
        observer.close()


def _answered_health(sim: SimProcess) -> list[dict[str, Any]]:
    return [r for r in sim.requests() if r["path"] == "/health"]


# --- /v1/model while no model is loaded (issue 23 item 5) ---------------------------------------


def _model_asks(sim: SimProcess, at_least: int = 0) -> int:
    """GET /v1/model requests the simulator answered (it logs each just after answering)."""
    deadline = time.monotonic() + 5
    while True:
        asked = sum(1 for r in sim.requests() if r["path"] == "/v1/model")
        if asked >= at_least or time.monotonic() > deadline:
            return asked
        time.sleep(0.02)


def test_no_model_is_asked_once_a_minute_unless_something_changed(
    tabby_sim: TabbySims, nvml_sim: NvmlSim, tmp_path: Path
) -> None:
    sim = tabby_sim.start(flavor="exl2")  # no model loaded: each ask is an ERROR line there
    now = [1000.0]
    observer, _ = _observer(sim, nvml_sim, tmp_path, clock=lambda: now[0])
    first = observer.observe(frozenset())
    assert first.model is not None and first.model.known and first.model.fresh
    assert _model_asks(sim, 1) == 1

    for _ in range(5):  # nothing changed: the last answer, not fresh, and no request
        now[0] += 5.0
        quiet = observer.observe(frozenset())
        assert quiet.model is not None and not quiet.model.fresh
        assert (quiet.model.known, quiet.model.loaded) == (True, None)
    assert _model_asks(sim) == 1

    now[0] += MODEL_QUIET  # a minute on: asked again
    assert _fresh(observer.observe(frozenset()))
    wanted = observer.observe(frozenset({Probe.MODEL}))  # the policy wants it before a load
    assert _fresh(wanted)
    load = LoadModel("m1", None, Reason(Rule.NO_MODEL, "test"))
    ended = ActionResult(load, ResultStatus.FAILED, "cancelled", now[0])
    assert _fresh(observer.observe(frozenset(), results=(ended,)))  # a load of ours ended
    assert _model_asks(sim, 4) == 4
    assert not _fresh(observer.observe(frozenset()))

    # A model loaded by hand is seen at the next ask, within the minute.
    client = TabbyClient(sim.url, admin_key=ADMIN_KEY, health_timeout=5, gate=trusted_listener)
    try:
        done = client.load_model(
            "m1", timeout=30, on_progress=lambda *_: None, cancel=threading.Event()
        )
    finally:
        client.close()
    assert done.ok
    now[0] += MODEL_QUIET
    seen = observer.observe(frozenset())
    assert seen.model is not None and seen.model.loaded == "m1" and seen.model.fresh
    now[0] += 1.0  # with a model loaded, every cycle asks (no ERROR line in TabbyAPI's log)
    assert _fresh(observer.observe(frozenset()))


def _fresh(obs: Observation) -> bool:
    return obs.model is not None and bool(obs.model.fresh)


def test_json_nested_too_deeply_is_a_bad_answer_not_a_timeout(
    tabby_sim: TabbySims, nvml_sim: NvmlSim, tmp_path: Path
) -> None:
    """json.loads gives up on nesting deeper than the interpreter recurses (RecursionError):
    a /health answer like that is malformed (BAD_BODY, as any other garbage), never a probe
    that "crashed" and so counted as a timeout."""
    sim = tabby_sim.start(flavor="exl2", startup_model="m1")
    deep = b'{"status":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with RawServer(default=reply(200, "application/json", deep)) as server:
        observer, cfg = _observer(sim, nvml_sim, tmp_path, url=server.url)
        observer = _probing(server.url, observer, cfg)
        try:
            obs = observer.observe(frozenset())
        finally:
            observer.close()
        assert server.seen  # it was asked
    assert (obs.health.result.outcome, obs.health.result.status) == (Outcome.BAD_BODY, 200)
    assert "nested too deeply" in obs.health.result.detail
