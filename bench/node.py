"""The simulated node inside the namespace: files, units and the three supervisors' set-ups.

Runs inside the namespace (as PID-1-systemd's root), so paths are the namespace's own. Time is
compressed by COMPRESSION for everyone: hydra-watchdog's duration defaults and its tabbyapi
drop-in are divided by it, and monit's cycle equals hydra-watchdog's compressed interval.
systemd's stock settings (RestartSec=100ms, 5 starts per 10 s) are what a user gets without a
watchdog and are left as they are.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from hydra_watchdog.config import SECTIONS, parse_config
from hydra_watchdog.sim import nvml_state
from hydra_watchdog.sim.nvml_build import build_nvml_sim
from hydra_watchdog.sim.tabby_server import write_control

COMPRESSION = 5.0  # every supervisor's time constants are divided by this
ROOT = Path("/srv/hydra-bench")
PORT = 5000
MAIN_MODEL = "Midnight-Miqu-70B-v1.5-exl2-2.5bpw"
MODEL_GIB = 20.0  # fits the simulated RTX 5090 (32 GiB) alone, not beside a 20 GiB leak
LOAD_SECONDS = 1.0
API_KEY = "bench-api-key-not-secret"
ADMIN_KEY = "bench-admin-key-not-secret"
TABBY_UNIT = "tabbyapi.service"
HYDRA_UNIT = "hydra-bench-watchdog.service"
MONIT_UNIT = "monit-bench.service"
SUPERVISORS = ("hydra-watchdog", "systemd", "monit")
GIB = 1 << 30


def sh(*argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def systemctl(*args: str) -> subprocess.CompletedProcess[str]:
    return sh("systemctl", *args)


def show(unit: str, *props: str) -> dict[str, str]:
    out = systemctl("show", unit, *(f"-p{p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@dataclass(frozen=True)
class Node:
    repo: Path
    python: str

    @property
    def models(self) -> Path:
        return ROOT / "models"

    @property
    def control(self) -> Path:
        return ROOT / "control.json"

    @property
    def nvml(self) -> Path:
        return ROOT / "nvml.state"

    @property
    def requests(self) -> Path:
        return ROOT / "requests.jsonl"

    @property
    def hydra_config(self) -> Path:
        return ROOT / "hydra.toml"

    @property
    def monitrc(self) -> Path:
        return ROOT / "monitrc"

    @property
    def hydra_bin(self) -> str:
        return str(Path(self.python).parent / "hydra-watchdog")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{PORT}"

    def reset_faults(self) -> None:
        write_control(self.control)
        nvml_state.write_state(self.nvml, nvml_state.default_state())

    @property
    def install(self) -> Path:
        """TabbyAPI's install tree on this node (tabbyapi.cmdline_patterns)."""
        return ROOT / "tabbyapi"

    @property
    def program(self) -> Path:
        """TabbyAPI's program, the one its unit runs: the simulator, or with --zombie first a
        leftover process (bench/zombie.py), so that an orphan runs TabbyAPI's very program."""
        return self.install / "main.py"

    def zombie_argv(self, *extra: str, orphan: bool) -> list[str]:
        """An orphan runs TabbyAPI's own program, left behind (so it is TabbyAPI's by the
        identity rules); a foreign process `python -m bench.zombie` from the repo."""
        if not orphan:
            return [self.python, "-m", "bench.zombie", *extra]
        return [self.python, str(self.program), "--zombie", *extra]


_PROGRAM = """\
import runpy, sys
if sys.argv[1:2] == ["--zombie"]:
    del sys.argv[1]
    sys.path.insert(0, {repo!r})
    runpy.run_module("bench.zombie", run_name="__main__", alter_sys=True)
else:
    runpy.run_module("hydra_watchdog.sim.tabby_server", run_name="__main__", alter_sys=True)
"""


