"""The chaos node: TabbyAPI (simulated) and hydra-watchdog as real units of a real systemd.

One systemd namespace per session (the shared `systemd_ns` fixture, overlay root: it never sees
the host's /tmp). This module installs, once per chaos module:

* /opt/tabbyapi, laid out like hydra-ai: `start.sh` execs `python /opt/tabbyapi/main.py` (the
  TabbyAPI simulator: the program an orphan of TabbyAPI runs too) after "importing" ExLlamaV2's
  compiled extension (a real dlopen of a real .so that links to a library under
  /opt/tabbyapi/store, so `ldd` and the import fail together when it is removed);
  `api_tokens.yml`, the fault control file, the request log, `env` (STARTUP_MODEL, config.yml's
  model_name: empty by default, as on hydra-ai where TabbyAPINoModel fires after restarts);
* /mnt/models: a real tmpfs mount holding the main model (20 GiB in the NVML simulator) and the
  fallback (4 GiB);
* the NVML simulator (built with gcc inside the namespace) and its state file;
* `tabbyapi.service` (Type=simple, Restart=on-failure) with the deployment drop-in
  systemd/tabbyapi.service.d/10-hydra-watchdog.conf, and systemd/hydra-watchdog.service, each
  installed from the repository file with these substitutions, and nothing else changed:
    - hydra-watchdog.service: ExecStart -> the venv's `hydra-watchdog run --config ...` with the
      hang hook injected (tests/harness/hooked_hydra_watchdog.py; scenario 14b);
      WatchdogSec=90s -> 12s (the loop's worst real cycle here is ~5 s) and RestartSec=5s -> 1s
      (time compression);
    - 10-hydra-watchdog.conf: RestartSec=15s -> 1s and TimeoutStopSec=60s -> 10s (time
      compression);
    - a chaos drop-in for hydra-watchdog.service: HYDRA_NVML_SIM_STATE (the simulator's state),
      ReadWritePaths= for the simulator's state dir (the simulated driver persists power limits
      there; ProtectSystem=strict would make that read-only), and, when the interpreter lives
      under /root (pyenv), ProtectHome=tmpfs + BindReadOnlyPaths= of only that interpreter tree.
  LoadCredential= stays; inside the namespace it yields an empty credentials dir, so the config
  names tabbyapi.admin_key_file.

Between scenarios (`chaos` fixture) everything is reset: both units stopped and reset-failed, the
watchdog's state wiped, faults cleared, spawned processes killed, the mount, the venv and the
GPUs restored; then TabbyAPI and the watchdog are started and the node must reach healthy with
the model loaded before the scenario injects anything.

Observations come from outside only: `systemctl show`, `journalctl -o json`, `hydra-watchdog
status --json` (and its status.json), the simulator's request log and the process table.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from hydra_watchdog.config import Config, parse_config
from hydra_watchdog.sim import nvml_state
from hydra_watchdog.sim.install import LAUNCHER
from hydra_watchdog.sim.tabby_server import write_control
from tests.harness.systemd_ns import SystemdNamespace, hidden_by_hardening

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
GIB = 1024**3

MAIN = "Midnight-Miqu-70B-v1.5-exl2-2.5bpw"
FALLBACK = "Llama-3.1-8B-exl2-6.0bpw"
MAIN_GIB, FALLBACK_GIB = 20, 4
ADMIN_KEY = "chaos-admin-key-not-secret"
API_KEY = "chaos-api-key"
PORT = 5000

TABBY = "/opt/tabbyapi"
MODELS = "/mnt/models"
SIM_DIR = "/var/lib/hydra-chaos"  # the NVML simulator's library and state
NVML_STATE = f"{SIM_DIR}/nvml.state"
CONTROL = f"{TABBY}/control.json"
REQUEST_LOG = f"{TABBY}/requests.jsonl"
ENV_FILE = f"{TABBY}/env"
PORT_FILE = f"{TABBY}/port"
STORE_LIB = f"{TABBY}/store/libexlchaosdep.so"  # "a Nix store path" the extension links to
CONFIG = "/etc/hydra-watchdog/config.toml"
STATE_DIR = "/var/lib/hydra-watchdog"
STATUS_JSON = "/run/hydra-watchdog/status.json"
WATCHDOG = "hydra-watchdog.service"
TABBY_UNIT = "tabbyapi.service"
POWER_TARGETS = {0: 450.0, 1: 300.0}

# The compressed clock of the suite (seconds); tests derive their bounds from these.
INTERVAL = 0.5
HEALTH_TIMEOUT = 3.0
FAILURES_BEFORE_DOWN = 2
MAX_RESTARTS = 3
BACKOFF_INITIAL = 2.0
BACKOFF_MAX = 8.0
RESET_AFTER = 5.0
WATCHDOG_SEC = 12

CHAOS_CONFIG = f"""
[watchdog]
interval = "{INTERVAL}s"

