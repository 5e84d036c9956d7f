"""Overhead and latency, inside the namespace, with TabbyAPI healthy unless said otherwise.

- CPU per healthy cycle and RSS: hydra-watchdog at a 100 ms interval (the 1 s interval compressed
  10x, so a minute gives 600 cycles) beside monit at its 1 s minimum, both watching the same
  healthy TabbyAPI; CPU is utime+stime of the main process plus its reaped children
  (/proc/PID/stat), RSS is the largest VmRSS sampled once a second.
- `hydra-watchdog status` against `systemctl status tabbyapi`: wall time of whole commands.
- The port-ownership scan (ProcScanner.scan, full) with 20,000 TCP sockets open, against
  psutil.net_connections().
- One full observation on the failure path (TabbyAPI stopped; every expensive probe asked for),
  with the production adapters.
"""

from __future__ import annotations

import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import node as nd

OVERHEAD_UNIT = "hydra-bench-overhead.service"
OVERHEAD_INTERVAL = 0.1
SOCKET_PAIRS = 10_000  # 20,000 sockets (plus the listener)
_CLIENTS = """
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
clients = [socket.create_connection((host, port)) for _ in range(n)]
print("ready", flush=True)
sys.stdin.read()
"""
_STRAY = """
import socket, sys
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen()
print(s.getsockname()[1], flush=True)
sys.stdin.read()
"""


def _ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime, stime, cutime, cstime are fields 14-17; fields[0] here is field 3 (state)
    return sum(int(fields[i]) for i in (11, 12, 13, 14))


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _main_pid(unit: str) -> int:
    return int(nd.show(unit, "MainPID").get("MainPID", "0") or 0)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _stats_ms(values: list[float]) -> dict[str, float]:
    return {
        "median_ms": statistics.median(values) * 1000,
        "p95_ms": _pct(values, 0.95) * 1000,
        "max_ms": max(values) * 1000,
        "runs": len(values),
    }


def healthy_polling(node: nd.Node, seconds: float) -> dict[str, Any]:
    config = nd.ROOT / "hydra-overhead.toml"
    library = nd.ROOT / "lib" / "libnvidia-ml.so.1"
    config.write_text(
        nd.hydra_toml(
            node,
            library,
            interval=OVERHEAD_INTERVAL,
            state_dir=str(nd.ROOT / "state-overhead"),
            runtime_dir=str(nd.ROOT / "run-overhead"),
        )
    )
    unit = nd.hydra_unit(node).replace(str(node.hydra_config), str(config))
    Path("/etc/systemd/system", OVERHEAD_UNIT).write_text(unit)
    nd.systemctl("daemon-reload")
    nd.systemctl("start", nd.TABBY_UNIT)
    nd.wait_until(lambda: nd.show(nd.TABBY_UNIT, "ActiveState")["ActiveState"] == "active", 30)
    time.sleep(2.0)  # the startup model is loaded
    nd.systemctl("start", OVERHEAD_UNIT, nd.MONIT_UNIT)
    time.sleep(3.0)  # past start-up (imports, first cycles)
    pids = {"hydra-watchdog": _main_pid(OVERHEAD_UNIT), "monit": _main_pid(nd.MONIT_UNIT)}
    hz = os.sysconf("SC_CLK_TCK")
    start = {k: _ticks(p) for k, p in pids.items()}
    rss = {k: _rss_bytes(p) for k, p in pids.items()}
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        time.sleep(1.0)
        for k, p in pids.items():
            rss[k] = max(rss[k], _rss_bytes(p))
    elapsed = time.monotonic() - t0
    end = {k: _ticks(p) for k, p in pids.items()}
    cycles = {"hydra-watchdog": elapsed / OVERHEAD_INTERVAL, "monit": elapsed / nd.monit_interval()}
    out: dict[str, Any] = {"seconds": elapsed}
    for k in pids:
        cpu = (end[k] - start[k]) / hz
        out[k] = {
            "interval_s": OVERHEAD_INTERVAL if k == "hydra-watchdog" else nd.monit_interval(),
            "cycles": cycles[k],
            "cpu_s": cpu,
            "cpu_ms_per_cycle": cpu / cycles[k] * 1000,
            "cpu_pct": cpu / elapsed * 100,
            "rss_mb": rss[k] / 1e6,
        }
    return out


def status_latency(node: nd.Node, runs: int) -> dict[str, Any]:
    config = nd.ROOT / "hydra-overhead.toml"
    commands = {
        "hydra-watchdog status": [node.hydra_bin, "status", "--config", str(config)],
        "systemctl status tabbyapi": ["systemctl", "status", "--no-pager", nd.TABBY_UNIT],
    }
    out: dict[str, Any] = {}
    for name, argv in commands.items():
        times: list[float] = []
        code = None
        for _ in range(runs):
            t = time.perf_counter()
            done = subprocess.run(argv, capture_output=True, check=False, timeout=30)
            times.append(time.perf_counter() - t)
            code = done.returncode
        out[name] = {**_stats_ms(times), "exit": code}
    return out


