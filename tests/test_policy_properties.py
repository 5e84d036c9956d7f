"""Invariants of decide() under random fault sequences (hypothesis).

A tiny model of the node turns actions into effects (a restart brings the process back after a
startup delay, a load takes a few cycles and may fail, a kill removes the orphan), and hypothesis
draws the faults. After every step the invariants of the core issue are checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from dataclasses import replace as dc_replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hydra_watchdog.actions import (
    Action,
    ActionResult,
    KillOrphan,
    LoadModel,
    ResultStatus,
    SetPowerLimit,
    UnitCommand,
    UnitVerb,
)
from hydra_watchdog.observation import Observation, Outcome, ProcessInfo, ProcessRole
from hydra_watchdog.policy import decide
from hydra_watchdog.policy_state import PolicyState
from hydra_watchdog.states import Rule
from tests.policy_kit import (
    CFG,
    MAIN,
    canary,
    gpus,
    loading,
    model,
    obs,
    ok,
    paused,
    ports,
    proc,
    refused,
    sticky,
    timeout,
    unit,
)

EVENTS = [
    "none",
    "none",
    "none",
    "crash",
    "hang",
    "sticky",
    "gen_hang",
    "lose_model",
    "orphan_vram",
    "orphan_port",
    "power_drift",
    "pause",
    "resume",
    "break",
    "fix",
    "slow",
]


@dataclass
class Node:
    t: float = 0.0
    up: bool = True
    auto_restart_at: float | None = None
    started_at: float = -100.0
    n_restarts: int = 0
    broken: bool = False  # crashes on every start
    hang: bool = False
    sticky: bool = False
    gen_hang: bool = False
    slow: bool = False
    model: str | None = "M"
    load: tuple[str, float, bool] | None = None  # model, done at, fails
    orphans: list[ProcessInfo] = field(default_factory=list)
    limit0: float = 450.0
    paused: bool = False
    results: list[ActionResult] = field(default_factory=list)
    next_pid: int = 1000

    def inject(self, event: str) -> None:
        match event:
            case "crash":
                self._crash()
            case "hang":
                self.hang = True
            case "sticky":
                self.sticky = True
            case "gen_hang":
                self.gen_hang = True
            case "lose_model":
                self.model = None
            case "orphan_vram" | "orphan_port":
                self.next_pid += 1
                listens = (5000,) if event == "orphan_port" else ()
                vram = 10.0 if event == "orphan_vram" else 0.0
                self.orphans.append(
                    proc(self.next_pid, ProcessRole.ORPHAN, gpu_gib=vram, listens=listens)
                )
            case "power_drift":
                self.limit0 = 575.0
            case "pause":
                self.paused = True
            case "resume":
                self.paused = False
            case "break":
                self.broken = True
            case "fix":
                self.broken = False
            case "slow":
                self.slow = not self.slow

    def _crash(self) -> None:
        self.up, self.model, self.load = False, None, None
        self.hang = self.sticky = self.gen_hang = False
        self.auto_restart_at = self.t + 2.0  # systemd Restart= with RestartSec=2

    def _start(self) -> None:
        self.up, self.started_at, self.auto_restart_at = True, self.t, None
        self.hang = self.sticky = self.gen_hang = False
        self.model, self.load = None, None

    def advance(self, dt: float) -> None:
        self.t += dt
        if self.auto_restart_at is not None and self.t >= self.auto_restart_at:
            self.n_restarts += 1
            self._start()
        if self.up and self.broken and self.t - self.started_at > 1.0:
            self._crash()
        if self.load is not None and self.t >= self.load[1]:
            name, _, fails = self.load
            self.load = None
            act = next(a for a in reversed(self.issued) if isinstance(a, LoadModel))
            if fails or not self.up:
                self.results.append(ActionResult(act, ResultStatus.FAILED, "OOM", self.t))
            else:
                self.model = name
                self.results.append(ActionResult(act, ResultStatus.OK, "confirmed", self.t))

    issued: list[Action] = field(default_factory=list)

    def observe(self) -> Observation:
        starting = self.up and self.t - self.started_at < 4.0
        if not self.up or starting:
            health = refused()
        elif self.hang:
            health = timeout()
        elif self.sticky:
            health = sticky()
        else:
            health = ok(latency=2.5 if self.slow else 0.02)
        active = (
            ("active", "running")
            if self.up
            else (
                ("activating", "auto-restart")
                if self.auto_restart_at is not None
                else ("inactive", "dead")
            )
        )
        listeners = [(5000, o.pid) for o in self.orphans if o.listens_on]
        if self.up and not starting:
            listeners.append((5001 if listeners else 5000, 100))
        free0 = 30.0 - sum(10.0 for o in self.orphans if o.gpu_bytes)
        results, self.results = tuple(self.results), []
        return obs(
            self.t,
            health=health,
            unit=unit(*active, n=self.n_restarts, enter=self.started_at),
            model=model(self.model) if health.healthy else None,
            canary=canary(Outcome.TIMEOUT if self.gen_hang else Outcome.OK)
            if health.healthy
            else None,
            gpus=gpus(free0=max(free0, 0.0), limit0=self.limit0),
            port=ports(*listeners),
            processes=(*(MAIN for _ in [0] if self.up), *self.orphans),
            load=loading(self.load[0], self.t) if self.load else None,
            pause=paused() if self.paused else None,
            results=results,
        )

    def apply(self, actions: tuple[Action, ...], fail_loads: bool) -> None:
        for a in actions:
            self.issued.append(a)
            status = ResultStatus.OK
            match a:
                case UnitCommand(verb=UnitVerb.STOP):
                    self.up, self.auto_restart_at, self.model, self.load = False, None, None, None
                case UnitCommand(verb=UnitVerb.START | UnitVerb.RESTART):
                    self._start()
                case KillOrphan(pid=pid):
                    self.orphans = [o for o in self.orphans if o.pid != pid]
                case LoadModel(model=name):
                    self.load = (name, self.t + 3.0, fail_loads)
                    status = ResultStatus.IN_PROGRESS
                case SetPowerLimit(watts=w):
                    self.limit0 = w
            self.results.append(ActionResult(a, status, "done", self.t))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(st.sampled_from(EVENTS), min_size=20, max_size=120),
    fail_loads=st.booleans(),
    dt=st.sampled_from([0.5, 1.0, 3.0]),
)
def test_invariants_hold_under_random_faults(
    events: list[str], fail_loads: bool, dt: float
) -> None:
    cfg = CFG
    dry = dc_replace(cfg, watchdog=dc_replace(cfg.watchdog, dry_run=True))
    node = Node()
    state = PolicyState()
    restarts: list[float] = []
    for event in events:
        node.inject(event)
        o = node.observe()
        prev = state
        state, actions = decide(prev, o, o.at, cfg)

        # dry-run changes no decision
        assert decide(prev, o, o.at, dry) == (state, actions)
        # every action has a reason
        for a in actions:
            assert isinstance(a.reason.rule, Rule) and a.reason.evidence.strip()
        # no action while paused
        if node.paused:
            assert actions == ()
        # no kill of a process not classified as an orphan (with the same identity)
        for a in actions:
            if isinstance(a, KillOrphan):
                target = o.process(a.pid)
                assert target is not None and target.role is ProcessRole.ORPHAN
                assert (target.start_ticks, target.uid) == (a.start_ticks, a.uid)
        # never two loads in flight
        loads = [a for a in actions if isinstance(a, LoadModel)]
        assert len(loads) <= 1
        if loads:
            assert node.load is None and not prev.load_in_flight
        # back-off never decreases until it is reset, and resets only after reset_after of health
        if state.backoff_step < prev.backoff_step:
            assert state.backoff_step == 0
            assert prev.healthy_since is not None or state.healthy_since is not None
            since = state.healthy_since if state.healthy_since is not None else o.at
            assert o.at - since >= cfg.restart_loop.reset_after
        # the watchdog never issues more than max_restarts restarts in any window
        for a in actions:
            if isinstance(a, UnitCommand) and a.verb in (UnitVerb.START, UnitVerb.RESTART):
                restarts.append(o.at)
        window, most = cfg.restart_loop.window, cfg.restart_loop.max_restarts
        for i, t in enumerate(restarts):
            assert sum(1 for u in restarts[: i + 1] if t - u < window) <= most

        node.apply(actions, fail_loads)
        node.advance(dt)
