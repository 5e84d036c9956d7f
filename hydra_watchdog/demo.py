"""`hydra-watchdog demo`: the real daemon against a simulated node, with scripted incidents.

The node: the TabbyAPI simulator as a real HTTP server on a free loopback port, the simulated
libnvidia-ml.so.1 (two GPUs like hydra-ai) loaded by the real pynvml binding, and a stand-in
"unit" (sim/unit.py) that restarts the simulator like systemd's Restart=on-failure. The daemon is
the production Daemon with production adapters; only the unit manager is the stand-in, so no
GPU, no systemd and no root are needed. Intervals are compressed to fractions of a second;
`--fast` halves every one of them again (the daemon's, the simulator's and the incidents').
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hydra_watchdog.actions import UnitVerb
from hydra_watchdog.config import Config, parse_config
from hydra_watchdog.durations import parse_duration
from hydra_watchdog.events import Event, EventKind, headline
from hydra_watchdog.printable import printable
from hydra_watchdog.report.screen import WIDTH, hanging
from hydra_watchdog.sim.install import lay_out
from hydra_watchdog.states import Phase

MAIN_MODEL = "Midnight-Miqu-70B-v1.5-exl2-2.5bpw"
FALLBACK_MODEL = "Llama-3.1-8B-exl2-6.0bpw"
GIB = 1024**3
ADMIN_KEY = "demo-admin-key-not-secret"
INCIDENT_LIMIT = 25.0  # seconds an incident may take before the demo calls it unrecovered
FAST = 0.5  # `--fast`: every duration of the demo, times this


def scaled(scale: float, text: str) -> str:
    """A duration of the demo's config (`500ms`, `2m`), times `scale`."""
    return f"{round(parse_duration(text) * scale * 1000)}ms"


def _free_port() -> int:
    """A free port whose neighbour is free too (TabbyAPI moves to port+1 when busy)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free pair of loopback ports")


@dataclass
class Incident:
    key: str  # a word for the summary line
    name: str
    runbook: str
    detected_s: float | None = None
    recovered_s: float | None = None
    restarts: int = 0  # TabbyAPI's restarts in the incident, by anyone
    by_watchdog: int = 0  # of them, started by the watchdog (the rest: the unit's Restart=)
    actions: list[str] = field(default_factory=list)


def event_lines(seconds: float, event: Event) -> list[str]:
    """One event as the demo prints it: the time, the kind, the [rule], the message, wrapped
    within the screen's width."""
    first, *rest = hanging(printable(headline(event)), WIDTH - 11, 13)
    return [f"  {seconds:6.1f}s  {first}", *rest]


