"""Overhead and latency, inside the namespace, with TabbyAPI healthy unless said otherwise.

- Healthy polling, side by side in one window against the same healthy TabbyAPI: hydra-watchdog
  as it is now ("after") and as it was at BEFORE_COMMIT ("before", from `git archive`, run by a
  launcher that puts that tree first on sys.path, with the same venv), both at a 1 s interval
  (the project's defaults with every duration divided by the bench's time compression, so a
  cycle does what a production cycle does, canary every 12 cycles included), monit at the same
  1 s, and both hydra-watchdog trees again at the production defaults (5 s interval). CPU is the
  unit's cgroup v2 `cpu.stat` usage_usec (every thread and child process, exited or not; the
  scheduler's runtime, not ticks); /proc/PID/task/*/schedstat of the main process plus its reaped
  children's cutime/cstime is recorded beside it as a cross-check (it misses threads that exited
  in the window). RSS is the main process's: the largest VmRSS sampled once a second, and VmHWM.
- The same polling again for "after" and monit with 500 more processes running, as on a node.
- Status latency: `hydra-watchdog status` (after, before) against `systemctl status tabbyapi`,
  and `python -c pass` with the same interpreter as the floor; wall time of whole commands, run
  round-robin, with .pyc files compiled and PYTHONDONTWRITEBYTECODE unset (a production install).
- The floor under a Python cycle, in a window of its own after those: one GET /health a second
  by ever thinner clients (bench/floor.py), from the interpreter asleep to hydra-watchdog's own
  /health probe.
- The port-ownership scan (ProcScanner.scan, full) with 20,000 TCP sockets open, against
  psutil.net_connections(); the cycle's scan with 500 more processes running.
- One full observation on the failure path (TabbyAPI stopped; every expensive probe asked for),
  with the production adapters.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import floor
from bench import node as nd
from bench.probe import sample

if TYPE_CHECKING:
    from hydra_watchdog.observation import UnitStatus

BEFORE_COMMIT = "a2334b4"  # main before issue 15's work
BEFORE = nd.ROOT / "before"
INTERVAL = 1.0  # hydra-watchdog's and monit's interval for the per-cycle comparison
PRODUCTION_INTERVAL = 5.0  # hydra-watchdog's default
# 60 s holds 60 cycles at 1 s and exactly 5 canaries (every 12 s compressed): the window's mix of
# cycles is the production one, whatever the phase.
POLL_SECONDS = 60.0
POLL_SECONDS_QUICK = 24.0
SETTLE_S = 2.0  # after every unit is up: past the first cycles
SOCKET_PAIRS = 10_000  # 20,000 sockets (plus the listener)
CROWD = 500  # processes added for the scan on a busy host
FLOOR = "floor: "  # the names of bench/floor.py's clients in their window
_LAUNCHER = """\"\"\"hydra-watchdog from the tree beside this file (the benchmark's "before").\"\"\"
import os
import sys

TREE = {tree!r}
sys.path.insert(0, TREE)
import hydra_watchdog  # noqa: E402

if not hydra_watchdog.__file__.startswith(TREE + "/"):
    sys.exit(f"bench launcher: hydra_watchdog came from {{hydra_watchdog.__file__}}, not {{TREE}}")
if os.environ.get("HYDRA_BENCH_WHICH"):
    print(hydra_watchdog.__file__)
    sys.exit(0)
from hydra_watchdog.cli import main  # noqa: E402

