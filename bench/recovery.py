"""Recovery: one fault set under hydra-watchdog, systemd alone and monit, inside the namespace.

Per trial: a clean node (TabbyAPI healthy with its model, the supervisor freshly started with no
history), one fault injected at t0, then the node is watched until it is healthy again (see
probe.py), or CAP_S has passed. systemd and monit have no timer longer than a few cycles, so
their trial also ends ("quiescent") once nothing at all has happened for QUIET_S[peer] after the
injection (after the cause is gone, for the restart loop, whose cause ends by itself): no unit
job, no load, no kill, no change in what a client sees. From that point on they would never act
again. hydra-watchdog's trials never end early (its back-off has long timers).

A peer's row (fault class x systemd or monit) stops after PEER_MIN_TRIALS trials when none of
them recovered and a repeat cannot tell anything new: nobody reacted to the fault at all, or the
peer is systemd alone (its one rule, Restart=, has no timer or randomness: the same fault gets the
same answer). hydra-watchdog's rows always run every trial.

Detection: the first reaction to the fault by anyone supervising the node: systemd noticing the
main process exit, a stop/start/restart job on the unit, a model load request, an orphan killed.
Restarts: start jobs of the unit completed ("Started") after t0, whoever issued them.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import node as nd
from bench.probe import Sampler, recovered_at
from hydra_watchdog.sim.tabby_server import write_control

CAP_S = 90.0
# monit: > its longest rule (5 cycles); systemd alone: > its longest timer (RestartSec=100ms),
# with room for a start (~1.2 s) that ends in another exit.
QUIET_S = {"monit": 6.0, "systemd": 3.0}
QUIET_CHECK_S = 0.5  # how often a peer's trial looks for quiescence
PEER_MIN_TRIALS = 2
LOOP_FAULT_S = 12.0  # the restart loop's cause (a crash at every start) lasts this long
LEAK_GIB = 20.0
FOREIGN_GIB = 2.0

FAULTS: dict[str, str] = {
    "crash": "the process exits 1 once",
    "hang": "requests are accepted, never answered (process-bound)",
    "sticky 503": "a CUDA error: /health 503 until the process restarts",
    "generation hang": "completions never return, /health stays 200 (tabbyAPI#428)",
    "no model": "the model is unloaded; TabbyAPI stays up",
    "leaked VRAM": (
        f"model unloaded; an orphan holds {LEAK_GIB:g} GiB, a foreign process {FOREIGN_GIB:g} GiB"
    ),
    "orphan port holder": "crash; a wedged orphan grabs the port before the restart",
    "restart loop": f"a crash at every start, for {LOOP_FAULT_S:g} s",
}


def injection_phase(index: int) -> float:
    """Trial `index`'s injection offset as a fraction of the check interval: the golden-ratio
    sequence (0, 0.62, 0.24, 0.85, 0.47, ...) spreads any number of trials evenly."""
    return (index * 0.6180339887) % 1.0


@dataclass(frozen=True)
class TrialResult:
    supervisor: str
    fault: str
    trial: int
    detect_s: float | None
    healthy_s: float | None  # None: never within the cap
    restarts: int
    kills_ok: int  # orphans killed (correct)
    kills_wrong: int  # foreign processes killed (never correct)
    orphans_left: int
    ended: str  # healthy | cap | quiescent
    wall_s: float = 0.0  # the trial's whole duration, its reset included


@dataclass
class _Spawned:
    role: str  # "orphan" (should be killed) or "foreign" (must not be)
    proc: subprocess.Popen[bytes]
    died_at: float | None = None


def journal_events(unit: str, since: float) -> list[tuple[float, str]]:
    """(wall time, kind) of the unit's manager records since `since`."""
    out = nd.sh(
        "journalctl", "--no-pager", "-o", "json", "-u", unit, "--since", f"@{int(since) - 1}"
    ).stdout
    events: list[tuple[float, str]] = []
    for line in out.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        msg = rec.get("MESSAGE")
        if not isinstance(msg, str) or rec.get("_PID") != "1":
            continue  # only PID 1's own records: the service's stdout is not an action
        t = int(rec.get("__REALTIME_TIMESTAMP", "0")) / 1e6
        if t < since:
            continue
        kind = (
            "exit" if "Main process exited" in msg
            else "auto-restart" if "Scheduled restart job" in msg
            else "start-limit" if "repeated too quickly" in msg
            else "stop" if msg.startswith("Stopping")
            else "started" if msg.startswith("Started")
            else "start" if msg.startswith("Starting")
            else ""
        )  # fmt: skip
        if kind:
            events.append((t, kind))
    return events