class DemoNode:
    """Builds the simulated node in a temporary directory."""

    def __init__(self, root: Path, scale: float = 1.0) -> None:
        from hydra_watchdog.sim import nvml_state  # noqa: PLC0415
        from hydra_watchdog.sim.nvml_build import build_nvml_sim  # noqa: PLC0415

        self.root = root
        self.scale = scale
        self.port = _free_port()
        self.models = root / "models"
        self.install = root / "tabbyapi"
        for name, gib in ((MAIN_MODEL, 40), (FALLBACK_MODEL, 8)):
            folder = self.models / name
            folder.mkdir(parents=True)
            (folder / "config.json").write_text(json.dumps({"sim_vram_bytes": gib * GIB}))
            (folder / "output.safetensors").write_bytes(b"\0" * 1024)
        self.tokens = root / "api_tokens.yml"
        self.tokens.write_text(f"api_key: demo-api-key\nadmin_key: {ADMIN_KEY}\n")
        self.key_file = root / "admin_key"
        self.key_file.write_text(ADMIN_KEY + "\n")
        self.key_file.chmod(0o600)
        self.control = root / "control.json"
        self.control.write_text("{}")
        self.nvml_state = root / "nvml.state"
        nvml_state.write_state(self.nvml_state, nvml_state.default_state())
        self.library = build_nvml_sim(root / "lib")
        os.environ[nvml_state.STATE_ENV] = str(self.nvml_state)  # read by the C library per call

    def sim_argv(self, port: int, *extra: str) -> list[str]:
        return [
            *lay_out(self.install),
            "--port", str(port), "--models-dir", str(self.models), "--tokens", str(self.tokens),
            "--control", str(self.control), "--nvml-state", str(self.nvml_state),
            "--load-seconds", f"{self.scale:g}", "--modules", "8", *extra,
        ]  # fmt: skip

    def config(self) -> Config:
        return parse_config(
            {
                "watchdog": {
                    "interval": scaled(self.scale, "500ms"),
                    "state_dir": str(self.root / "state"),
                    "runtime_dir": str(self.root / "run"),
                },
                "tabbyapi": {
                    "url": f"http://127.0.0.1:{self.port}",
                    "unit": "tabbyapi.service",
                    "admin_key_file": str(self.key_file),
                    "health_timeout": scaled(self.scale, "1500ms"),
                    "slow_threshold": scaled(self.scale, "1s"),
                    "slow_probes": 3,
                    "failures_before_down": 2,
                    "startup_grace": scaled(self.scale, "4s"),
                    "canary_interval": scaled(self.scale, "10s"),
                    "canary_deadline": scaled(self.scale, "3s"),
                    "venv": "",
                    # TabbyAPI's install tree, as /opt/tabbyapi on hydra-ai: the simulators
                    # run from it (sim/install.py), as whoever runs the demo
                    "cmdline_patterns": [str(self.install)],
                    "user": str(os.getuid()),
                },
                "model": {
                    "name": MAIN_MODEL,
                    "models_dir": str(self.models),
                    "vram_required_gib": 40.0,
                    "load_timeout": scaled(self.scale, "30s"),
                    "max_load_attempts": 2,
                    "fallback": FALLBACK_MODEL,
                    "fallback_vram_required_gib": 8.0,
                },
                "restart_loop": {
                    "max_restarts": 3,
                    "window": scaled(self.scale, "30s"),
                    "backoff_initial": scaled(self.scale, "2s"),
                    "backoff_max": scaled(self.scale, "8s"),
                    "reset_after": scaled(self.scale, "5s"),
                    "escalate_after": scaled(self.scale, "2m"),
                },
                "gpu": {
                    "nvml_library": str(self.library),
                    "device": [
                        {"index": 0, "power_limit_watts": 450},
                        {"index": 1, "power_limit_watts": 300},
                    ],
                },
                "orphans": {"term_grace": scaled(self.scale, "1s")},
                "metrics": {"listen": ""},
            },
            source="demo",
        )