sys.exit(main())
"""
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


def production_env() -> dict[str, str]:
    """The environment of a production install: Python writes and reads .pyc files."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def lay_out_before(node: nd.Node) -> dict[str, Any]:
    """BEFORE_COMMIT's hydra_watchdog under BEFORE with a launcher; {"launcher"} or {"skipped"}.

    The launcher refuses to run when another hydra_watchdog (the editable install's) shadows the
    tree; `package` records where it imported it from."""
    out: dict[str, Any] = {"commit": BEFORE_COMMIT}
    if shutil.which("git") is None:
        return {**out, "skipped": "git is not installed"}
    git = ["git", "-c", "safe.directory=*", "-C", str(node.repo)]
    found = nd.sh(*git, "rev-parse", "--verify", "-q", f"{BEFORE_COMMIT}^{{commit}}")
    if found.returncode != 0:
        why = found.stderr.strip() or "not in this checkout's history"
        return {**out, "skipped": f"commit {BEFORE_COMMIT}: {why}"}
    shutil.rmtree(BEFORE, ignore_errors=True)
    BEFORE.mkdir(parents=True)
    archive = subprocess.run(
        [*git, "archive", BEFORE_COMMIT, "hydra_watchdog"], capture_output=True, check=False
    )
    untar = subprocess.run(
        ["tar", "-x", "-C", str(BEFORE)], input=archive.stdout, capture_output=True, check=False
    )
    if archive.returncode != 0 or untar.returncode != 0:
        why = (archive.stderr or untar.stderr).decode(errors="replace").strip()
        return {**out, "skipped": f"git archive {BEFORE_COMMIT} failed: {why}"}
    # Named as the console script is: `status` knows its daemon by "hydra-watchdog" in argv.
    launcher = BEFORE / "hydra-watchdog"
    launcher.write_text(_LAUNCHER.format(tree=str(BEFORE)))
    which = subprocess.run(
        [node.python, str(launcher)],
        capture_output=True,
        text=True,
        check=False,
        env={**production_env(), "HYDRA_BENCH_WHICH": "1"},
    )
    package = which.stdout.strip()
    if which.returncode != 0 or not package.startswith(f"{BEFORE}/"):
        return {**out, "skipped": f"the launcher failed: {(which.stderr or package).strip()}"}
    return {**out, "launcher": str(launcher), "package": package}


@dataclass(frozen=True)
class Watched:
    """One supervisor in the polling window."""

    name: str  # "after", "before", "after @5s", "before @5s", "monit", "floor: raw", ...
    unit: str
    interval: float
    config: Path | None = None  # hydra-watchdog's config file


@dataclass(frozen=True)
class CpuSnapshot:
    cgroup_ns: int | None  # the unit's cgroup v2 cpu.stat usage_usec, in ns; None: unreadable
    threads_ns: int  # schedstat field 1 of the main process's live threads
    children_ticks: int  # cutime + cstime of the main process (its reaped children)


def _cpu_stat(cgroup: str) -> Path | None:
    """The unit's cgroup v2 cpu.stat (pure v2, or the unified hierarchy of a hybrid one)."""
    for base in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        path = Path(base + cgroup) / "cpu.stat"
        try:
            if "usage_usec" in path.read_text():
                return path
        except OSError:
            continue
    return None


def _usage_ns(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) * 1000
    except (OSError, ValueError):
        pass
    return None


def _threads_ns(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread exited between the listing and the read
    return total


def _children_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[13]) + int(fields[14])  # cutime, cstime: fields 16-17 (fields[0] is 3)


def _snapshot(pid: int, cpu_stat: Path | None) -> CpuSnapshot:
    return CpuSnapshot(_usage_ns(cpu_stat), _threads_ns(pid), _children_ticks(pid))


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    return 0


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


def _watched(node: nd.Node, before: dict[str, Any]) -> list[Watched]:
    """Writes the config files and units of every hydra-watchdog in the window."""
    library = nd.ROOT / "lib" / "libnvidia-ml.so.1"
    trees = [("after", "")]
    if "launcher" in before:
        trees.append(("before", f"{node.python} {before['launcher']}"))
    out: list[Watched] = []
    for tree, argv0 in trees:
        for interval, factor in ((INTERVAL, nd.COMPRESSION), (PRODUCTION_INTERVAL, 1.0)):
            name = tree if interval == INTERVAL else f"{tree} @{interval:g}s"
            unit = f"hydra-bench-{tree}-{interval:g}s.service"
            config = nd.ROOT / f"hydra-{tree}-{interval:g}s.toml"
            config.write_text(
                nd.hydra_toml(
                    node,
                    library,
                    factor,
                    interval=interval,
                    state_dir=str(nd.ROOT / f"state-{tree}-{interval:g}s"),
                    runtime_dir=str(nd.ROOT / f"run-{tree}-{interval:g}s"),
                )
            )
            Path("/etc/systemd/system", unit).write_text(nd.hydra_unit(node, config, argv0))
            out.append(Watched(name, unit, interval, config))
    return out