def load_requests(path: Path, since: float) -> list[float]:
    times: list[float] = []
    with contextlib.suppress(OSError), path.open() as f:
        for line in f:
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if rec.get("path") == "/v1/model/load" and rec.get("time", 0) >= since:
                    times.append(float(rec["time"]))
    return times


class Bench:
    def __init__(self, node: nd.Node, out: Callable[[str], None]) -> None:
        self.node = node
        self.out = out
        self.sampler = Sampler(nd.PORT, nd.API_KEY, nd.MAIN_MODEL)
        self.spawned: list[_Spawned] = []

    def close(self) -> None:
        self.kill_spawned()
        for unit in (nd.HYDRA_UNIT, nd.MONIT_UNIT, nd.TABBY_UNIT):
            nd.systemctl("stop", unit)
        self.sampler.close()

    # -- the node ---------------------------------------------------------------------------

    def healthy_now(self) -> bool:
        s = self.sampler.latest()
        return s is not None and s.healthy and time.time() - s.t < 1.0

    def main_pid(self) -> int:
        try:
            return int(nd.show(nd.TABBY_UNIT, "MainPID").get("MainPID", "0"))
        except ValueError:
            return 0

    def spawn(self, role: str, *args: str) -> _Spawned:
        ready = nd.ROOT / f"zombie-{len(self.spawned)}-{time.monotonic_ns()}.ready"
        proc = subprocess.Popen(
            self.node.zombie_argv(*args, "--ready-file", str(ready), orphan=role == "orphan"),
            cwd=self.node.repo,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # outside every unit's cgroup: a leftover
        )
        nd.wait_until(lambda: ready.exists() or proc.poll() is not None, 20)
        spawned = _Spawned(role, proc)
        self.spawned.append(spawned)
        return spawned

    def kill_spawned(self) -> None:
        for s in self.spawned:
            if s.proc.poll() is None:
                s.proc.kill()
            s.proc.wait(10)
        self.spawned = []

    def reset(self, supervisor: str) -> None:
        self.stop_supervisor()
        self.kill_spawned()  # dead pids drop out of the NVML simulator's process list
        write_control(self.node.control)
        # A process that serves the model is as clean as a new one (sticky state shows up as
        # unhealthy): keeping it saves a start per trial. Anything else starts from scratch.
        active = nd.show(nd.TABBY_UNIT, "ActiveState").get("ActiveState") == "active"
        if not (active and nd.wait_until(self.healthy_now, 1.0)):
            nd.systemctl("stop", nd.TABBY_UNIT)
            nd.systemctl("reset-failed", nd.TABBY_UNIT)
            self.node.reset_faults()
            nd.systemctl("start", nd.TABBY_UNIT)
            if not nd.wait_until(self.healthy_now, 60):
                raise RuntimeError("TabbyAPI did not become healthy after a clean start")
        self.start_supervisor(supervisor)
        if supervisor != "systemd":  # systemd alone has nothing to show the healthy node to
            time.sleep(1.0)  # one more cycle: every supervisor has seen the healthy node
        self.sampler.trim()

    def stop_supervisor(self) -> None:
        nd.systemctl("stop", nd.HYDRA_UNIT, nd.MONIT_UNIT)
        for name in ("state", "run"):
            shutil.rmtree(nd.ROOT / name, ignore_errors=True)
        for name in ("monit.state", "monit.id"):
            (nd.ROOT / name).unlink(missing_ok=True)

    def start_supervisor(self, supervisor: str) -> None:
        if supervisor == "hydra-watchdog":
            done = nd.systemctl("start", nd.HYDRA_UNIT)  # Type=notify: after its first cycle
            if done.returncode != 0:
                raise RuntimeError(f"hydra-watchdog did not start: {done.stderr.strip()}")
        elif supervisor == "monit":
            nd.systemctl("start", nd.MONIT_UNIT)
            time.sleep(nd.monit_interval() + 0.5)  # monit has checked the healthy node

    # -- physical floor -----------------------------------------------------------------------

    def floor(self, runs: int) -> dict[str, float]:
        """Restart-to-healthy (restart + model load) and load-only times, no supervisor."""
        self.reset("systemd")
        restart: list[float] = []
        for _ in range(runs):
            t0 = time.time()
            nd.systemctl("restart", nd.TABBY_UNIT)
            nd.wait_until(lambda t=t0: recovered_at(self.sampler.since(t)) is not None, 60, 0.1)
            got = recovered_at(self.sampler.since(t0))
            if got is not None:
                restart.append(got - t0)
        return {"restart_s": _median(restart), "load_s": nd.LOAD_SECONDS}

    # -- one trial ------------------------------------------------------------------------------

    def trial(self, supervisor: str, fault: str, index: int) -> TrialResult:
        began = time.monotonic()
        self.reset(supervisor)
        # Every supervisor checks once per interval from its start; a fault injected at a fixed
        # time after that start would always land at the same point of one supervisor's cycle
        # and another point of the other's. The trials spread the injection over the interval
        # instead, at the same offsets for every supervisor.
        time.sleep(injection_phase(index) * nd.monit_interval())
        node = self.node
        models = ("--models-dir", str(node.models))
        holder: _Spawned | None = None
        if fault == "orphan port holder":
            holder = self.spawn("orphan", *models, "--hold-port", str(nd.PORT))
        pid = self.main_pid()
        t0 = time.time()
        cleared_at: float | None = None
        # A process-bound fault names its process: a restart faster than the clearing below
        # (a sticky 503 is cleared once the sampler has seen a 503) must not hand it on to the
        # next process, which would then need a restart of its own.
        if fault == "restart loop":
            write_control(node.control, exit_code=1)
        elif fault in ("crash", "orphan port holder"):
            write_control(node.control, exit_code=1, only_pid=pid)
        elif fault == "hang":
            write_control(node.control, hang=True, only_pid=pid)
        elif fault == "sticky 503":
            write_control(node.control, sticky_503=True, only_pid=pid)
        elif fault == "generation hang":
            write_control(node.control, generation_hang=True, only_pid=pid)
        elif fault in ("no model", "leaked VRAM"):
            if fault == "leaked VRAM":
                nvml = ("--nvml-state", str(node.nvml))
                self.spawn("orphan", *models, *nvml, "--vram-gib", f"{LEAK_GIB:g}")
                self.spawn("foreign", *nvml, "--vram-gib", f"{FOREIGN_GIB:g}")
            _unload(node)
            cleared_at = t0
        else:
            raise ValueError(f"unknown fault {fault!r}")
        if fault == "orphan port holder":
            t0 = time.time()  # the crash is the injection; the holder was waiting for it
        del holder

        peer = supervisor != "hydra-watchdog"
        # A process-bound fault lasts as long as its process: only a supervisor ends it, so the
        # quiet time counts from t0. The restart loop's cause ends by itself, at LOOP_FAULT_S.
        quiet_from = t0 + LOOP_FAULT_S if fault == "restart loop" else t0
        ended, healthy_at = "cap", None
        next_quiet_check = time.monotonic() + QUIET_CHECK_S
        while time.time() - t0 < CAP_S:
            now = time.time()
            for s in self.spawned:
                if s.died_at is None and s.proc.poll() is not None:
                    s.died_at = now
            if cleared_at is None:
                cleared_at = self._maybe_clear(fault, pid, t0, now)
            healthy_at = recovered_at(self.sampler.since(t0))
            if healthy_at is not None:
                ended = "healthy"
                break
            if peer and now >= quiet_from and time.monotonic() >= next_quiet_check:
                next_quiet_check = time.monotonic() + QUIET_CHECK_S
                if now - self._last_change(t0, quiet_from) >= QUIET_S[supervisor]:
                    ended = "quiescent"
                    break
            time.sleep(0.1)
        end = time.time()
        for s in self.spawned:
            if s.died_at is None and s.proc.poll() is not None:
                s.died_at = end
        events = [(t, k) for t, k in journal_events(nd.TABBY_UNIT, t0) if t <= end]
        reactions = [t for t, k in events if k != "started"]
        reactions += [t for t in load_requests(node.requests, t0) if t <= end]
        reactions += [s.died_at for s in self.spawned if s.died_at is not None]
        return TrialResult(
            supervisor=supervisor,
            fault=fault,
            trial=index,
            detect_s=min(reactions) - t0 if reactions else None,
            healthy_s=None if healthy_at is None else healthy_at - t0,
            restarts=sum(1 for _, k in events if k == "started"),
            kills_ok=sum(1 for s in self.spawned if s.role == "orphan" and s.died_at),
            kills_wrong=sum(1 for s in self.spawned if s.role == "foreign" and s.died_at),
            orphans_left=sum(1 for s in self.spawned if s.role == "orphan" and not s.died_at),
            ended=ended,
            wall_s=time.monotonic() - began,
        )

    def _maybe_clear(self, fault: str, pid: int, t0: float, now: float) -> float | None:
        """Clear the control file once the fault has taken hold; returns when it was cleared."""
        if fault == "restart loop":
            done = now - t0 >= LOOP_FAULT_S
        elif fault == "sticky 503":
            done = any(s.health == 503 for s in self.sampler.since(t0))
        else:  # process-bound: cleared once the process that had it is gone
            done = not _alive(pid)
        if done:
            write_control(self.node.control)
            return now
        return None

    def _last_change(self, t0: float, cleared_at: float) -> float:
        """The last moment anything happened on the node since t0 (at least cleared_at)."""
        last = cleared_at
        for t, _ in journal_events(nd.TABBY_UNIT, t0):
            last = max(last, t)
        for t in load_requests(self.node.requests, t0):
            last = max(last, t)
        for s in self.spawned:
            if s.died_at is not None:
                last = max(last, s.died_at)
        samples = self.sampler.since(t0)
        for a, b in itertools.pairwise(samples):
            if (a.health, a.healthy) != (b.health, b.healthy):
                last = max(last, b.t)
        return last


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _unload(node: nd.Node) -> None:
    req = urllib.request.Request(
        f"{node.url}/v1/model/unload",
        method="POST",
        data=b"{}",
        headers={"Authorization": f"Bearer {nd.ADMIN_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        resp.read()


def enough_trials(supervisor: str, row: list[TrialResult]) -> bool:
    """Whether a peer's row may stop here (see the module's docstring)."""
    if supervisor == "hydra-watchdog" or len(row) < PEER_MIN_TRIALS:
        return False
    if any(r.healthy_s is not None for r in row):
        return False
    return supervisor == "systemd" or all(r.detect_s is None for r in row)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run_recovery(
    node: nd.Node,
    trials: int,
    out: Callable[[str], None],
    faults: tuple[str, ...] = tuple(FAULTS),
    supervisors: tuple[str, ...] = nd.SUPERVISORS,
) -> dict[str, Any]:
    bench = Bench(node, out)
    results: list[TrialResult] = []
    try:
        nd.install_dropin(node, on=False)
        floor = bench.floor(3)
        out(f"floor: restart + load to healthy {floor['restart_s']:.2f} s")
        for supervisor in supervisors:
            nd.install_dropin(node, on=supervisor == "hydra-watchdog")
            for fault in faults:
                row: list[TrialResult] = []
                for i in range(trials):
                    r = bench.trial(supervisor, fault, i)
                    results.append(r)
                    row.append(r)
                    healthy = "never" if r.healthy_s is None else f"{r.healthy_s:.2f}s"
                    detect = "-" if r.detect_s is None else f"{r.detect_s:.2f}s"
                    out(
                        f"  {supervisor:<15} {fault:<19} #{i}: detect {detect:>7}  "
                        f"healthy {healthy:>7}  restarts {r.restarts}  kills ok/wrong "
                        f"{r.kills_ok}/{r.kills_wrong}  ({r.ended})"
                    )
                    if i + 1 < trials and enough_trials(supervisor, row):
                        out(f"  {supervisor:<15} {fault:<19} stops here: a repeat adds nothing")
                        break
        nd.install_dropin(node, on=False)
    finally:
        bench.close()
    return {
        "floor": floor,
        "cap_s": CAP_S,
        "quiet_s": QUIET_S,
        "peer_min_trials": PEER_MIN_TRIALS,
        "loop_fault_s": LOOP_FAULT_S,
        "faults": {f: FAULTS[f] for f in faults},
        "trials": [asdict(r) for r in results],
    }