def _post(url: str) -> None:
    req = urllib.request.Request(  # noqa: S310 - loopback URL built above
        url, method="POST", data=b"{}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310
        resp.read()


class Demo:
    def __init__(
        self, root: Path, out: Callable[[str], None] = print, *, scale: float = 1.0
    ) -> None:
        from hydra_watchdog.adapters.fallback_route import LiteLlmRoute  # noqa: PLC0415
        from hydra_watchdog.adapters.gpu import NvmlGpu  # noqa: PLC0415
        from hydra_watchdog.adapters.gpu_reset import NvidiaSmiReset  # noqa: PLC0415
        from hydra_watchdog.adapters.host import HostProbe  # noqa: PLC0415
        from hydra_watchdog.adapters.process_control import PidfdControl  # noqa: PLC0415
        from hydra_watchdog.adapters.procs import ProcScanner  # noqa: PLC0415
        from hydra_watchdog.adapters.tabby import TabbyClient  # noqa: PLC0415
        from hydra_watchdog.daemon import Daemon  # noqa: PLC0415
        from hydra_watchdog.interfaces import Adapters  # noqa: PLC0415
        from hydra_watchdog.policy import decide  # noqa: PLC0415
        from hydra_watchdog.sim.unit import SimUnit  # noqa: PLC0415

        self.out = out
        self.scale = scale
        self.node = DemoNode(root, scale)
        self.cfg = self.node.config()
        self.unit = SimUnit(
            "tabbyapi.service",
            self.node.sim_argv(self.node.port),
            log_path=root / "tabbyapi.log",
            restart_sec=0.5 * scale,
        )
        adapters = Adapters(
            tabby=TabbyClient.from_config(self.cfg),
            gpu=NvmlGpu.from_config(self.cfg),
            units=self.unit,
            scanner=ProcScanner.from_config(self.cfg),
            host=HostProbe.from_config(self.cfg),
            fallback=LiteLlmRoute(),
            processes=PidfdControl(),
            reset=NvidiaSmiReset(),
        )
        self.t0 = time.monotonic()
        self.events: list[tuple[float, Event]] = []
        self.daemon = Daemon(self.cfg, adapters=adapters, decide=decide, emit=self._emit)
        self.thread = threading.Thread(target=self.daemon.run, name="watchdog", daemon=True)
        self.orphans: list[object] = []

    def _emit(self, event: Event) -> None:
        now = time.monotonic() - self.t0
        self.events.append((now, event))
        if event.kind is not EventKind.LOAD_PROGRESS:
            self.out("\n".join(event_lines(now, event)))

    # --- incident driver ------------------------------------------------------------------------

    def _serving(self) -> bool:
        s = self.daemon.state
        return s.phase is Phase.HEALTHY and not s.load_in_flight

    def _wait(self, cond: Callable[[], bool], limit: float) -> float | None:
        start = time.monotonic()
        while time.monotonic() - start < limit:
            if cond():
                return time.monotonic() - start
            time.sleep(0.05)
        return None

    def incident(self, key: str, name: str, runbook: str, inject: Callable[[], None],
                 detected: Callable[[], bool], fix: Callable[[], None] | None = None,
                 fix_after: Callable[[], bool] | None = None) -> Incident:  # fmt: skip
        self.out(f"\n== {name}  (runbook: {runbook})")
        inc = Incident(key, name, runbook)
        mark = len(self.events)
        restarted = self.unit.auto_restarts
        start = time.monotonic()
        inject()
        inc.detected_s = self._wait(detected, INCIDENT_LIMIT)
        if fix is not None:
            if fix_after is not None:
                self._wait(fix_after, INCIDENT_LIMIT)
            self.out("  (the operator fixes the cause)")
            fix()
        got = self._wait(self._serving, INCIDENT_LIMIT)
        inc.recovered_s = None if got is None else time.monotonic() - start
        for _, e in self.events[mark:]:
            if e.kind is EventKind.ACTION and e.action:
                inc.actions.append(e.action)
                if e.action in ("restart_unit", "start_unit"):
                    inc.by_watchdog += 1
        inc.restarts = inc.by_watchdog + self.unit.auto_restarts - restarted
        return inc

    def run(self) -> list[Incident]:
        from hydra_watchdog.sim import nvml_state  # noqa: PLC0415
        from hydra_watchdog.sim.tabby_server import write_control  # noqa: PLC0415

        node = self.node
        fast = f"; every duration x{self.scale:g} (--fast)" if self.scale != 1 else ""
        self.out(f"simulated node in {node.root}: TabbyAPI sim on 127.0.0.1:{node.port},\n"
                 f"2 simulated GPUs (RTX 5090 32 GiB, RTX 4090 24 GiB){fast}")  # fmt: skip
        self.unit.command(UnitVerb.START)
        self.thread.start()
        incidents: list[Incident] = []

        def not_serving() -> bool:
            return not self._serving()

        incidents.append(
            self.incident(
                "boot",
                "boot: no model, power limits at defaults",
                "TabbyAPINoModel + preventive power limits",
                lambda: None,
                lambda: self.daemon.cycles > 0,
            )
        )

        def crash() -> None:
            write_control(node.control, exit_code=1)
            pid = self.unit.status().main_pid
            self._wait(lambda: self.unit.status().main_pid != pid, 5)
            write_control(node.control)

        incidents.append(
            self.incident("crash", "crash (exit 1)", "TabbyAPIDown", crash, not_serving)
        )

        def leak() -> None:
            import subprocess  # noqa: PLC0415

            orphan = subprocess.Popen(
                node.sim_argv(node.port + 20), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            self.orphans.append(orphan)
            nvml_state.set_process(node.nvml_state, 0, orphan.pid, 30 * GIB)
            self.out(f"  (an orphan TabbyAPI process, pid {orphan.pid}, holds 30 GiB on gpu0; "
                     "the model is unloaded)")  # fmt: skip
            _post(f"{self.cfg.tabbyapi.url}/v1/model/unload")

        incidents.append(
            self.incident(
                "leak",
                "leaked VRAM + model unloaded",
                "TabbyAPINoModel / orphans",
                leak,
                not_serving,
            )
        )

        slow_s, threshold = 1.2 * self.scale, self.cfg.tabbyapi.slow_threshold

        def slow() -> None:
            write_control(node.control, slow_seconds=slow_s)

        incidents.append(
            self.incident(
                "slow",
                f"slow health ({slow_s:g} s > {threshold:g} s)",
                "TabbyAPISlowHealthCheck",
                slow,
                lambda: self.daemon.state.phase is Phase.DEGRADED,
                fix=lambda: write_control(node.control),
            )
        )

        def sticky() -> None:
            write_control(node.control, sticky_503=True)
            time.sleep(0.2)
            write_control(node.control)  # the 503 stays: TabbyAPI never clears it

        incidents.append(
            self.incident("sticky", "sticky /health 503", "TabbyAPIDown", sticky, not_serving)
        )

        def loop() -> None:
            write_control(node.control, exit_code=1)

        incidents.append(
            self.incident(
                "loop",
                "restart loop (crashes at every start)",
                "TabbyAPIRestartLoop",
                loop,
                lambda: self.daemon.state.backoff_step > 0,
                fix=lambda: write_control(node.control),
                fix_after=lambda: self.daemon.state.backoff_step >= 2,
            )
        )
        # back-off resets only after reset_after of health
        self._wait(lambda: self.daemon.state.backoff_step == 0, 15 * self.scale)
        return incidents

    def close(self) -> None:
        self.daemon.request_stop("the demo is over")
        self.thread.join(15)
        self.unit.stop_all()
        for orphan in self.orphans:
            kill = getattr(orphan, "kill", None)
            if kill is not None and getattr(orphan, "poll", lambda: 0)() is None:
                kill()
                orphan.wait()  # type: ignore[attr-defined]


def _table(incidents: list[Incident]) -> str:
    rows = [("incident", "detected", "healthy again", "restarts", "actions")]
    for i in incidents:
        seen = "-" if i.detected_s is None else f"{i.detected_s:.1f}s"
        healed = "NOT RECOVERED" if i.recovered_s is None else f"{i.recovered_s:.1f}s"
        # every restart of TabbyAPI, as status counts them: the watchdog's and the unit's own
        by = f" ({i.by_watchdog} by the watchdog)" if i.restarts else ""
        acts = ", ".join(dict.fromkeys(i.actions)) or "none"
        rows.append((i.key, seen, healed, f"{i.restarts}{by}", acts))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_demo(*, fast: bool = False, out: Callable[[str], None] = print) -> int:
    """Runs every scripted incident; exit 0 when each recovered. `fast`: every duration halved."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hydra-demo-") as tmp:
        demo = Demo(Path(tmp), out, scale=FAST if fast else 1.0)
        try:
            incidents = demo.run()
            from hydra_watchdog.report.status_file import read_status  # noqa: PLC0415
            from hydra_watchdog.report.status_view import judge, render  # noqa: PLC0415

            # what `hydra-watchdog status` shows: the status file the daemon published
            report = read_status(demo.cfg.watchdog.runtime_dir)
            now = time.time()
        finally:
            demo.close()
        if report is not None:
            verdict, why, current = judge(report, wall_now=now, stale_after=report.stale_after)
            screen = render(report, verdict, why, now=now, current=current)
            out("\n== `hydra-watchdog status` at the end\n" + screen)
    out(f"\n== summary ({time.monotonic() - started:.0f} s)\n" + _table(incidents))
    failed = [i.name for i in incidents if i.recovered_s is None]
    if failed:
        out(f"\nnot recovered: {', '.join(failed)}")
        return 1
    counts = ", ".join(f"{i.key}={len(i.actions)}" for i in incidents)
    out(f"\nevery incident recovered; actions per incident: {counts}")
    return 0