def _floors(node: nd.Node) -> list[Watched]:
    """Writes the units of bench/floor.py's clients."""
    out: list[Watched] = []
    for variant in floor.VARIANTS:
        unit = f"hydra-bench-floor-{variant}.service"
        Path("/etc/systemd/system", unit).write_text(floor_unit(node, variant))
        out.append(Watched(f"{FLOOR}{variant}", unit, floor.INTERVAL))
    return out


def floor_unit(node: nd.Node, variant: str) -> str:
    """One of bench/floor.py's clients: GET /health once a second (see its docstring)."""
    return f"""[Unit]
Description=Python floor: {variant} (benchmark)

[Service]
WorkingDirectory={node.repo}
ExecStart={node.python} {node.repo}/bench/floor.py {variant} {nd.PORT}
"""


def _start(watched: list[Watched]) -> subprocess.CompletedProcess[str]:
    """A healthy TabbyAPI, then every unit of `watched` (one start job each, in parallel; a
    Type=notify unit is up after its first cycle), past their first cycles."""
    nd.systemctl("daemon-reload")
    nd.systemctl("start", nd.TABBY_UNIT)
    if not nd.wait_until(lambda: sample(nd.PORT, nd.API_KEY, nd.MAIN_MODEL).healthy, 60, 0.2):
        raise RuntimeError("TabbyAPI did not serve its model within 60 s")
    started = nd.systemctl("start", *(w.unit for w in watched))
    time.sleep(SETTLE_S)
    return started


def healthy_polling(
    node: nd.Node, seconds: float, watched: list[Watched], *, monit: bool = True
) -> dict[str, Any]:
    """CPU per cycle and RSS of every supervisor in `watched` plus monit, all in one window."""
    everyone = [*watched]
    if monit:
        everyone.append(Watched("monit", nd.MONIT_UNIT, float(nd.monit_interval())))
    started = _start(everyone)
    out: dict[str, Any] = {"interval_s": INTERVAL, "supervisors": {}}
    failed: dict[str, str] = {}
    live: list[tuple[Watched, int, Path | None]] = []
    for w in everyone:
        props = nd.show(w.unit, "MainPID", "ControlGroup", "ActiveState", "Result")
        pid = int(props.get("MainPID", "0") or 0)
        if props.get("ActiveState") != "active" or pid <= 0:
            failed[w.name] = (
                f"{w.unit} is {props.get('ActiveState')} ({props.get('Result')}): "
                f"{started.stderr.strip()[:300]}"
            )
            continue
        live.append((w, pid, _cpu_stat(props.get("ControlGroup", ""))))
    hz = os.sysconf("SC_CLK_TCK")
    first = {w.name: _snapshot(pid, cg) for w, pid, cg in live}
    rss = {w.name: _status_kb(pid, "VmRSS") for w, pid, _ in live}
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        time.sleep(1.0)
        for w, pid, _ in live:
            rss[w.name] = max(rss[w.name], _status_kb(pid, "VmRSS"))
    elapsed = time.monotonic() - t0
    for w, pid, cg in live:
        last = _snapshot(pid, cg)
        a = first[w.name]
        now_pid = int(nd.show(w.unit, "MainPID").get("MainPID", "0") or 0)
        if now_pid != pid:
            failed[w.name] = f"{w.unit}'s main process changed in the window ({pid} -> {now_pid})"
            continue
        cgroup_ns = None if a.cgroup_ns is None or last.cgroup_ns is None else (
            last.cgroup_ns - a.cgroup_ns
        )  # fmt: skip
        threads_ns = last.threads_ns - a.threads_ns
        children_ns = (last.children_ticks - a.children_ticks) * 1e9 / hz
        cpu_ns = cgroup_ns if cgroup_ns is not None else threads_ns + children_ns
        cycles = elapsed / w.interval
        out["supervisors"][w.name] = {
            "unit": w.unit,
            "interval_s": w.interval,
            "cycles": cycles,
            "cpu_source": "cgroup" if cgroup_ns is not None else "schedstat+cutime",
            "cgroup_ms": None if cgroup_ns is None else cgroup_ns / 1e6,
            "threads_ms": threads_ns / 1e6,
            "children_ms": children_ns / 1e6,
            "cpu_ms_per_cycle": cpu_ns / 1e6 / cycles,
            "cpu_pct": cpu_ns / 1e9 / elapsed * 100,
            "rss_mb": rss[w.name] * 1024 / 1e6,
            "hwm_mb": _status_kb(pid, "VmHWM") * 1024 / 1e6,
        }
    out["seconds"] = elapsed
    out["failed"] = failed
    return out