def build_node(repo: Path) -> Node:
    node = Node(repo=repo, python=sys.executable)
    if ROOT.exists():
        shutil.rmtree(ROOT)
    folder = node.models / MAIN_MODEL
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"sim_vram_bytes": int(MODEL_GIB * GIB)}))
    (folder / "output.safetensors").write_bytes(b"\0" * 1024)
    (ROOT / "tokens.yml").write_text(f"api_key: {API_KEY}\nadmin_key: {ADMIN_KEY}\n")
    node.install.mkdir(parents=True)
    node.program.write_text(_PROGRAM.format(repo=str(repo)))
    key = ROOT / "admin_key"
    key.write_text(ADMIN_KEY + "\n")
    key.chmod(0o600)
    node.reset_faults()
    library = build_nvml_sim(ROOT / "lib")
    node.hydra_config.write_text(hydra_toml(node, library))
    node.monitrc.write_text(monitrc(node))
    node.monitrc.chmod(0o600)  # monit refuses a control file others can read
    _write_unit(TABBY_UNIT, tabby_unit(node))
    _write_unit(HYDRA_UNIT, hydra_unit(node))
    _write_unit(MONIT_UNIT, monit_unit(node))
    systemctl("daemon-reload")
    # The harness boots systemd with --log-target=console; the manager's own records about the
    # unit (exits, restart jobs) are evidence for detection times, so send them to the journal.
    systemctl("log-target", "journal")
    return node


def _write_unit(name: str, text: str) -> None:
    Path("/etc/systemd/system", name).write_text(text)


def tabby_unit(node: Node) -> str:
    """TabbyAPI as users run it: Restart=on-failure and systemd's stock start limits."""
    return f"""[Unit]
Description=TabbyAPI (simulated)

[Service]
Type=simple
WorkingDirectory={node.repo}
ExecStart={node.python} {node.program} --port {PORT} \
 --models-dir {node.models} --tokens {ROOT}/tokens.yml --control {node.control} \
 --nvml-state {node.nvml} --request-log {node.requests} --startup-model {MAIN_MODEL} \
 --load-seconds {LOAD_SECONDS:g} --modules 8
Restart=on-failure
"""


# RestartSec=100ms is systemd's stock value, uncompressed for systemd alone too: not matched.
_DURATION = re.compile(
    r"^(RestartSec|RestartMaxDelaySec|TimeoutStartSec|TimeoutStopSec)=(\d+)(s|min)\s*$", re.M
)


def hydra_dropin(repo: Path) -> str:
    """The project's tabbyapi drop-in with its durations divided by COMPRESSION."""
    text = (repo / "systemd/tabbyapi.service.d/10-hydra-watchdog.conf").read_text()

    def scale(m: re.Match[str]) -> str:
        seconds = int(m.group(2)) * (60 if m.group(3) == "min" else 1)
        return f"{m.group(1)}={seconds / COMPRESSION:g}s"

    return _DURATION.sub(scale, text)


def install_dropin(node: Node, on: bool) -> None:
    folder = Path(f"/etc/systemd/system/{TABBY_UNIT}.d")
    if on:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "10-hydra-watchdog.conf").write_text(hydra_dropin(node.repo))
    else:
        shutil.rmtree(folder, ignore_errors=True)
    systemctl("daemon-reload")


# Inside this namespace systemd hands out empty credentials (LoadCredential= and SetCredential=
# alike; see tests/chaos/conftest.py), so a load helper in a transient unit would get no admin
# key and every load would be refused with 401. An empty INVOCATION_ID makes the watchdog start
# the helper detached instead, handing it the key over a descriptor (act/load_launch.py); the
# load itself is the same request either way.
_DETACHED_LOADS = (
    "# bench: the load helper detached (this namespace's credentials are empty)\n"
    "Environment=INVOCATION_ID="
)


