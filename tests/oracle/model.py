"""A model of the node the watchdog looks after, independent of the policy's code.

It knows the truth (is TabbyAPI really serving? when did systemd restart it? which orphan
survives SIGKILL?) and shows the watchdog only what its probes would: `observe()` builds the
cycle's Observation the way the daemon does (expensive probes only when the previous decision
asked for them, the results of the previous actions), `execute()` runs a decision's actions the
way the executor does (in order; after a failure the rest are SKIPPED) with realistic outcomes,
and `advance()` moves time, event by event (crashes, systemd's RestartSec, loads finishing).

Imports only data types: observation, actions, config, policy_state (none here), states.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra_watchdog.actions import (
    Action,
    ActionResult,
    CheckFallbackRoute,
    KillOrphan,
    LoadModel,
    ResetGpu,
    ResultStatus,
    SetPowerLimit,
    UnitCommand,
    UnitVerb,
)
from hydra_watchdog.config import Config
from hydra_watchdog.errors import ErrorKind
from hydra_watchdog.observation import (
    Canary,
    GpuProcess,
    GpuReport,
    GpuSnapshot,
    Health,
    HostReport,
    HttpResult,
    Listener,
    LoadProgress,
    ModelDir,
    ModelStatus,
    Observation,
    Outcome,
    PauseRequest,
    PortReport,
    PowerInfo,
    Probe,
    ProcessInfo,
    ProcessRole,
    SystemLink,
    UnitStatus,
)

GIB = 1024**3
TABBY_CMD = ("/opt/tabbyapi/venv/bin/python", "/opt/tabbyapi/main.py")
FOREIGN_CMD = ("/usr/bin/python3", "-m", "http.server", "5000")
GPU0_TOTAL = 32 * GIB
MAIN_GIB, FALLBACK_GIB = 20, 8  # what the models really take (the config says the same)
STARTUP_S = 4.0  # TabbyAPI loads its startup model before it opens the port
RESTART_SEC = 2.0  # systemd RestartSec=
CRASH_AFTER_S = 1.0  # a broken install (missing library, bad config) dies this soon
LOAD_S = 3.0  # a model load through the API
START_LIMIT = (5, 60.0)  # StartLimitBurst=, StartLimitIntervalSec= of the unit


@dataclass
class Proc:
    """A process the watchdog could see: an orphan or a foreign one."""

    pid: int
    role: ProcessRole
    cmdline: tuple[str, ...]
    listens: tuple[int, ...] = ()
    gpu_bytes: int = 0
    unkillable: bool = False  # in D state: SIGKILL does not take it

    def info(self) -> ProcessInfo:
        return ProcessInfo(
            self.pid,
            1.7e9 + self.pid,
            self.cmdline,
            self.role,
            self.gpu_bytes,
            self.listens,
            start_ticks=10_000 + self.pid,
            uid=0 if self.role is ProcessRole.ORPHAN else 65534,
        )


@dataclass(frozen=True)
class Truth:
    """What really is, after a cycle's actions ran: the oracle's side of a record."""

    t: float
    running: bool
    pid: int
    gen_hang: bool
    loaded: str | None
    serving: str | None
    main_loadable: bool  # nothing blocks the main model: mount, folder, its own load
    paused: bool
    libs_missing: bool  # a start now would fail (the running process keeps what it mapped)
    host_hung: bool  # the host check (folders, libraries) does not answer
    main_folder_version: int  # changes when the main model's folder is mended
    main_folder_usable: bool  # mounted and there
    fallback_folder_usable: bool
    limit0: float  # gpu0's power limit now
    systemd: bool
    unit_exists: bool
    auto_restart_pending: bool
    start_refused: bool
    in_the_way: bool  # an orphan or a foreign process on the port or holding VRAM
    crashy: bool
    impaired: bool
    starts: tuple[tuple[float, str], ...]  # (at, "watchdog" | "systemd"): every start that ran
    text: str

    def restarts_within(self, window: float, by: str | None = None) -> int:
        return sum(
            1 for at, who in self.starts if self.t - at <= window and (by is None or who == by)
        )


@dataclass
class Node:
    """The truth. Times are the watchdog's monotonic seconds (`t0` shifts the whole trace)."""

    cfg: Config
    t: float = 0.0
    # systemd and the unit
    systemd: bool = True
    unit_exists: bool = True
    running: bool = True  # TabbyAPI's main process exists
    stopped_by_us: bool = False  # inactive after a stop (not failed)
    auto_restart_at: float | None = None
    result: str = "success"
    exit_status: int = 0
    n_restarts: int = 0
    invocation: int = 1
    started_at: float = -1000.0
    pid: int = 100
    # what the process does
    hung: bool = False  # /health times out
    sticky: bool = False  # /health 503 until restarted
    gen_hang: bool = False  # generation stuck: the canary times out, /health still 200
    canary_error: str = ""  # "500" or "body": completions fail, /health 200
    slow: bool = False
    loaded: str | None = "M"
    load: tuple[str, float] | None = None  # (model, finishes at)
    load_known: bool = False  # the watchdog's executor tracks it (lost when it restarts)
    load_action: LoadModel | None = None
    # host
    libs_missing: bool = False
    system_generation: int = 41  # the NixOS system link; a switch moves it
    mount_ok: bool = True
    main_folder_ok: bool = True
    main_folder_version: int = 1  # its mtime, in effect: mended folders are new
    fallback_folder_ok: bool = True
    main_load_fails: bool = False  # e.g. a corrupt shard: the main model cannot load
    main_unsupported: bool = False  # a permanent load error: "no longer supported"
    main_busy: bool = False  # loads of the main model fail at once (HTTP 503), nothing unloaded
    stale_copies: bool = False  # the model folders show though the mount is gone
    host_hung: bool = False  # the host check times out (a hung NFS mount)
    key: str = "admin"  # the key the watchdog sends: "admin", "api" (reads only), "wrong"
    crashy: bool = False  # dies CRASH_AFTER_S after every start (cause: libs or config)
    crash_times: list[float] = field(default_factory=list)  # scheduled single crashes
    # processes
    orphans: list[Proc] = field(default_factory=list)
    foreign: list[Proc] = field(default_factory=list)
    next_pid: int = 1000
    port_moved: bool = False  # TabbyAPI found 5000 busy at start and took 5001
    _seen_generation: int = 41  # the system link the observer read last
    # GPUs, power, routes, the watchdog's own world
    limit0: float = 450.0
    power_refused: bool = False
    route_ok: bool = True
    start_refused: bool = False  # systemd refuses the job (a dependency failed)
    impaired: bool = False  # the watchdog is out of descriptors
    pause: PauseRequest | None = None
    # the log of what really happened (the oracle's truth)
    starts: list[tuple[float, str]] = field(default_factory=list)  # (at, "watchdog"|"systemd")
    pending: list[ActionResult] = field(default_factory=list)

    # --- truth the oracle reads -----------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.running and self.t - self.started_at >= STARTUP_S

    @property
    def port_owner(self) -> str:
        """Who answers on the configured port: "tabby", "orphan", "foreign" or ""."""
        if any(5000 in p.listens for p in self.foreign):
            return "foreign"
        if any(5000 in p.listens for p in self.orphans):
            return "orphan"
        return "tabby" if self.ready and not self.port_moved else ""

    @property
    def serving(self) -> str | None:
        """The model TabbyAPI really generates with on the port, or None."""
        if self.port_owner != "tabby" or self.hung or self.sticky:
            return None
        if self.gen_hang or self.canary_error:
            return None
        return self.loaded

    def truth(self) -> Truth:
        return Truth(
            self.t,
            self.running,
            self.pid,
            self.gen_hang,
            self.loaded if self.running else None,
            self.serving,
            self.mount_ok
            and self.main_folder_ok
            and not self.main_load_fails
            and not self.main_unsupported
            and not self.main_busy
            and not self.host_hung  # the watchdog cannot see the folder
            and self.key == "admin"
            and GPU0_TOTAL - sum(p.gpu_bytes for p in (*self.orphans, *self.foreign))
            >= MAIN_GIB * GIB,
            self.pause is not None,
            self.libs_missing,
            self.host_hung,
            self.main_folder_version,
            self._folder_ok(self.cfg.model.name),
            self._folder_ok(self.cfg.model.fallback),
            self.limit0,
            self.systemd,
            self.unit_exists,
            self.auto_restart_at is not None,
            self.start_refused,
            bool(self.orphans or self.foreign),
            self.crashy,
            self.impaired,
            tuple(self.starts),
            self.describe(),
        )

    def describe(self) -> str:
        """One line of truth for the story."""
        bits: list[str] = []
        if not self.systemd:
            bits.append("no systemd")
        if not self.unit_exists:
            bits.append("unit missing")
        if not self.running:
            bits.append("auto-restart pending" if self.auto_restart_at is not None else "stopped")
        elif not self.ready:
            bits.append("starting")
        for flag in ("hung", "sticky", "gen_hang", "slow", "crashy", "libs_missing"):
            if getattr(self, flag):
                bits.append(flag)
        if self.canary_error:
            bits.append(f"canary_error={self.canary_error}")
        if not self.mount_ok:
            bits.append("mount gone")
        if self.main_load_fails:
            bits.append("main model unloadable")
        if self.main_unsupported:
            bits.append("main model unsupported (permanent)")
        if self.main_busy:
            bits.append("main loads refused (busy)")
        if self.stale_copies and not self.mount_ok:
            bits.append("stale copies under the mount point")
        if not self.main_folder_ok:
            bits.append("main folder gone")
        if not self.fallback_folder_ok:
            bits.append("fallback folder gone")
        if self.host_hung:
            bits.append("host check hangs")
        if self.key != "admin":
            bits.append(f"key={self.key}")
        if self.running:
            bits.append(f"model={self.loaded}" + (f" loading {self.load[0]}" if self.load else ""))
        bits += [f"orphan {p.pid}{' unkillable' if p.unkillable else ''}" for p in self.orphans]
        bits += [f"foreign {p.pid}" for p in self.foreign]
        if self.pause:
            bits.append("paused")
        if self.power_refused:
            bits.append("power refused")
        return ", ".join(bits) or "fine"

    # --- faults (the trace's events) -----------------------------------------------------

    def inject(self, event: str, arg: float) -> None:
        match event:
            case "crash":
                self._crash("signal" if arg < 0.5 else "oom-kill")
            case "hang":
                self.hung = self.running
            case "sticky":
                self.sticky = self.running
            case "gen_hang":
                self.gen_hang = self.running
            case "canary_500":
                self.canary_error = "500" if self.running else ""
            case "canary_body":
                self.canary_error = "body" if self.running else ""
            case "lose_model":
                self.loaded = None
            case "slow":
                self.slow = not self.slow
            case "break":
                self.crashy = True
            case "libs_gone":
                self.libs_missing = self.crashy = True
            case "switch_libs":
                # nixos-rebuild switch moved the libraries: the running process keeps the ones
                # it mapped; the next start fails
                self.system_generation += 1
                self.libs_missing = True
            case "fix":
                self.crashy = self.libs_missing = False
            case "mount_gone":
                self.mount_ok = False
            case "mount_gone_stale":
                # /mnt/models is no mount point, but the folders show (copies left on the root
                # file system): the mount check says so, the folders look usable
                self.mount_ok, self.stale_copies = False, True
            case "mount_back":
                self.mount_ok, self.stale_copies = True, False
            case "main_bad":
                self.main_load_fails = True
            case "main_good":
                self.main_load_fails = self.main_unsupported = False
                self.main_folder_ok = True
                self.main_folder_version += 1
            case "main_folder_gone":
                self.main_folder_ok = False
            case "main_unsupported":
                self.main_unsupported = True
            case "main_busy":
                self.main_busy = True
            case "main_idle":
                self.main_busy = False
            case "fallback_folder_gone":
                self.fallback_folder_ok = False
            case "fallback_folder_back":
                self.fallback_folder_ok = True
            case "host_hang":
                self.host_hung = True
            case "host_ok":
                self.host_hung = False
            case "key_api" | "key_wrong" | "key_admin":
                self.key = event.removeprefix("key_")
            case "human_restart":
                if self.systemd and self.unit_exists:  # `systemctl restart tabbyapi` by hand
                    self._gone()
                    self.n_restarts = 0
                    self._start("human")
            case "orphan_vram" | "orphan_port" | "orphan_stuck":
                self.next_pid += 1
                self.orphans.append(
                    Proc(
                        self.next_pid,
                        ProcessRole.ORPHAN,
                        TABBY_CMD,
                        listens=(5000,) if event != "orphan_vram" else (),
                        gpu_bytes=10 * GIB if event != "orphan_port" else 0,
                        unkillable=event == "orphan_stuck",
                    )
                )
            case "orphan_unstuck":
                for p in self.orphans:
                    p.unkillable = False
            case "foreign_port":
                if not self.foreign:
                    self.next_pid += 1
                    self.foreign.append(
                        Proc(self.next_pid, ProcessRole.FOREIGN, FOREIGN_CMD, listens=(5000,))
                    )
            case "foreign_vram":
                self.next_pid += 1
                self.foreign.append(
                    Proc(
                        self.next_pid,
                        ProcessRole.FOREIGN,
                        ("/usr/bin/blender",),
                        gpu_bytes=15 * GIB,
                    )
                )
            case "foreign_gone":
                self.foreign.clear()
            case "power_drift":
                self.limit0 = 575.0
            case "power_reset":
                self.limit0 = 450.0  # put back by hand (nvidia-smi -pl), or a driver default
            case "power_refuse":
                self.power_refused = True
            case "power_allow":
                self.power_refused = False
            case "route_down":
                self.route_ok = False
            case "route_up":
                self.route_ok = True
            case "start_refused":
                self.start_refused = True
            case "start_allowed":
                self.start_refused = False
            case "pause":
                self.pause = PauseRequest("maintenance", None)
            case "pause_for":
                self.pause = PauseRequest("maintenance", self.t + arg)
            case "resume":
                self.pause = None
            case "systemd_gone":
                self.systemd = False
            case "systemd_back":
                self.systemd = True
            case "unit_gone":
                self.unit_exists = False
            case "unit_back":
                self.unit_exists = True
            case "impaired":
                self.impaired = True
            case "unimpaired":
                self.impaired = False
            case "crashes_in_gap":
                # single crashes at arg-spaced times over the next gap (systemd brings it back)
                self.crash_times = [self.t + arg * (k + 0.5) for k in range(4)]

    # --- time ------------------------------------------------------------------------------

    def advance(self, dt: float) -> None:
        """Move to t + dt, one scheduled transition at a time (gaps of hours stay cheap)."""
        end = self.t + dt
        while True:
            nxt = self._next_transition()
            if nxt is None or nxt > end:
                break
            self.t = max(nxt, self.t)  # an overdue transition happens now, not in the past
            self._transition()
        self.t = end

    def _next_transition(self) -> float | None:
        times = [t for t in self.crash_times if t > self.t - 1e-9]
        if self.auto_restart_at is not None:
            times.append(self.auto_restart_at)
        if self.running and self.crashy:
            times.append(self.started_at + CRASH_AFTER_S)
        if self.load is not None:
            times.append(self.load[1])
        if self.pause is not None and self.pause.until is not None:
            times.append(self.pause.until)
        return min(times) if times else None

    def _transition(self) -> None:
        now = self.t
        if self.pause is not None and self.pause.until is not None and self.pause.until <= now:
            self.pause = None
        if self.auto_restart_at is not None and self.auto_restart_at <= now:
            burst, interval = START_LIMIT
            if sum(1 for at, _ in self.starts if now - at < interval) >= burst:
                self.auto_restart_at, self.result = None, "start-limit-hit"
                return
            self.n_restarts += 1
            self._start("systemd")
            return
        if self.running and self.crashy and now >= self.started_at + CRASH_AFTER_S:
            self._crash("exit-code")
            return
        if self.crash_times and self.crash_times[0] <= now:
            self.crash_times.pop(0)
            if self.running:
                self._crash("signal")
            return
        if self.load is not None and self.load[1] <= now:
            self._finish_load()

    def _finish_load(self) -> None:
        assert self.load is not None
        name, _ = self.load
        self.load = None
        ok = self.running and self._folder_ok(name) and self._fits(name)
        if name == self.cfg.model.name:
            ok = ok and not self.main_load_fails
        if ok:
            self.loaded = name
        if self.load_known and self.load_action is not None:
            status = ResultStatus.OK if ok else ResultStatus.FAILED
            detail = f"{name} loaded" if ok else f"loading {name} failed: CUDA out of memory"
            kind = ErrorKind.NONE if ok else ErrorKind.LOAD_ERROR
            self.pending.append(ActionResult(self.load_action, status, detail, self.t, kind))
        self.load_known, self.load_action = False, None

    def _folder_ok(self, name: str) -> bool:
        if not self.mount_ok:
            return False
        return self.main_folder_ok if name == self.cfg.model.name else self.fallback_folder_ok

    def _fits(self, name: str) -> bool:
        need = (MAIN_GIB if name == self.cfg.model.name else FALLBACK_GIB) * GIB
        return self.gpu0_free() >= need

    def gpu0_free(self) -> int:
        used = sum(p.gpu_bytes for p in (*self.orphans, *self.foreign))
        if self.running and self.loaded:
            used += (MAIN_GIB if self.loaded == self.cfg.model.name else FALLBACK_GIB) * GIB
        return max(GPU0_TOTAL - used, 0)

    def _crash(self, result: str) -> None:
        if not self.running:
            return
        self._gone()
        self.result = result
        self.exit_status = 1 if result == "exit-code" else 0
        if self.systemd:
            self.auto_restart_at = self.t + RESTART_SEC  # Restart=on-failure

    def _gone(self) -> None:
        self.running = False
        self.hung = self.sticky = self.gen_hang = self.slow = False
        self.canary_error = ""
        self._load_broken()
        self.loaded, self.load = None, None
        self.port_moved = False

    def _load_broken(self) -> None:
        """TabbyAPI's process went away mid-load: the watchdog's load stream breaks, and it
        reads that as the load's (failed) end."""
        if self.load is not None and self.load_known and self.load_action is not None:
            detail = "the load stream broke: server disconnected"
            self.pending.append(ActionResult(self.load_action, ResultStatus.FAILED, detail, self.t))
        self.load_known, self.load_action = False, None

    def _start(self, by: str) -> None:
        self.running, self.stopped_by_us, self.auto_restart_at = True, False, None
        self.started_at = self.t
        self.invocation += 1
        self.pid += 1
        self.hung = self.sticky = self.gen_hang = self.slow = False
        self.canary_error = ""
        self.port_moved = any(5000 in p.listens for p in (*self.orphans, *self.foreign))
        # TabbyAPI loads its startup model (the main one) itself, when it can
        main = self.cfg.model.name
        self.loaded = None
        self.crashy = self.crashy or self.libs_missing  # a switch's missing libraries bite now
        if self._folder_ok(main) and not self.main_load_fails and not self.main_unsupported:
            self.loaded = main if self._fits(main) else None
        self._load_broken()  # a restart (stop + start) ends a load in flight as well
        self.load = None
        self.starts.append((self.t, by))

    # --- the executor ----------------------------------------------------------------------

    def execute(self, actions: tuple[Action, ...]) -> tuple[ActionResult, ...]:
        """Run one decision's actions in order; once one fails or is refused, the rest are
        skipped (as hydra_watchdog/act/executor.py does)."""
        results: list[ActionResult] = []
        failed = False
        for action in actions:
            if failed:
                results.append(
                    ActionResult(action, ResultStatus.SKIPPED, "an earlier action failed", self.t)
                )
                continue
            res = self._run(action)
            results.append(res)
            if res.status in (ResultStatus.FAILED, ResultStatus.REFUSED):
                failed = True
        self.pending.extend(results)
        return tuple(results)

    def _result(self, a: Action, status: ResultStatus, detail: str, kind: str = "") -> ActionResult:
        # the executor's kinds are ErrorKind values (errors.py); an unknown one is a model bug
        return ActionResult(a, status, detail, self.t, ErrorKind(_KINDS.get(kind, kind)))

    def _run(self, a: Action) -> ActionResult:
        ok = ResultStatus.OK
        match a:
            case UnitCommand(verb=verb):
                if not self.systemd:
                    return self._result(a, ResultStatus.REFUSED, "no systemd", "no_systemd")
                if not self.unit_exists:
                    return self._result(a, ResultStatus.FAILED, "unit not found", "not_found")
                if verb is UnitVerb.STOP:
                    if self.running:
                        self._gone()
                    self.auto_restart_at, self.stopped_by_us, self.result = None, True, "success"
                    return self._result(a, ok, "stopped")
                if verb is UnitVerb.RESET_FAILED:
                    self.result, self.n_restarts = "success", 0
                    return self._result(a, ok, "reset")
                if self.start_refused:
                    return self._result(a, ResultStatus.FAILED, "job failed: dependency", "job")
                self._gone()
                self.n_restarts = 0  # a manual start flushes NRestarts
                self._start("watchdog")
                return self._result(a, ok, f"{verb.value}ed")
            case KillOrphan(pid=pid, start_ticks=ticks):
                target = next((p for p in self.orphans if p.pid == pid), None)
                if target is None or target.info().start_ticks != ticks:
                    return self._result(a, ResultStatus.REFUSED, "gone", "identity_changed")
                if target.unkillable:
                    return self._result(
                        a, ResultStatus.FAILED, "survived SIGKILL (D state)", "unkillable"
                    )
                self.orphans.remove(target)
                return self._result(a, ok, "killed")
            case LoadModel(model=name):
                if not (self.ready and self.port_owner == "tabby"):
                    return self._result(a, ResultStatus.FAILED, "TabbyAPI does not answer")
                if self.key != "admin":
                    return self._result(
                        a, ResultStatus.FAILED, "HTTP 401: Invalid admin key", "unauthorized"
                    )
                if self.load is not None:
                    return self._result(a, ResultStatus.REFUSED, "a load is running")
                if not self._folder_ok(name):
                    detail = f"HTTP 400: Could not find the model path for {name}"
                    return self._result(a, ResultStatus.FAILED, detail, "load_permanent")
                if name == self.cfg.model.name and self.main_unsupported:
                    detail = "HTTP 400: exl2 models are no longer supported"
                    return self._result(a, ResultStatus.FAILED, detail, "load_permanent")
                if name == self.cfg.model.name and self.main_busy:
                    detail = "HTTP 503: the server is busy"  # before anything was unloaded
                    return self._result(a, ResultStatus.FAILED, detail, "load_error")
                self.load, self.load_known, self.load_action = (name, self.t + LOAD_S), True, a
                self.loaded = None  # TabbyAPI unloads the current model first
                return self._result(a, ResultStatus.IN_PROGRESS, "accepted")
            case SetPowerLimit(gpu_index=i, watts=w):
                if self.power_refused:
                    return self._result(
                        a, ResultStatus.FAILED, "Insufficient Permissions", "no_permission"
                    )
                if i == 0:
                    self.limit0 = w
                return self._result(a, ok, "set")
            case ResetGpu():
                if self.foreign:
                    return self._result(a, ResultStatus.REFUSED, "foreign GPU user", "foreign")
                return self._result(a, ok, "reset")
            case CheckFallbackRoute():
                status = ok if self.route_ok else ResultStatus.FAILED
                return self._result(a, status, "answered" if self.route_ok else "502")
        raise AssertionError(a)  # pragma: no cover

    def forget_watchdog(self) -> None:
        """The watchdog process went away: the results it had not yet read are lost, but not a
        load: that runs in a helper which outlives the watchdog, and the next one adopts it and
        reads its outcome (hydra_watchdog/load_helper.py)."""
        load = [r for r in self.pending if isinstance(r.action, LoadModel)]
        self.pending[:] = load

    # --- the probes ------------------------------------------------------------------------

    def observe(self, wants: frozenset[Probe]) -> Observation:
        results, self.pending = tuple(self.pending), []
        health = self._health()
        model: ModelStatus | None = None
        canary: Canary | None = None
        model = self._model(health)  # the observer asks /v1/model every cycle
        # ... and sends the canary only to a model it saw loaded in that very cycle
        if health.healthy and Probe.CANARY in wants and model.loaded:
            canary = Canary(self._canary())
        # A moved system link makes the observer run the library check in that very cycle.
        switched = self.system_generation != self._seen_generation
        self._seen_generation = self.system_generation
        pause = self.pause
        if pause is not None and pause.until is not None and pause.until <= self.t:
            pause = None
        return Observation(
            at=self.t,
            health=health,
            unit=self._unit(),
            host=self._host(
                wants, checked=Probe.LIBRARIES in wants or not health.healthy or switched
            ),
            model=model,
            canary=canary,
            gpus=self._gpus(),
            port=self._port(),
            processes=self._processes(),
            load=LoadProgress(self.load[0], self.load[1] - LOAD_S, 40, 80)
            if self.load is not None and self.load_known
            else None,
            results=results,
            pause=pause,
            system=SystemLink(
                "/run/current-system",
                f"/nix/store/{self.system_generation}-nixos-system",
                self.system_generation,
            ),
        )

    def _health(self) -> Health:
        if self.impaired:
            r = HttpResult(
                Outcome.LOCAL_ERROR, 0.0, None, "the watchdog is out of file descriptors"
            )
            return Health(r, healthy=False)
        owner = self.port_owner
        if owner == "foreign":
            return Health(HttpResult(Outcome.HTTP_ERROR, 0.01, 404, "not TabbyAPI"), False)
        if owner == "orphan":
            return Health(HttpResult(Outcome.TIMEOUT, 3.0, None, "no answer"), False)
        if owner == "":
            return Health(HttpResult(Outcome.REFUSED, 0.001, None, "connection refused"), False)
        if self.hung:
            return Health(HttpResult(Outcome.TIMEOUT, 3.0, None, "no answer"), False)
        if self.sticky:
            return Health(
                HttpResult(Outcome.HTTP_ERROR, 0.01, 503, "unhealthy"),
                False,
                ("RuntimeError: CUDA error: an illegal memory access",),
            )
        return Health(HttpResult(Outcome.OK, 2.5 if self.slow else 0.02, 200), True)

    def _model(self, health: Health) -> ModelStatus:
        if not health.healthy:
            return ModelStatus(HttpResult(health.result.outcome, 3.0, None), None, known=False)
        if self.key == "wrong":  # neither an admin key nor an API key: 401 on any keyed read
            detail = "HTTP 401: Invalid API key"
            return ModelStatus(HttpResult(Outcome.UNAUTHORIZED, 0.01, 401, detail), None, False)
        return ModelStatus(HttpResult(Outcome.OK, 0.02, 200), self.loaded, known=True)

    def _canary(self) -> HttpResult:
        deadline = self.cfg.tabbyapi.canary_deadline
        if self.key == "wrong":
            return HttpResult(Outcome.UNAUTHORIZED, 0.01, 401, "HTTP 401: Invalid API key")
        if self.gen_hang:
            return HttpResult(Outcome.TIMEOUT, deadline, None, "deadline passed")
        if self.canary_error == "500":
            return HttpResult(Outcome.HTTP_ERROR, 0.05, 500, "Internal Server Error")
        if self.canary_error == "body":
            return HttpResult(Outcome.BAD_BODY, 0.05, 200, '{"error": "generation failed"}')
        if self.loaded is None:
            return HttpResult(Outcome.HTTP_ERROR, 0.05, 400, "no model loaded")
        return HttpResult(Outcome.OK, 0.3, 200)

    def _unit(self) -> UnitStatus:
        if not self.systemd:
            return UnitStatus("tabbyapi.service", False, detail="no systemd: PID 1 is not systemd")
        if not self.unit_exists:
            return UnitStatus("tabbyapi.service", True, load_state="not-found")
        if self.running:
            active, sub = ("active", "running")
        elif self.auto_restart_at is not None:
            active, sub = ("activating", "auto-restart")
        elif self.stopped_by_us or self.result == "success":
            active, sub = ("inactive", "dead")
        else:
            active, sub = ("failed", "failed")
        return UnitStatus(
            name="tabbyapi.service",
            available=True,
            load_state="loaded",
            active_state=active,
            sub_state=sub,
            result=self.result,
            n_restarts=self.n_restarts,
            main_pid=self.pid if self.running else None,
            control_group="/system.slice/tabbyapi.service",
            invocation_id=f"inv{self.invocation}",
            exec_main_status=self.exit_status,
            active_enter_mono=self.started_at,
        )

    def _host(self, wants: frozenset[Probe], *, checked: bool) -> HostReport:
        """`checked`: the library check ran (asked for, or - as the observer does - in an
        unhealthy cycle, so that no restart comes before it, or after a switch). A hung host
        check answers nothing: neither the folders nor the libraries."""
        if self.host_hung:
            journal_hung: tuple[str, ...] | None = None
            if Probe.JOURNAL in wants:
                journal_hung = ("Started.",)
            return HostReport(
                models_dir_ok=None,
                models_dir_detail="not checked: the host check did not answer within 12 s",
                journal_excerpt=journal_hung,
            )
        seen = self.stale_copies and not self.mount_ok  # the copies, not the mount
        main_usable = self._folder_ok(self.cfg.model.name) or (seen and self.main_folder_ok)
        main = ModelDir(
            "M",
            "/mnt/models/M",
            exists=main_usable,
            has_config=main_usable,
            weight_files=3 if main_usable else 0,
            size_bytes=21 * GIB,
            mtime=1.7e9 + self.main_folder_version if main_usable else None,
        )
        fallback_usable = self._folder_ok(self.cfg.model.fallback) or (
            seen and self.fallback_folder_ok
        )
        fallback = ModelDir(
            "F",
            "/mnt/models/F",
            exists=fallback_usable,
            has_config=fallback_usable,
            weight_files=1 if fallback_usable else 0,
            size_bytes=4 * GIB,
            mtime=1.7e9 if fallback_usable else None,
        )
        libs: tuple[str, ...] | None = None
        if checked:
            libs = ("libcudart.so.12",) if self.libs_missing else ()
        journal: tuple[str, ...] | None = None
        if Probe.JOURNAL in wants:
            journal = ("ImportError: libcudart.so.12",) if self.libs_missing else ("Started.",)
        return HostReport(
            models_dir_ok=self.mount_ok,
            models_dir_detail="" if self.mount_ok else "not a mount point",
            model=main,
            fallback=fallback,
            missing_libraries=libs,
            libraries_checked=checked,
            journal_excerpt=journal,
        )

    def _gpus(self) -> GpuReport:
        procs = [GpuProcess(p.pid, p.gpu_bytes) for p in (*self.orphans, *self.foreign)]
        if self.running and self.loaded:
            procs.append(GpuProcess(self.pid, GPU0_TOTAL - self.gpu0_free()))
        free = self.gpu0_free()
        g0 = GpuSnapshot(
            0,
            "GPU-0",
            "sim0",
            memory_total=GPU0_TOTAL,
            memory_used=GPU0_TOTAL - free,
            memory_free=free,
            processes=tuple(procs),
            power=PowerInfo(200.0, self.limit0, self.limit0, 150.0, 600.0, 575.0),
            temperature_c=60,
            utilization_pct=90,
        )
        g1 = GpuSnapshot(
            1,
            "GPU-1",
            "sim1",
            memory_total=24 * GIB,
            memory_used=2 * GIB,
            memory_free=22 * GIB,
            power=PowerInfo(100.0, 300.0, 300.0, 150.0, 450.0, 450.0),
        )
        return GpuReport(devices=(g0, g1))

    def _port(self) -> PortReport:
        listeners = [
            Listener(port, p.pid) for p in (*self.foreign, *self.orphans) for port in p.listens
        ]
        if self.ready:
            listeners.append(Listener(5001 if self.port_moved else 5000, self.pid))
        return PortReport(5000, tuple(listeners), full_scan=True)

    def _processes(self) -> tuple[ProcessInfo, ...]:
        procs: list[ProcessInfo] = []
        if self.running:
            listens = ((5001,) if self.port_moved else (5000,)) if self.ready else ()
            role = ProcessRole.MAIN if self.systemd else ProcessRole.ORPHAN
            procs.append(
                ProcessInfo(
                    self.pid,
                    1.7e9 + self.pid,
                    TABBY_CMD,
                    role,
                    GPU0_TOTAL - self.gpu0_free() if self.loaded else 0,
                    listens,
                    start_ticks=10_000 + self.pid,
                    uid=0,
                )
            )
        procs += [p.info() for p in self.orphans]
        procs += [p.info() for p in self.foreign]
        return tuple(procs)


# the model's shorthand -> the executor's ErrorKind values
_KINDS = {"no_systemd": "unavailable", "job": "command_failed", "foreign": "foreign_gpu_user"}