def status_latency(
    node: nd.Node, runs: int, watched: list[Watched], before: dict[str, Any]
) -> dict[str, Any]:
    """Whole-command wall times, round-robin (one of each per round), after one warm-up round."""
    env = production_env()
    compiled = [str(node.repo / "hydra_watchdog")]
    configs = {w.name: w.config for w in watched if w.config is not None}
    commands: dict[str, list[str]] = {"python -c pass": [node.python, "-c", "pass"]}
    if "launcher" in before and "before" in configs:
        compiled.append(str(BEFORE / "hydra_watchdog"))
        commands[f"hydra-watchdog status @{BEFORE_COMMIT}"] = [
            node.python, before["launcher"], "status", "--config", str(configs["before"])
        ]  # fmt: skip
    commands["hydra-watchdog status"] = [
        node.hydra_bin, "status", "--config", str(configs["after"])
    ]  # fmt: skip
    commands["systemctl status tabbyapi"] = ["systemctl", "status", "--no-pager", nd.TABBY_UNIT]
    done = subprocess.run(
        [node.python, "-m", "compileall", "-q", *compiled],
        env=env,
        capture_output=True,
        check=False,
    )
    times: dict[str, list[float]] = {name: [] for name in commands}
    codes: dict[str, int] = {}
    said: dict[str, str] = {}  # the last run's first line of output: what the exit code means
    for round_ in range(runs + 1):
        for name, argv in commands.items():
            t = time.perf_counter()
            ran = subprocess.run(argv, capture_output=True, check=False, timeout=30, env=env)
            if round_:
                times[name].append(time.perf_counter() - t)
            codes[name] = ran.returncode
            said[name] = next(iter((ran.stdout or ran.stderr).decode(errors="replace").strip()
                                   .splitlines()), "")[:300]  # fmt: skip
    out: dict[str, Any] = {
        name: {**_stats_ms(v), "exit": codes[name], "output": said[name]}
        for name, v in times.items()
    }
    out["compileall_exit"] = done.returncode
    out["status_read_the_config"] = status_read_the_config(
        [node.python, "-X", "importtime", *commands["hydra-watchdog status"]], env
    )
    return out


# What `status` imports only when its config leads it nowhere else (report/status_file.py): a
# figure taken while it does is not what a user with the daemon's own config gets.
CONFIG_PATH_MODULES = ("hydra_watchdog.config", "tomllib", "dataclasses")


def status_read_the_config(argv: list[str], env: dict[str, str]) -> list[str]:
    """The modules of CONFIG_PATH_MODULES one more run of `argv` imported (none: the report was
    found from the daemon's view of the config, as on a node)."""
    ran = subprocess.run(argv, capture_output=True, check=False, timeout=30, env=env, text=True)
    seen = {line.rsplit("|", 1)[-1].strip() for line in ran.stderr.splitlines()}
    return [m for m in CONFIG_PATH_MODULES if m in seen]


@contextlib.contextmanager
def _crowd() -> Iterator[None]:
    """CROWD more processes on the host (sleeping) while the block runs."""
    crowd = [subprocess.Popen(["sleep", "3600"]) for _ in range(CROWD)]
    try:
        yield
    finally:
        for proc in crowd:
            proc.kill()
        for proc in crowd:
            proc.wait()


def crowded_scan(unit: UnitStatus, runs: int) -> dict[str, Any]:
    """The cycle's scan (full=False) on a host with CROWD more processes, as a node runs: a new
    scanner's first scan reads every process's command line (so does each rescan, every
    procs.RESCAN_EVERY), the scans after it only those of new processes."""
    from hydra_watchdog.adapters.identity import all_pids
    from hydra_watchdog.adapters.procs import RESCAN_EVERY, ProcScanner
    from hydra_watchdog.observation import GpuReport

    with _crowd():
        count = len(all_pids())
        first: list[float] = []
        steady: list[float] = []
        for _ in range(runs):
            scanner = ProcScanner(nd.PORT, [str(nd.ROOT / "models")])
            for times in (first, steady):
                t = time.perf_counter()
                scanner.scan(unit, GpuReport(), full=False)
                times.append(time.perf_counter() - t)
    label = f"ProcScanner.scan(full=False), {count} processes"
    return {
        f"{label}: first, or a rescan (every {RESCAN_EVERY:g} s)": _stats_ms(first),
        f"{label}: the cycles between": _stats_ms(steady),
    }


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
            # psutil is the reference, not a target: a few runs show its order of magnitude.
            for _ in range(min(runs, 5) if name.startswith("psutil") else runs):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            out[name] = _stats_ms(times)
        out.update(crowded_scan(unit, runs))
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