def hydra_unit(node: Node, config: Path | None = None, argv0: str = "") -> str:
    """hydra-watchdog's unit: `argv0` (default the venv's console script) `run --config`."""
    return f"""[Unit]
Description=hydra-watchdog (benchmark)

[Service]
Type=notify
NotifyAccess=main
WorkingDirectory={node.repo}
Environment=HYDRA_NVML_SIM_STATE={node.nvml}
{_DETACHED_LOADS}
ExecStart={argv0 or node.hydra_bin} run --config {config or node.hydra_config}
TimeoutStartSec=60s
"""


def monit_unit(node: Node) -> str:
    return f"""[Unit]
Description=monit (benchmark)

[Service]
Type=simple
ExecStart=/usr/bin/monit -I -c {node.monitrc}
"""


def compressed_defaults(factor: float = COMPRESSION) -> dict[str, dict[str, Any]]:
    """Every duration default of the config schema, divided by `factor`."""
    out: dict[str, dict[str, Any]] = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            if f.metadata.get("kind") == "duration" and isinstance(f.default, int | float):
                out.setdefault(section, {})[f.name] = f.default / factor
    return out


def hydra_settings(node: Node, library: Path, factor: float = COMPRESSION) -> dict[str, Any]:
    cfg = compressed_defaults(factor)
    cfg["watchdog"].update(state_dir=str(ROOT / "state"), runtime_dir=str(ROOT / "run"))
    cfg["tabbyapi"].update(
        url=node.url,
        unit=TABBY_UNIT,
        admin_key_file=str(ROOT / "admin_key"),
        venv="",  # no ExLlamaV2 extension to ldd on this node
        cmdline_patterns=[str(node.install)],
    )
    cfg["model"].update(name=MAIN_MODEL, models_dir=str(node.models), vram_required_gib=MODEL_GIB)
    cfg["gpu"] = {**cfg["gpu"], "nvml_library": str(library), "device": [{"index": 0}]}
    cfg["metrics"] = {"listen": ""}
    return cfg


def hydra_toml(node: Node, library: Path, factor: float = COMPRESSION, **watchdog: Any) -> str:
    """The config file; `factor` 1 gives the production defaults (no time compression)."""
    cfg = hydra_settings(node, library, factor)
    cfg["watchdog"].update(watchdog)
    parse_config(cfg, source="bench")  # fail here, with the key, rather than in the unit
    lines: list[str] = []
    devices = cfg["gpu"].pop("device")
    for section, values in cfg.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        lines.append("")
    for dev in devices:
        lines.append("[[gpu.device]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in dev.items()]
    return "\n".join(lines) + "\n"


def monit_interval() -> int:
    """monit's cycle: hydra-watchdog's compressed interval (monit counts whole seconds)."""
    return max(1, round(float(compressed_defaults()["watchdog"]["interval"])))


def monit_timeout() -> int:
    return max(1, round(float(compressed_defaults()["tabbyapi"]["health_timeout"])))


MONIT_START_TIMEOUT = 5  # seconds; see monitrc()


def monitrc(node: Node) -> str:
    """monit's documented HTTP service check, driving the unit through systemctl.

    monit pauses a process's connection tests for its start timeout after every start ("connection
    test paused while the process is starting"). Set to hydra-watchdog's compressed startup_grace
    (60 s) that would blind monit for a minute after each start; this node starts in ~1.2 s, so
    monit gets 5 s, in its favour."""
    return f"""set daemon {monit_interval()}
set log {ROOT}/monit.log
set idfile {ROOT}/monit.id
set statefile {ROOT}/monit.state

check process tabbyapi matching "main.py --port {PORT}"
    start program = "/bin/systemctl start {TABBY_UNIT}" with timeout {MONIT_START_TIMEOUT} seconds
    stop program = "/bin/systemctl stop {TABBY_UNIT}"
    if failed host 127.0.0.1 port {PORT} protocol http request "/health"
       with timeout {monit_timeout()} seconds then restart
    if 3 restarts within 5 cycles then unmonitor
"""


def wait_until(pred: Any, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())