[tabbyapi]
url = "http://127.0.0.1:{PORT}"
unit = "{TABBY_UNIT}"
admin_key_file = "/etc/hydra-watchdog/admin_key"
health_timeout = "{HEALTH_TIMEOUT}s"
slow_threshold = "1s"
slow_probes = 3
failures_before_down = {FAILURES_BEFORE_DOWN}
startup_grace = "4s"
canary_interval = "3s"
canary_deadline = "2s"
venv = "{TABBY}/venv"
cmdline_patterns = ["{TABBY}"]

[model]
name = "{MAIN}"
models_dir = "{MODELS}"
vram_required_gib = {MAIN_GIB}
load_timeout = "30s"
max_load_attempts = 2
fallback = "{FALLBACK}"
fallback_vram_required_gib = {FALLBACK_GIB}

[restart_loop]
max_restarts = {MAX_RESTARTS}
window = "40s"
backoff_initial = "{BACKOFF_INITIAL}s"
backoff_max = "{BACKOFF_MAX}s"
reset_after = "{RESET_AFTER}s"
escalate_after = "5m"

[gpu]
nvml_library = "{SIM_DIR}/lib/libnvidia-ml.so.1"

[[gpu.device]]
index = 0
power_limit_watts = {POWER_TARGETS[0]:g}

[[gpu.device]]
index = 1
power_limit_watts = {POWER_TARGETS[1]:g}

[orphans]
term_grace = "1s"

[metrics]
listen = ""
"""

START_SH = f"""#!/bin/sh
# TabbyAPI as it runs on hydra-ai: from {TABBY}, with its venv, config.yml's model_name as the
# startup model (STARTUP_MODEL from {ENV_FILE}; empty: none). Its first act is importing
# ExLlamaV2's compiled extension: after a NixOS rebuild removed a library, that import fails
# and TabbyAPI exits 1.
set -e
cd {TABBY}
for ext in {TABBY}/venv/lib/python3*/site-packages/exllamav2_ext*.so; do
    {TABBY}/bin/load-ext "$ext"
done
exec {sys.executable} {TABBY}/main.py --port {PORT} \\
    --models-dir {MODELS} --tokens {TABBY}/api_tokens.yml --flavor exl2 \\
    --control {CONTROL} --request-log {REQUEST_LOG} --startup-model "${{STARTUP_MODEL:-}}" \\
    --load-seconds 0.5 --modules 4 --nvml-state {NVML_STATE} --port-file {PORT_FILE}