def port_scan(runs: int) -> dict[str, Any]:
    import psutil

    from hydra_watchdog.adapters.procs import ProcScanner
    from hydra_watchdog.adapters.systemd import SystemctlUnit
    from hydra_watchdog.observation import GpuReport, UnitStatus

    # Half the sockets live in a helper process: one process may not be allowed 20k fds (the
    # hard RLIMIT_NOFILE here is 20,000 and raising it needs CAP_SYS_RESOURCE).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = SOCKET_PAIRS + 1000
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    socks: list[socket.socket] = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    listener.settimeout(60)  # a helper that died must not hang the benchmark
    host, port = listener.getsockname()
    helper = subprocess.Popen(
        [sys.executable, "-c", _CLIENTS, host, str(port), str(SOCKET_PAIRS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        while len(socks) < SOCKET_PAIRS:
            server, _ = listener.accept()
            socks.append(server)
        assert helper.stdout is not None
        helper.stdout.readline()  # "ready": every client socket is open
        open_tcp = sum(
            len(Path(f"/proc/net/{n}").read_text().splitlines()) - 1 for n in ("tcp", "tcp6")
        )
        scanner = ProcScanner(nd.PORT, [str(nd.ROOT / "models")])
        unit = SystemctlUnit(nd.TABBY_UNIT).status()
        # The search the full scan exists for: a listener no candidate holds (a stray server,
        # started last), while the 20k sockets live in this process and the helper.
        stray = subprocess.Popen([sys.executable, "-c", _STRAY], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert stray.stdout is not None
        stray_port = int(stray.stdout.readline())
        lost = ProcScanner(stray_port, ["/nonexistent-pattern/"])
        no_unit = UnitStatus(name="none.service", available=False)
        fns: dict[str, Callable[[], object]] = {
            "ProcScanner.scan(full=True)": lambda: scanner.scan(unit, GpuReport(), full=True),
            "ProcScanner.scan(full=True), owner no candidate": lambda: lost.scan(
                no_unit, GpuReport(), full=True
            ),
            "ProcScanner.scan(full=False)": lambda: scanner.scan(unit, GpuReport(), full=False),
            "psutil.net_connections('tcp')": lambda: psutil.net_connections("tcp"),
        }
        out: dict[str, Any] = {"tcp_sockets_open": open_tcp}
        for name, fn in fns.items():
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            out[name] = _stats_ms(times)
        stray.stdin.close()  # type: ignore[union-attr]
        stray.wait(30)
        return out
    finally:
        for s in socks:
            s.close()
        listener.close()
        if helper.stdin is not None:
            helper.stdin.close()  # the helper exits when its stdin closes
        try:
            helper.wait(30)
        except subprocess.TimeoutExpired:
            helper.kill()
            helper.wait()


def failure_observation(node: nd.Node, runs: int) -> dict[str, Any]:
    from hydra_watchdog.config import load_config
    from hydra_watchdog.daemon import build_adapters
    from hydra_watchdog.observation import Probe
    from hydra_watchdog.observe import Observer
    from hydra_watchdog.sim.nvml_state import STATE_ENV

    os.environ[STATE_ENV] = str(node.nvml)
    config = load_config(node.hydra_config)
    adapters = build_adapters(config)
    observer = Observer(
        config,
        tabby=adapters.tabby,
        gpu=adapters.gpu,
        units=adapters.units,
        scanner=adapters.scanner,
        host=adapters.host,
    )
    nd.systemctl("stop", nd.TABBY_UNIT)
    wants = frozenset(Probe)
    observer.observe(wants)  # warm: NVML init, imports
    walls, cpus = [], []
    for _ in range(runs):
        before = (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
        t = time.perf_counter()
        obs = observer.observe(wants)
        walls.append(time.perf_counter() - t)
        after = (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
        cpus.append(sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime
                        for a, b in zip(after, before, strict=True)))  # fmt: skip
    return {
        "probes": sorted(p.value for p in wants),
        "health_outcome": str(obs.health.result.outcome),  # the failure path, as a sanity check
        "wall": _stats_ms(walls),
        "cpu": _stats_ms(cpus),
    }


def run_overhead(node: nd.Node, out: Callable[[str], None], *, quick: bool) -> dict[str, Any]:
    result: dict[str, Any] = {}
    node.reset_faults()
    try:
        seconds = 20.0 if quick else 60.0
        result["polling"] = healthy_polling(node, seconds)
        p = result["polling"]
        for k in ("hydra-watchdog", "monit"):
            out(
                f"  {k:<15} {p[k]['cycles']:.0f} cycles: {p[k]['cpu_ms_per_cycle']:.2f} ms CPU"
                f"/cycle, RSS {p[k]['rss_mb']:.1f} MB"
            )
        result["status"] = status_latency(node, 10 if quick else 50)
        for k, v in result["status"].items():
            out(f"  {k:<26} median {v['median_ms']:.0f} ms, p95 {v['p95_ms']:.0f} ms")
    finally:
        nd.systemctl("stop", OVERHEAD_UNIT, nd.MONIT_UNIT)
    result["port_scan"] = port_scan(5 if quick else 20)
    for k, v in result["port_scan"].items():
        if isinstance(v, dict):
            out(f"  {k:<30} median {v['median_ms']:.1f} ms")
    result["failure_observation"] = failure_observation(node, 5 if quick else 20)
    f = result["failure_observation"]
    out(
        f"  failure-path observation: wall median {f['wall']['median_ms']:.0f} ms, "
        f"CPU median {f['cpu']['median_ms']:.0f} ms"
    )
    return result