def floor_window(node: nd.Node, seconds: float, out: Callable[[str], None]) -> dict[str, Any]:
    """bench/floor.py's clients polling together. A window of their own: monit's `check
    process … matching` reads every process's command line each cycle, so five more processes
    would raise monit's figure."""
    floors = _floors(node)
    try:
        f = healthy_polling(node, seconds, floors, monit=False)
    finally:
        nd.systemctl("stop", *(w.unit for w in floors))
    for k, v in f["supervisors"].items():
        out(f"  {k:<15} {v['cycles']:.0f} cycles: {v['cpu_ms_per_cycle']:.2f} ms CPU/cycle")
    for k, why in f["failed"].items():
        out(f"  {k:<15} not measured: {why}")
    return f


def crowded_window(
    node: nd.Node, seconds: float, watched: list[Watched], out: Callable[[str], None]
) -> dict[str, Any]:
    """This checkout and monit polling again with CROWD more processes. A node runs hundreds of
    processes, the namespace a handful; monit walks every process each cycle, the scan reads
    every command line at its rescans."""
    after = [w for w in watched if w.name == "after"]
    with _crowd():
        try:
            c = healthy_polling(node, seconds, after)
        finally:
            nd.systemctl("stop", *(w.unit for w in after), nd.MONIT_UNIT)
    c["added_processes"] = CROWD
    for k, v in c["supervisors"].items():
        out(f"  {k:<15} +{CROWD} processes: {v['cpu_ms_per_cycle']:.2f} ms CPU/cycle")
    for k, why in c["failed"].items():
        out(f"  {k:<15} not measured: {why}")
    return c


def _print_status(status: dict[str, Any], out: Callable[[str], None]) -> None:
    for k, v in status.items():
        if isinstance(v, dict):
            out(f"  {k:<34} median {v['median_ms']:.0f} ms, p95 {v['p95_ms']:.0f} ms")
    if status.get("status_read_the_config"):
        read = ", ".join(status["status_read_the_config"])
        out(f"  status read its config ({read}): not the figure a node's status has")


def run_status_only(node: nd.Node, out: Callable[[str], None], *, quick: bool) -> dict[str, Any]:
    """`python -m bench --only status`: the status latency of run_overhead alone, against the
    same daemons (started, past their first cycles), without the windows around it."""
    node.reset_faults()
    before = lay_out_before(node)
    watched = _watched(node, before)
    try:
        _start(watched)
        status = status_latency(node, 20 if quick else 50, watched, before)
    finally:
        nd.systemctl("stop", *(w.unit for w in watched))
    _print_status(status, out)
    return {"before": before, "status": status}


def run_overhead(node: nd.Node, out: Callable[[str], None], *, quick: bool) -> dict[str, Any]:
    result: dict[str, Any] = {}
    node.reset_faults()
    before = lay_out_before(node)
    result["before"] = before
    out(f"  before ({BEFORE_COMMIT}): {before.get('package') or before.get('skipped')}")
    watched = _watched(node, before)
    try:
        seconds = POLL_SECONDS_QUICK if quick else POLL_SECONDS
        result["polling"] = p = healthy_polling(node, seconds, watched)
        for k, v in p["supervisors"].items():
            out(
                f"  {k:<15} {v['cycles']:.0f} cycles: {v['cpu_ms_per_cycle']:.2f} ms CPU/cycle "
                f"({v['cpu_source']}), RSS {v['rss_mb']:.1f} MB"
            )
        for k, why in p["failed"].items():
            out(f"  {k:<15} not measured: {why}")
        result["status"] = status_latency(node, 20 if quick else 50, watched, before)
        _print_status(result["status"], out)
    finally:
        nd.systemctl("stop", *(w.unit for w in watched), nd.MONIT_UNIT)
    result["floor"] = floor_window(node, seconds, out)
    result["crowded"] = crowded_window(node, seconds, watched, out)
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