"""

TABBY_SERVICE = f"""[Unit]
Description=TabbyAPI (the simulator, laid out like hydra-ai's {TABBY})

[Service]
Type=simple
WorkingDirectory={TABBY}
EnvironmentFile=-{ENV_FILE}
ExecStart={TABBY}/start.sh
Restart=on-failure
"""

LOAD_EXT_C = r"""
#include <dlfcn.h>
#include <stdio.h>
int main(int argc, char **argv) {
    if (argc < 2 || !dlopen(argv[1], RTLD_NOW)) {
        fprintf(stderr, "ImportError: %s\n", argc < 2 ? "no extension" : dlerror());
        return 1;
    }
    return 0;
}
"""

BUILD_TABBY = f"""
set -eu
mkdir -p {TABBY}/bin {TABBY}/store {TABBY}/venv/lib/python3.11/site-packages {SIM_DIR}
cd {TABBY}
printf 'int exl_chaos_dep(void) {{ return 7; }}\\n' > /tmp/dep.c
printf 'int exl_chaos_dep(void);\\nint exl_ext(void) {{ return exl_chaos_dep(); }}\\n' > /tmp/ext.c
gcc -shared -fPIC -o {STORE_LIB} /tmp/dep.c
cp {STORE_LIB} {STORE_LIB}.keep
gcc -shared -fPIC /tmp/ext.c \\
    -o venv/lib/python3.11/site-packages/exllamav2_ext.cpython-311-x86_64-linux-gnu.so \\
    -L{TABBY}/store -lexlchaosdep -Wl,-rpath,{TABBY}/store
gcc -o bin/load-ext /tmp/load-ext.c -ldl
mkdir -p {MODELS}
mountpoint -q {MODELS} || mount -t tmpfs -o size=16m,mode=0755 models {MODELS}
"""


def chaos_config() -> Config:
    return parse_config(tomllib.loads(CHAOS_CONFIG), source="chaos")


def _substitute(text: str, replacements: dict[str, str]) -> str:
    """Replace whole directive lines `Key=old` -> `Key=new`; every key must be found once."""
    lines = text.splitlines()
    for key, new in replacements.items():
        hits = [i for i, line in enumerate(lines) if line.startswith(f"{key}=")]
        assert len(hits) == 1, f"{key}= appears {len(hits)} times in the unit file"
        lines[hits[0]] = f"{key}={new}"
    return "\n".join(lines) + "\n"


def watchdog_unit_text() -> str:
    text = (REPO / "systemd" / "hydra-watchdog.service").read_text(encoding="utf-8")
    return _substitute(
        text,
        {
            "ExecStart": (
                f"{VENV_BIN}/python {REPO}/tests/harness/hooked_hydra_watchdog.py "
                f"--config {CONFIG} --hang-file {STATE_DIR}/hang-loop"
            ),
            "WatchdogSec": f"{WATCHDOG_SEC}s",
            "RestartSec": "1s",
        },
    )


def tabby_dropin_text() -> str:
    text = (REPO / "systemd" / "tabbyapi.service.d" / "10-hydra-watchdog.conf").read_text(
        encoding="utf-8"
    )
    return _substitute(text, {"RestartSec": "1s", "TimeoutStopSec": "10s"})


def watchdog_dropin_text() -> str:
    lines = [
        "[Service]",
        f"Environment=HYDRA_NVML_SIM_STATE={NVML_STATE}",
        f"ReadWritePaths={SIM_DIR}",
    ]
    # the venv (in the checkout) and its interpreter, wherever CI put them
    lines += hidden_by_hardening(REPO, Path(sys.base_prefix))
    return "\n".join(lines) + "\n"


# --- measurements and the summary table -----------------------------------------------------


@dataclass
class Row:
    scenario: str
    trial: int
    detected_s: float | None = None
    recovered_s: float | None = None
    restarts: int | None = None
    verdict: str = "not run"


ROWS: list[Row] = []


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not ROWS:
        return
    header = ("scenario", "trial", "detected", "recovered", "restarts", "verdict")
    rows = [header] + [
        (
            r.scenario,
            str(r.trial),
            _fmt(r.detected_s),
            _fmt(r.recovered_s),
            "-" if r.restarts is None else str(r.restarts),
            r.verdict,
        )
        for r in ROWS
    ]
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    terminalreporter.section("chaos scenarios")
    for i, row in enumerate(rows):
        terminalreporter.write_line("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
        if i == 0:
            terminalreporter.write_line("  ".join("-" * w for w in widths))


# --- the node ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One journald record of the watchdog (the fields the tests read)."""

    at: float  # wall seconds
    fields: dict[str, str]

    def get(self, key: str) -> str:
        return self.fields.get(key, "")

    @property
    def event(self) -> str:
        return self.get("HYDRA_EVENT")

    @property
    def rule(self) -> str:
        return self.get("HYDRA_RULE")

    @property
    def action(self) -> str:
        return self.get("HYDRA_ACTION")

    @property
    def message(self) -> str:
        return self.get("MESSAGE")


RESTART_ACTIONS = ("restart_unit", "start_unit")


@dataclass
class ChaosNode:
    ns: SystemdNamespace
    spawned: list[subprocess.Popen[bytes]] = field(default_factory=list)
    cursor: str = ""
    t0: float = 0.0  # wall time of the injection

    # -- paths ----------------------------------------------------------------------------

    def host_path(self, inside: str) -> Path:
        """A namespace path as the host reaches it (through PID 1's root: the overlay)."""
        return Path(self.ns.root + inside)

    # -- faults ---------------------------------------------------------------------------

    def faults(self, **faults: Any) -> None:
        write_control(self.host_path(CONTROL), **faults)

    def nvml(self) -> Path:
        return self.host_path(NVML_STATE)

    def set_env(self, **env: str) -> None:
        text = "".join(f"{k}={v}\n" for k, v in env.items())
        self.host_path(ENV_FILE).write_text(text, encoding="utf-8")

    # -- units ----------------------------------------------------------------------------

    def show(self, unit: str = TABBY_UNIT) -> dict[str, str]:
        return self.ns.show(
            unit,
            "ActiveState",
            "SubState",
            "Result",
            "NRestarts",
            "MainPID",
            "ControlGroup",
            "InvocationID",
        )

    def systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.ns.systemctl(*args)

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The daemon's status.json ({} until it has written one)."""
        try:
            data = json.loads(self.host_path(STATUS_JSON).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def status_cli(self) -> tuple[int, dict[str, Any]]:
        """`hydra-watchdog status --json`: (exit code, its document: verdict, exit_code, reason,
        report)."""
        proc = self.ns.run([f"{VENV_BIN}/hydra-watchdog", "status", "--json", "--config", CONFIG])
        try:
            data = json.loads(proc.stdout)
        except ValueError:
            raise AssertionError(
                f"status --json printed no JSON: {proc.stdout!r} {proc.stderr!r}"
            ) from None
        return proc.returncode, data

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.ns.run([f"{VENV_BIN}/hydra-watchdog", *args, "--config", CONFIG])

    def serving(self, model: str = MAIN) -> bool:
        """The model serves, as the watchdog says: healthy for the main model; the fallback is
        degraded (WARNING) by design, never OK."""
        s = self.status()
        return (
            s.get("phase") == ("healthy" if model == MAIN else "degraded")
            and (s.get("model") or {}).get("loaded") == model
            and s.get("load") is None
        )

    def findings(self) -> list[dict[str, str]]:
        return list(self.status().get("findings") or [])

    # -- journal --------------------------------------------------------------------------

    def mark(self) -> None:
        """Start a scenario: journal records and times count from here."""
        out = self.ns.journalctl("-n", "1", "-o", "json").stdout.strip().splitlines()
        self.cursor = json.loads(out[-1])["__CURSOR"] if out else ""
        self.t0 = time.time()

    def journal(self, unit: str = WATCHDOG) -> list[Record]:
        """The unit's records since mark(), oldest first."""
        args = ["-o", "json", f"_SYSTEMD_UNIT={unit}"]
        if self.cursor:
            args.append(f"--after-cursor={self.cursor}")
        out = self.ns.journalctl(*args).stdout
        records = []
        for line in out.splitlines():
            try:
                raw = json.loads(line)
            except ValueError:
                continue
            fields = {k: v for k, v in raw.items() if isinstance(v, str)}
            at = int(raw.get("__REALTIME_TIMESTAMP", "0")) / 1e6
            records.append(Record(at, fields))
        return records

    def unit_log(self, unit: str) -> str:
        """Everything the unit and systemd said about it since mark(), as text."""
        args = ["-o", "cat", "-u", unit]
        if self.cursor:
            args.append(f"--after-cursor={self.cursor}")
        return self.ns.journalctl(*args).stdout

    def decisions(self) -> list[Record]:
        return [r for r in self.journal() if r.event]

    def actions(self, name: str | None = None) -> list[Record]:
        return [
            r
            for r in self.decisions()
            if r.event in ("action", "action_failed", "action_refused")
            and (name is None or r.action == name)
        ]

    def restarts_issued(self) -> int:
        return sum(1 for r in self.actions() if r.action in RESTART_ACTIONS and r.event == "action")

    def timeline(self) -> str:
        """The scenario's decisions and TabbyAPI's unit log, for a failure report."""
        lines = [
            f"{r.at - self.t0:7.2f}s {r.event:<15} {r.get('HYDRA_STATE'):<10} {r.rule:<18} "
            f"{r.action:<16} {r.message} | {r.get('HYDRA_REASON')}"
            for r in self.decisions()
        ]
        return "\n".join([*lines, "--- tabbyapi.service ---", self.unit_log(TABBY_UNIT)[-3000:]])

    def first(self, pred: Callable[[Record], bool]) -> Record | None:
        return next((r for r in self.decisions() if pred(r)), None)

    # -- TabbyAPI's request log -----------------------------------------------------------

    def requests(self, since: float | None = None) -> list[dict[str, Any]]:
        try:
            text = self.host_path(REQUEST_LOG).read_text(encoding="utf-8")
        except OSError:
            return []
        out = []
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if since is None or entry.get("time", 0) >= since:
                    out.append(entry)
        return out

    def loads(self, since: float | None = None) -> list[dict[str, Any]]:
        since = self.t0 if since is None else since
        return [r for r in self.requests(since) if r.get("path") == "/v1/model/load"]

    # -- processes ------------------------------------------------------------------------

    def processes(self) -> dict[int, str]:
        """The namespace's process table: {pid: command line}."""
        out = self.ns.run(["ps", "-ww", "-eo", "pid=,args="]).stdout
        table = {}
        for line in out.splitlines():
            pid, _, args = line.strip().partition(" ")
            if pid.isdigit():
                table[int(pid)] = args.strip()
        return table

    def alive(self, pid: int) -> bool:
        return pid in self.processes()

    def spawn(self, argv: list[str], marker: str, timeout: float = 30.0) -> int:
        """Start argv inside the namespace, outside every unit's cgroup; its pid there. `marker`
        is a substring of its command line that nothing else has."""
        proc = self.ns.spawn(argv)
        self.spawned.append(proc)
        found: list[int] = []

        def started() -> bool:
            found[:] = [
                p for p, cmd in self.processes().items() if marker in cmd and "nsenter" not in cmd
            ]
            return bool(found)

        self.ns.wait_for(started, timeout=timeout, what=f"spawned {marker}")
        return found[0]

    def spawn_tabby_orphan(self, port: int, marker: str) -> int:
        """A TabbyAPI process left over from an earlier run: the simulator run as TabbyAPI's
        `main.py` from its install tree, as root (the unit's user), in no unit."""
        control = f"{TABBY}/{marker}.control.json"
        self.host_path(control).write_text("{}")
        return self.spawn(
            [
                sys.executable,
                f"{TABBY}/main.py",
                "--port",
                str(port),
                "--models-dir",
                MODELS,
                "--control",
                control,
                "--port-file",
                f"{TABBY}/{marker}.port",
            ],
            marker,
        )

    def listening(self, port: int) -> int | None:
        """The pid listening on 127.0.0.1:port inside, from `ss` (None: nobody)."""
        out = self.ns.run(["ss", "-Htlnp", f"sport = :{port}"]).stdout
        for token in out.replace(",", " ").split():
            if token.startswith("pid="):
                return int(token[4:])
        return None

    def http(self, path: str, *, method: str = "GET", port: int = PORT) -> tuple[int, str]:
        """curl inside the namespace, with the admin key."""
        proc = self.ns.run(
            [
                "curl", "-s", "-m", "5", "-X", method, "-o", "-", "-w", "\n%{http_code}",
                "-H", f"Authorization: Bearer {ADMIN_KEY}",
                f"http://127.0.0.1:{port}{path}",
            ]
        )  # fmt: skip
        body, _, code = proc.stdout.rpartition("\n")
        return int(code or 0), body

    def unload(self) -> None:
        code, body = self.http("/v1/model/unload", method="POST")
        assert code == 200, (code, body)

    # -- waiting --------------------------------------------------------------------------

    def wait(
        self, pred: Callable[[], bool], timeout: float, what: str | Callable[[], str]
    ) -> float:
        """Poll until pred(); seconds since mark()."""
        self.ns.wait_for(pred, timeout=timeout, what=what)
        return time.time() - self.t0

    def describe(self) -> str:
        s = self.status()
        keep = {k: s.get(k) for k in ("phase", "summary", "model", "backoff", "findings", "unit")}
        return json.dumps(keep)[:3000]

    # -- reset ----------------------------------------------------------------------------

    def kill_spawned(self) -> None:
        for proc in self.spawned:
            SystemdNamespace.kill_spawned(proc)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        self.spawned.clear()

    def reset(self) -> None:
        ns = self.ns
        # A hung loop (scenario 14b) would ignore SIGTERM until TimeoutStopSec.
        self.host_path(f"{STATE_DIR}/hang-loop").unlink(missing_ok=True)
        ns.systemctl("stop", WATCHDOG, TABBY_UNIT)
        ns.systemctl("reset-failed", WATCHDOG, TABBY_UNIT)
        self.kill_spawned()
        script = f"""
        rm -rf {STATE_DIR}/* {TABBY}/*.control.json {TABBY}/*.port {PORT_FILE}
        cp {STORE_LIB}.keep {STORE_LIB}
        """
        ns.run(["sh", "-c", script], check=True)
        self.reset_models()
        self.faults()
        self.set_env(STARTUP_MODEL="")
        self.host_path(REQUEST_LOG).write_text("")
        state = nvml_state.default_state()
        devices = tuple(
            replace(d, power_limit_mw=int(POWER_TARGETS[d.index] * 1000)) for d in state.devices
        )
        nvml_state.write_state(self.nvml(), replace(state, devices=devices))

    def reset_models(self) -> None:
        """The models mount with the main and the fallback model, as on a healthy node."""
        script = f"mountpoint -q {MODELS} || mount -t tmpfs -o size=16m,mode=0755 models {MODELS}"
        self.ns.run(["sh", "-c", script], check=True)
        for name, gib in ((MAIN, MAIN_GIB), (FALLBACK, FALLBACK_GIB)):
            folder = self.host_path(f"{MODELS}/{name}")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.json").write_text(json.dumps({"sim_vram_bytes": gib * GIB}))
            (folder / "output.safetensors").write_bytes(b"\0" * 4096)

    def start(self) -> None:
        """TabbyAPI, then the watchdog; healthy with the main model loaded before returning."""
        assert self.systemctl("start", TABBY_UNIT).returncode == 0, self.unit_log(TABBY_UNIT)
        started = self.systemctl("start", WATCHDOG)
        assert started.returncode == 0, self.ns.journalctl("-u", WATCHDOG, "-n", "40").stdout
        self.wait(self.serving, 60, lambda: f"baseline healthy ({self.describe()})")
        self.mark()


def install_chaos_node(ns: SystemdNamespace) -> ChaosNode:
    """Lay the chaos node out in a booted namespace (the fixture below; `make alerts` too)."""
    node = ChaosNode(ns)
    ns.write_file("/tmp/load-ext.c", LOAD_EXT_C)
    ns.run(["sh", "-c", BUILD_TABBY], check=True, timeout=120)
    built = ns.python(
        "from pathlib import Path; from hydra_watchdog.sim.nvml_build import build_nvml_sim; "
        f"print(build_nvml_sim(Path('{SIM_DIR}/lib')))",
        timeout=120,
    )
    assert built.returncode == 0, built.stderr
    ns.write_file(f"{TABBY}/start.sh", START_SH, 0o755)
    ns.write_file(f"{TABBY}/main.py", LAUNCHER)
    ns.write_file(f"{TABBY}/api_tokens.yml", f"api_key: {API_KEY}\nadmin_key: {ADMIN_KEY}\n")
    ns.write_file("/etc/hydra-watchdog/admin_key", ADMIN_KEY + "\n", 0o600)
    ns.write_file(CONFIG, CHAOS_CONFIG)
    ns.write_file(f"/etc/systemd/system/{TABBY_UNIT}.d/10-hydra-watchdog.conf", tabby_dropin_text())
    ns.write_file(f"/etc/systemd/system/{WATCHDOG}.d/50-chaos.conf", watchdog_dropin_text())
    ns.write_file(f"/etc/systemd/system/{TABBY_UNIT}", TABBY_SERVICE)
    ns.install_unit(WATCHDOG, watchdog_unit_text())
    # The harness boots systemd with --log-target=console; the scenarios read what PID 1 says
    # about the units ("Watchdog timeout", exit statuses) from the journal, like `journalctl -u`
    # on a real node. Set back at teardown.
    assert ns.systemctl("log-target", "journal").returncode == 0
    # On a real host systemd makes / shared, so a service's private mount namespace
    # (ProtectSystem=strict) is a slave and sees /mnt/models vanish (scenario 15). In container
    # mode it does not, and the harness root is private: share it, inside the namespace only
    # (unshare --propagation private already cut every link to the host's mounts).
    ns.run(["mount", "--make-rshared", "/"], check=True)
    checked = ns.run([f"{VENV_BIN}/hydra-watchdog", "check-config", "--config", CONFIG])
    assert checked.returncode == 0, checked.stdout + checked.stderr
    return node


def remove_chaos_node(node: ChaosNode) -> None:
    """Undo install_chaos_node: the namespace is as booted again (for the next module)."""
    ns = node.ns
    node.kill_spawned()
    for unit in (WATCHDOG, TABBY_UNIT):
        ns.reset_unit(unit, remove=True)
    ns.run(
        [
            "sh",
            "-c",
            f"rm -rf /etc/systemd/system/{WATCHDOG}.d /etc/systemd/system/{TABBY_UNIT}.d "
            f"{STATE_DIR}; umount {MODELS} || true",
        ]
    )
    ns.daemon_reload()
    ns.systemctl("log-target", "console")
    ns.run(["mount", "--make-rprivate", "/"])


@pytest.fixture(scope="module")
def chaos_node(systemd_ns: SystemdNamespace) -> Iterator[ChaosNode]:
    node = install_chaos_node(systemd_ns)
    try:
        yield node
    finally:
        remove_chaos_node(node)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "no_autostart: the chaos scenario arranges the node before the watchdog starts"
    )


TRIALS = max(1, int(os.environ.get("CHAOS_TRIALS", "1") or 1))
# The call phase's report, kept on the test item for the fixture's teardown to read.
REP_CALL = pytest.StashKey[pytest.TestReport]()


@pytest.fixture(params=range(1, TRIALS + 1), ids=lambda t: f"trial{t}")
def chaos(request: pytest.FixtureRequest, chaos_node: ChaosNode) -> Iterator[tuple[ChaosNode, Row]]:
    """A freshly reset, serving node for one scenario, and its row in the summary table."""
    name = request.node.originalname.removeprefix("test_")
    row = Row(scenario=name, trial=int(request.param))
    ROWS.append(row)
    chaos_node.reset()
    start_watchdog = request.node.get_closest_marker("no_autostart") is None
    if start_watchdog:
        chaos_node.start()
    try:
        yield chaos_node, row
    except BaseException:
        row.verdict = "FAILED"
        raise
    finally:
        rep = request.node.stash.get(REP_CALL, None)
        if rep is not None:
            row.verdict = "pass" if rep.passed else "FAILED"
        if rep is None or not rep.passed:
            print(chaos_node.timeline())  # shown with the failure: what the watchdog decided


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    if rep.when == "call":
        item.stash[REP_CALL] = rep
    return rep
