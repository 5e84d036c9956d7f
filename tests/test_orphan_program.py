"""An orphan runs TabbyAPI's own program (issue 22, item 6): the one the unit's ExecStart= runs
(or one seen in the unit's cgroup), never a process merely started from inside the install tree.

Three root processes started with their working directory in the install tree were SIGTERMed as
orphans under a unit, because a bare argv[0] and the first argument of any program were resolved
against the cwd: `python3 job.py` holding port+1, an `#!/usr/bin/env python3` script holding
VRAM, `/usr/bin/sleep 600` holding VRAM (`600` -> `<tree>/600`). Here they run as real processes,
holding a real port and VRAM in the simulated NVML's process list, beside TabbyAPI's real
orphans (its own program, left behind: killed as before) and the uid-65534 adversary running
TabbyAPI's very program (never TabbyAPI's: another uid).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hydra_watchdog.adapters.gpu import NvmlGpu
from hydra_watchdog.adapters.identity import (
    ProcIdentity,
    exec_program,
    program,
    unit_programs,
)
from hydra_watchdog.adapters.procs import ProcScanner
from hydra_watchdog.adapters.systemd import parse_exec, parse_show
from hydra_watchdog.config import GpuDevice
from hydra_watchdog.observation import GpuReport, ProcessRole, UnitStatus
from hydra_watchdog.seen_programs import SEEN_FILE
from hydra_watchdog.sim import nvml_state
from tests.harness.adversary import SYSTEM_PYTHON, as_nobody, public_dir
from tests.harness.nvml import NvmlSim
from tests.harness.systemd_ns import SystemdNamespace
from tests.harness.tabby import free_port

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3
SYSTEM_PATH = "/usr/bin:/bin"  # python3 is /usr/bin/python3 (no pyenv shim between)

# Holds what its arguments say and notes every catchable signal it gets, then goes on running:
# argv = SIGLOG PIDFILE [PORT]. The pid file is written once the port (if any) is bound.
HOLDER = r"""
import os, signal, socket, sys, time
siglog, pidfile = sys.argv[1], sys.argv[2]
def note(signum, frame):
    with open(siglog, "a") as f:
        f.write(f"{os.getpid()} {signum}\n")
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
            signal.SIGUSR2):
    signal.signal(sig, note)
if len(sys.argv) > 3:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(sys.argv[3])))
    s.listen()
with open(pidfile + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(pidfile + ".tmp", pidfile)
while True:
    time.sleep(1)
"""

# TabbyAPI's main.py: the simulator, or with --hold a HOLDER (what an orphan of it does here).
MAIN_PY = """\
import os, runpy, sys
if sys.argv[1:2] == ["--hold"]:
    sys.argv[1:2] = []
    runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib", "holder.py"),
                   run_name="__main__")
else:
    runpy.run_module("hydra_watchdog.sim.tabby_server", run_name="__main__", alter_sys=True)
"""

ENV_SCRIPT = "#!/usr/bin/env python3\n" + HOLDER


def lay_out_tree(tree: Path) -> None:
    """An install tree: main.py (TabbyAPI's program), and other files of the tree."""
    (tree / "lib").mkdir(parents=True, exist_ok=True)
    (tree / "tools").mkdir(exist_ok=True)
    (tree / "models").mkdir(exist_ok=True)
    (tree / "main.py").write_text(MAIN_PY)
    (tree / "lib" / "holder.py").write_text(HOLDER)
    (tree / "job.py").write_text(HOLDER)
    (tree / "tools" / "vram-job").write_text(ENV_SCRIPT)
    (tree / "tools" / "vram-job").chmod(0o755)
    (tree / "start.sh").write_text("#!/bin/sh\nsleep 600\n")
    (tree / "start.sh").chmod(0o755)


# --- the rule, on command lines -----------------------------------------------------------------


def _ident(
    cmdline: tuple[str, ...], exe: str | None = "/usr/bin/python3.11", cwd: str | None = "/t"
) -> ProcIdentity:
    return ProcIdentity(1, 0, 0, 1, cmdline, exe, cwd, "pid:[1]", ())


@pytest.mark.parametrize(
    ("cmdline", "exe", "cwd", "expected"),
    [
        # the three processes the old rule took for TabbyAPI's, from cwd /t
        (("python3", "job.py"), "/usr/bin/python3.11", "/t", "/t/job.py"),
        (("python3", "./tools/vram-job"), "/usr/bin/python3.11", "/t", "/t/tools/vram-job"),
        (("/usr/bin/sleep", "25"), "/usr/bin/sleep", "/t", "/usr/bin/sleep"),
        # argv[0] is any text: the executable counts
        (("python3", "-c", "pass"), "/usr/bin/python3.11", "/t", None),
        (("main.py",), "/usr/bin/sleep", "/t", "/usr/bin/sleep"),
        # an interpreter's options, and its script
        (("python", "-u", "-X", "dev", "main.py"), "/usr/bin/python3.11", "/t", "/t/main.py"),
        (("python", "-Xdev", "-Wignore", "main.py"), "/usr/bin/python3.11", "/t", "/t/main.py"),
        (("python", "-W", "ignore", "/t/main.py"), "/usr/bin/python3.11", "/", "/t/main.py"),
        (("python3.13t", "main.py"), "/usr/bin/python3.13t", "/t", "/t/main.py"),
        (
            ("python", "--check-hash-based-pycs", "never", "m.py"),
            "/usr/bin/python3",
            "/t",
            "/t/m.py",
        ),
        (("python", "--", "main.py"), "/usr/bin/python3.11", "/t", "/t/main.py"),
        (("python", "-Bc", "code", "/t/main.py"), "/usr/bin/python3.11", "/t", None),
        (("python", "-m", "tabby", "/t/main.py"), "/usr/bin/python3.11", "/t", None),
        (("python", "-", "/t/main.py"), "/usr/bin/python3.11", "/t", None),
        (("python",), "/usr/bin/python3.11", "/t", None),
        (("python", "--"), "/usr/bin/python3.11", "/t", None),
        (("python", "--", ""), "/usr/bin/python3.11", "/t", None),
        (("python", "-X"), "/usr/bin/python3.11", "/t", None),  # a value that never came
        (("/bin/sh", "./start.sh"), "/usr/bin/dash", "/t", "/t/start.sh"),
        (("bash", "-e", "-o", "pipefail", "start.sh"), "/usr/bin/bash", "/t", "/t/start.sh"),
        (("bash", "+o", "posix", "--rcfile", "rc", "s.sh"), "/usr/bin/bash", "/t", "/t/s.sh"),
        (("sh", "-c", "exec x", "/t/start.sh"), "/usr/bin/dash", "/t", None),
        (("sh", "-s", "/t/start.sh"), "/usr/bin/dash", "/t", None),
        # what cannot be named by text alone: no program
        (("python3", "../t/main.py"), "/usr/bin/python3.11", "/t/sub", None),
        (("python3", "main.py"), "/usr/bin/python3.11", None, None),
        (("python3", "main.py"), "/usr/bin/python3.11", "/t (deleted)", None),
        (("python3", "main.py"), None, "/t", None),
        (("/t/server",), "/t/server (deleted)", "/", "/t/server"),
    ],
)
def test_program_is_the_executable_or_an_interpreters_script(
    cmdline: tuple[str, ...], exe: str | None, cwd: str | None, expected: str | None
) -> None:
    assert program(_ident(cmdline, exe, cwd)) == expected


def tabby_unit(**fields: Any) -> UnitStatus:
    """TabbyAPI's unit as systemd reports it (loaded), with `fields`."""
    return UnitStatus(name="tabbyapi.service", available=True, load_state="loaded", **fields)


def _unit(**changes: Any) -> UnitStatus:
    base: dict[str, Any] = {
        "exec_path": "/usr/bin/python3",
        "exec_argv": ("/usr/bin/python3", "main.py", "--port", "5000"),
        "working_directory": "/t",
    }
    return tabby_unit(**{**base, **changes})


def test_the_unit_program_is_what_exec_start_runs() -> None:
    assert exec_program(_unit()) == "/t/main.py"
    assert exec_program(_unit(working_directory="!/t")) == "/t/main.py"  # WorkingDirectory=-/t
    assert exec_program(_unit(working_directory="")) == "/main.py"  # a system service's default
    assert exec_program(_unit(working_directory="~")) is None  # the user's home: not guessed
    assert exec_program(_unit(exec_argv=("/usr/bin/python3", "-m", "tabby"))) is None
    wrapper = _unit(exec_path="/t/start.sh", exec_argv=("/t/start.sh",))
    assert exec_program(wrapper) == "/t/start.sh"
    assert exec_program(_unit(exec_path="", exec_argv=())) is None  # not read

    # Only inside the install tree: a unit that runs a generic tool makes no use of it TabbyAPI's.
    env = _unit(exec_path="/usr/bin/env", exec_argv=("/usr/bin/env", "python3", "/t/main.py"))
    assert unit_programs(env, (), ["/t"]) == frozenset()
    assert unit_programs(_unit(), (), ["/t"]) == {"/t/main.py"}
    assert unit_programs(_unit(), ("/t/start.py", "/usr/bin/sleep"), ["/t"]) == {
        "/t/main.py",
        "/t/start.py",
    }


def test_exec_start_as_systemctl_prints_it() -> None:
    shown = (
        "ExecStart={ path=/usr/bin/python3 ; argv[]=/usr/bin/python3 -u main.py ; "
        "ignore_errors=no ; start_time=[n/a] ; stop_time=[n/a] ; pid=0 ; code=(null) ; "
        "status=0/0 }\nWorkingDirectory=!/opt/tabbyapi\nLoadState=loaded\n"
    )
    unit = parse_show("tabbyapi.service", shown)
    assert (unit.exec_path, unit.exec_argv) == (
        "/usr/bin/python3",
        ("/usr/bin/python3", "-u", "main.py"),
    )
    assert unit.working_directory == "!/opt/tabbyapi"
    assert exec_program(unit) == "/opt/tabbyapi/main.py"
    # a oneshot's several commands name no one program; garbage names none
    two = shown.splitlines()[0] + "\n" + shown.splitlines()[0].replace("-u ", "") + "\n"
    assert parse_show("x.service", two).exec_path == ""
    assert parse_exec("{ path=/x") == ("", ())
    assert parse_exec("") == ("", ())


# --- real processes, scanned on this host -------------------------------------------------------


@dataclass
class Node:
    """The install tree (readable by every user) and the processes a test starts in it."""

    tree: Path
    nvml: NvmlSim
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, argv: list[str], name: str) -> int:
        """Run a HOLDER in the tree (its cwd) with the system's PATH; its pid once it holds
        what it was told to."""
        pidfile = self.tree / "run" / f"{name}.pid"
        proc = subprocess.Popen(
            argv,
            cwd=self.tree,
            env={**os.environ, "PATH": SYSTEM_PATH},
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.started.append(proc)
        deadline = time.monotonic() + 30
        while not pidfile.exists():
            assert proc.poll() is None, f"{name} exited: {proc.returncode}"
            assert time.monotonic() < deadline, f"{name} did not start"
            time.sleep(0.02)
        return proc.pid

    def holder_args(self, name: str, port: int | None = None) -> list[str]:
        args = [str(self.tree / "run" / f"{name}.siglog"), str(self.tree / "run" / f"{name}.pid")]
        return args + ([str(port)] if port else [])

    def gpus(self) -> GpuReport:
        gpu = NvmlGpu(str(self.nvml.library))
        try:
            return gpu.read((GpuDevice(index=0), GpuDevice(index=1)))
        finally:
            gpu.close()

    def close(self) -> None:
        for proc in self.started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture
def node(nvml_sim: NvmlSim) -> Iterator[Node]:
    with public_dir() as folder:
        tree = folder / "tabbyapi"
        lay_out_tree(tree)
        run = tree / "run"
        run.mkdir()
        run.chmod(0o1777)  # the adversary writes its pid and its signals here
        n = Node(tree, nvml_sim)
        try:
            yield n
        finally:
            n.close()


def test_processes_started_in_the_tree_are_foreign_and_its_program_is_an_orphan(
    node: Node,
) -> None:
    tree, port, python = node.tree, free_port(), "python3"  # as typed at a shell in the tree
    job = node.start([python, "job.py", *node.holder_args("job", port + 1)], "job")
    script = node.start(["./tools/vram-job", *node.holder_args("script")], "script")
    sleeper = subprocess.Popen(["/usr/bin/sleep", "600"], cwd=tree, start_new_session=True)
    node.started.append(sleeper)
    absolute = node.start(
        [python, str(tree / "main.py"), "--hold", *node.holder_args("abs")], "abs"
    )
    relative = node.start([python, "main.py", "--hold", *node.holder_args("rel")], "rel")
    nobody = node.start(
        as_nobody([SYSTEM_PYTHON, str(tree / "main.py"), "--hold", *node.holder_args("nobody")]),
        "nobody",
    )
    for gpu, pid in enumerate((script, sleeper.pid, absolute, relative, nobody)):
        nvml_state.set_process(node.nvml.state, gpu % 2, pid, 8 * GIB)

    unit = tabby_unit(
        active_state="active",
        exec_path=SYSTEM_PYTHON,
        exec_argv=(SYSTEM_PYTHON, "main.py", "--port", str(port)),
        working_directory=str(tree),
    )
    gpus = node.gpus()
    assert {p.pid for d in gpus.devices for p in d.processes} >= {script, sleeper.pid, nobody}
    _, found = ProcScanner(port, [str(tree)]).scan(unit, gpus, full=False)
    roles = {p.pid: p.role for p in found}
    assert roles[job] is ProcessRole.FOREIGN  # python3 job.py on port+1
    assert roles[script] is ProcessRole.FOREIGN  # #!/usr/bin/env python3, VRAM
    assert roles[sleeper.pid] is ProcessRole.FOREIGN  # /usr/bin/sleep 600, VRAM
    assert roles[nobody] is ProcessRole.FOREIGN  # TabbyAPI's program, as uid 65534
    assert roles[absolute] is ProcessRole.ORPHAN  # python3 /tree/main.py
    assert roles[relative] is ProcessRole.ORPHAN  # python3 main.py from the tree

    # Without a unit, the install tree's programs: job.py and the script are programs of the
    # tree, sleep is not; the adversary is another uid.
    no_unit = UnitStatus(name="tabbyapi.service", available=False)
    _, found = ProcScanner(port, [str(tree)]).scan(no_unit, gpus, full=False)
    roles = {p.pid: p.role for p in found}
    assert roles[sleeper.pid] is ProcessRole.FOREIGN and roles[nobody] is ProcessRole.FOREIGN


def test_a_wrappers_child_is_learned_from_the_units_cgroup(node: Node) -> None:
    """ExecStart= names start.sh, which starts main.py: the program seen as the unit's MainPID
    is TabbyAPI's too, and stays so while the unit is down (when orphans are likely)."""
    tree, port, python = node.tree, free_port(), "python3"
    main = node.start([python, str(tree / "main.py"), "--hold", *node.holder_args("main")], "main")
    orphan = node.start([python, "main.py", "--hold", *node.holder_args("orphan")], "orphan")
    wrapper = subprocess.Popen(["/bin/sh", str(tree / "start.sh")], start_new_session=True)
    node.started.append(wrapper)
    nvml_state.set_process(node.nvml.state, 0, orphan, 8 * GIB)
    start_sh = {"exec_path": str(tree / "start.sh"), "exec_argv": (str(tree / "start.sh"),)}
    up = tabby_unit(active_state="active", main_pid=main, **start_sh)
    down = tabby_unit(active_state="failed", **start_sh)
    gpus = node.gpus()
    scanner = ProcScanner(port, [str(tree)])
    fresh = {p.pid: p.role for p in ProcScanner(port, [str(tree)]).scan(down, gpus, full=True)[1]}
    assert fresh[orphan] is ProcessRole.FOREIGN  # only start.sh is known yet
    assert fresh[wrapper.pid] is ProcessRole.ORPHAN  # /bin/sh start.sh: ExecStart's program

    roles = {p.pid: p.role for p in scanner.scan(up, gpus, full=False)[1]}
    assert roles[main] is ProcessRole.MAIN and roles[orphan] is ProcessRole.ORPHAN
    roles = {p.pid: p.role for p in scanner.scan(down, gpus, full=False)[1]}
    assert roles[orphan] is ProcessRole.ORPHAN  # remembered while the unit is down


def _state_dir(node: Node) -> Path:
    state = node.tree.parent / "state"
    state.mkdir(mode=0o700)
    return state


def test_the_programs_seen_in_the_units_cgroup_survive_a_watchdog_restart(node: Node) -> None:
    """The wrapper's child, seen in the unit's cgroup by one watchdog, is kept in the state dir:
    the next watchdog (a new scanner), started while the unit is down, still knows a leftover
    `python3 main.py` for TabbyAPI's orphan, not a foreign process."""
    tree, port, python = node.tree, free_port(), "python3"
    state = _state_dir(node)
    main = node.start([python, str(tree / "main.py"), "--hold", *node.holder_args("main")], "main")
    start_sh = {"exec_path": str(tree / "start.sh"), "exec_argv": (str(tree / "start.sh"),)}
    up = tabby_unit(active_state="active", main_pid=main, invocation_id="ab" * 16, **start_sh)
    down = tabby_unit(active_state="failed", **start_sh)
    gpus = node.gpus()
    ProcScanner(port, [str(tree)], state_dir=str(state)).scan(up, gpus, full=False)
    kept = json.loads((state / SEEN_FILE).read_text())
    assert kept["unit"] == "tabbyapi.service"
    assert kept["programs"] == [{"program": str(tree / "main.py"), "invocation": "ab" * 16}]
    assert (state / SEEN_FILE).stat().st_mode & 0o777 == 0o600

    os.killpg(main, signal.SIGKILL)
    orphan = node.start([python, "main.py", "--hold", *node.holder_args("orphan")], "orphan")
    nvml_state.set_process(node.nvml.state, 0, orphan, 8 * GIB)
    restarted = ProcScanner(port, [str(tree)], state_dir=str(state))
    roles = {p.pid: p.role for p in restarted.scan(down, node.gpus(), full=False)[1]}
    assert roles[orphan] is ProcessRole.ORPHAN
    # The same restart without the state dir (what a watchdog kept in memory only): foreign.
    _, found = ProcScanner(port, [str(tree)]).scan(down, node.gpus(), full=False)
    forgot = {p.pid: p.role for p in found}
    assert forgot[orphan] is ProcessRole.FOREIGN


def test_a_restored_program_passes_every_other_orphan_check(node: Node) -> None:
    """What the file restores is a name only: a program outside the install tree names no
    orphan (root's `sleep`), TabbyAPI's program run by uid 65534 is still foreign, a file kept
    for another unit is not used, and one that is not ours is set aside."""
    tree, port = node.tree, free_port()
    state = _state_dir(node)
    sleeper = subprocess.Popen(["/usr/bin/sleep", "600"], cwd=tree, start_new_session=True)
    node.started.append(sleeper)
    nobody = node.start(
        as_nobody([SYSTEM_PYTHON, str(tree / "main.py"), "--hold", *node.holder_args("nobody")]),
        "nobody",
    )
    orphan = node.start(
        [SYSTEM_PYTHON, str(tree / "main.py"), "--hold", *node.holder_args("orphan")], "orphan"
    )
    for gpu, pid in enumerate((sleeper.pid, nobody, orphan)):
        nvml_state.set_process(node.nvml.state, gpu % 2, pid, 8 * GIB)
    start_sh = {"exec_path": str(tree / "start.sh"), "exec_argv": (str(tree / "start.sh"),)}
    down = tabby_unit(active_state="failed", **start_sh)

    def roles(programs: list[str], unit: str = "tabbyapi.service") -> dict[int, ProcessRole]:
        rows = [{"program": p, "invocation": ""} for p in programs]
        (state / SEEN_FILE).write_text(json.dumps({"version": 1, "unit": unit, "programs": rows}))
        scanner = ProcScanner(port, [str(tree)], state_dir=str(state))
        return {p.pid: p.role for p in scanner.scan(down, node.gpus(), full=False)[1]}

    found = roles(["/usr/bin/sleep", str(tree / "main.py")])
    assert found[sleeper.pid] is ProcessRole.FOREIGN  # outside the tree: never TabbyAPI's
    assert found[nobody] is ProcessRole.FOREIGN  # another uid
    assert found[orphan] is ProcessRole.ORPHAN
    assert roles([str(tree / "main.py")], unit="other.service")[orphan] is ProcessRole.FOREIGN
    (state / SEEN_FILE).write_text('{"version": 1, "unit": "tabbyapi.service", "programs": 7}')
    scanner = ProcScanner(port, [str(tree)], state_dir=str(state))
    found = {p.pid: p.role for p in scanner.scan(down, node.gpus(), full=False)[1]}
    assert found[orphan] is ProcessRole.FOREIGN
    assert [p.name.split(".corrupt-")[0] for p in state.glob("*.corrupt-*")] == [SEEN_FILE]


def test_the_same_path_in_another_mount_namespace_is_another_program(node: Node) -> None:
    """A root process in a mount namespace of its own (what RootDirectory= or a container that
    shares our PID namespace gives) where another tree is bound over the install tree: its
    `python3 <tree>/main.py` names TabbyAPI's program as text but runs another file. TabbyAPI's
    unit has no User= (root), so uid, PID namespace and path all match: it is foreign all the
    same. Beside it, TabbyAPI's real orphan, in our namespace, is still one."""
    tree, port = node.tree, free_port()
    other = tree.parent / "other-tree"
    lay_out_tree(other)  # a main.py of its own: the same text, another file
    assert os.stat(other / "main.py").st_ino != os.stat(tree / "main.py").st_ino
    orphan = node.start(
        [SYSTEM_PYTHON, str(tree / "main.py"), "--hold", *node.holder_args("orphan")], "orphan"
    )
    # Its pid file and signal log sit outside the tree, which the bind mount hides in there.
    run = tree.parent / "run-other"
    run.mkdir()
    inside = [SYSTEM_PYTHON, str(tree / "main.py"), "--hold", str(run / "log"), str(run / "pid")]
    bound = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c",
         'mount --bind "$0" "$1" && shift && exec "$@"', str(other), str(tree), *inside],
        start_new_session=True,
    )  # fmt: skip
    node.started.append(bound)
    deadline = time.monotonic() + 30
    while not (run / "pid").exists():
        assert bound.poll() is None, f"the bound process exited: {bound.returncode}"
        assert time.monotonic() < deadline, "the bound process did not start"
        time.sleep(0.02)
    assert int((run / "pid").read_text()) == bound.pid
    assert os.readlink(f"/proc/{bound.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    nvml_state.set_process(node.nvml.state, 0, orphan, 8 * GIB)
    nvml_state.set_process(node.nvml.state, 1, bound.pid, 8 * GIB)

    unit = tabby_unit(
        active_state="failed",
        exec_path=SYSTEM_PYTHON,
        exec_argv=(SYSTEM_PYTHON, "main.py", "--port", str(port)),
        working_directory=str(tree),
    )
    for down in (unit, UnitStatus(name="tabbyapi.service", available=False)):
        _, found = ProcScanner(port, [str(tree)]).scan(down, node.gpus(), full=False)
        roles = {p.pid: p.role for p in found}
        assert roles[orphan] is ProcessRole.ORPHAN, down
        assert roles[bound.pid] is ProcessRole.FOREIGN, down


# --- under real systemd: the daemon's own cycle signals no process of the tree's but TabbyAPI's --

PORT = 5720
NS_TREE = "/opt/hw-orphans"
NS_SIM = "/var/lib/hw-orphans-sim"
RUN = "/tmp/hw-orphans"  # pid files and signal logs, writable by the adversary

DAEMON_CONFIG = f"""
[watchdog]
interval = "1s"
state_dir = "/var/lib/hw-orphans-state"
runtime_dir = "/run/hw-orphans"

[tabbyapi]
url = "http://127.0.0.1:{PORT}"
unit = "hw-orphans-tabby.service"
venv = ""
cmdline_patterns = ["{NS_TREE}"]

[model]
name = ""
models_dir = "{NS_TREE}/models"

[gpu]
nvml_library = "{NS_SIM}/libnvidia-ml.so.1"

[[gpu.device]]
index = 0

[[gpu.device]]
index = 1

[orphans]
term_grace = "1s"

[metrics]
listen = ""

[nixos]
current_system = ""
"""


@dataclass
class Inside:
    """The namespace's processes of this test, by name: their pids inside, read from pid files."""

    ns: SystemdNamespace
    spawned: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def host(self, path: str) -> Path:
        return Path(self.ns.root + path)

    def start(self, argv: list[str], name: str) -> int:
        """Start argv in the tree (its cwd) outside every unit; its pid inside, once it holds
        what it was told to. (nsenter's --wd needs the folder on the host as well.)"""
        self.spawned.append(self.ns.spawn(["sh", "-c", 'cd "$0" && exec "$@"', NS_TREE, *argv]))
        pidfile = self.host(f"{RUN}/{name}.pid")
        self.ns.wait_for(pidfile.exists, timeout=30, what=f"{name} started")
        return int(pidfile.read_text())

    def args(self, name: str, port: int | None = None) -> list[str]:
        return [f"{RUN}/{name}.siglog", f"{RUN}/{name}.pid"] + ([str(port)] if port else [])

    def signals(self, name: str) -> list[str]:
        path = self.host(f"{RUN}/{name}.siglog")
        return path.read_text().split("\n")[:-1] if path.exists() else []

    def alive(self, pid: int) -> bool:
        """A live process (not a zombie) inside."""
        check = f"kill -0 {pid} && ! grep -q '^State:.*Z' /proc/{pid}/status"
        return self.ns.run(["sh", "-c", check]).returncode == 0


@pytest.mark.systemd
def test_the_daemon_under_a_unit_signals_only_tabbyapis_orphans(
    systemd_ns: SystemdNamespace, nvml_sim_library: Path
) -> None:
    ns = systemd_ns
    unit = "hw-orphans-tabby.service"
    inside = Inside(ns)
    tree = inside.host(NS_TREE)
    lay_out_tree(tree)
    run = inside.host(RUN)
    run.mkdir(mode=0o1777, exist_ok=True)
    run.chmod(0o1777)
    inside.host(NS_SIM).mkdir(parents=True, exist_ok=True)
    shutil.copy(nvml_sim_library, inside.host(f"{NS_SIM}/libnvidia-ml.so.1"))
    state = inside.host(f"{NS_SIM}/nvml.state")
    nvml_state.write_state(state, nvml_state.default_state())
    ns.write_file("/etc/hydra-watchdog/hw-orphans.toml", DAEMON_CONFIG)
    ns.install_unit(
        unit,
        f"[Service]\nWorkingDirectory={NS_TREE}\n"
        f"ExecStart={sys.executable} main.py --port {PORT} --models-dir {NS_TREE}/models\n",
    )
    try:
        assert ns.systemctl("start", unit).returncode == 0
        ns.wait_for(
            lambda: ns.run(["curl", "-sf", f"http://127.0.0.1:{PORT}/health"]).returncode == 0,
            what="the unit's TabbyAPI answering",
        )
        python = ["env", f"PATH={SYSTEM_PATH}", "python3"]  # as typed at a shell in the tree
        main_py = f"{NS_TREE}/main.py"
        pids = {
            "job": inside.start([*python, "job.py", *inside.args("job", PORT + 1)], "job"),
            "script": inside.start(
                ["env", f"PATH={SYSTEM_PATH}", "./tools/vram-job", *inside.args("script")], "script"
            ),
            "sleep": inside.start(
                [
                    "sh",
                    "-c",
                    f"echo $$ > {RUN}/sleep.tmp && mv {RUN}/sleep.tmp {RUN}/sleep.pid && "
                    "exec /usr/bin/sleep 600",
                ],
                "sleep",
            ),
            "nobody": inside.start(
                as_nobody([SYSTEM_PYTHON, f"{NS_TREE}/main.py", "--hold", *inside.args("nobody")]),
                "nobody",
            ),
            "abs": inside.start([*python, main_py, "--hold", *inside.args("abs")], "abs"),
            "rel": inside.start([*python, "main.py", "--hold", *inside.args("rel")], "rel"),
        }
        for name in ("script", "sleep", "nobody", "abs", "rel"):
            nvml_state.set_process(state, 0, pids[name], 6 * GIB)

        env = {**os.environ, nvml_state.STATE_ENV: f"{NS_SIM}/nvml.state"}
        cycles = []
        for _ in range(2):
            done = ns.run(
                [sys.executable, "-m", "hydra_watchdog", "run", "--once", "--config",
                 "/etc/hydra-watchdog/hw-orphans.toml"],
                cwd=str(REPO), env=env, timeout=120,
            )  # fmt: skip
            cycles.append(done)
            assert done.returncode == 0, done.stderr[-3000:]
        said = "\n".join(c.stderr + c.stdout for c in cycles)

        # TabbyAPI's own program, left behind outside the unit: SIGTERM (ignored), then SIGKILL.
        for name in ("abs", "rel"):
            pid = pids[name]
            ns.wait_for(lambda: not inside.alive(pid), what=f"orphan {name} killed")  # noqa: B023
            assert inside.signals(name) == [f"{pids[name]} {int(signal.SIGTERM)}"], said
        # Everything else: never signalled, still running.
        for name in ("job", "script", "nobody"):
            assert inside.signals(name) == [], (name, said)
        for name in ("job", "script", "sleep", "nobody"):
            assert inside.alive(pids[name]), (name, said)
        main = int(ns.show(unit, "MainPID")["MainPID"])
        assert main > 0 and inside.alive(main)
    finally:
        for proc in inside.spawned:
            SystemdNamespace.kill_spawned(proc)
        ns.reset_unit(unit, remove=True)
        ns.run(["rm", "-rf", NS_TREE, RUN, NS_SIM, "/var/lib/hw-orphans-state"])


@pytest.mark.systemd
def test_a_wrapped_units_orphan_is_still_known_after_a_watchdog_restart(
    systemd_ns: SystemdNamespace, nvml_sim_library: Path
) -> None:
    """TabbyAPI's unit runs a wrapper (ExecStart=<tree>/launch.sh, which execs `python
    main.py`, as NixOS's .tabbyapi-wrapped does). One watchdog sees main.py in the unit's
    cgroup; the unit stops, a leftover `python3 main.py` holds the port; a new watchdog process
    (a restart) still knows it for TabbyAPI's orphan and signals it, where it took it for a
    foreign holder before (BLOCKED)."""
    ns = systemd_ns
    unit = "hw-orphans-tabby.service"
    inside = Inside(ns)
    tree = inside.host(NS_TREE)
    lay_out_tree(tree)
    launch = tree / "launch.sh"
    launch.write_text(
        f"#!/bin/sh\nexec {sys.executable} main.py --port {PORT} --models-dir {NS_TREE}/models\n"
    )
    launch.chmod(0o755)
    run = inside.host(RUN)
    run.mkdir(mode=0o1777, exist_ok=True)
    run.chmod(0o1777)
    inside.host(NS_SIM).mkdir(parents=True, exist_ok=True)
    shutil.copy(nvml_sim_library, inside.host(f"{NS_SIM}/libnvidia-ml.so.1"))
    nvml_state.write_state(inside.host(f"{NS_SIM}/nvml.state"), nvml_state.default_state())
    ns.write_file("/etc/hydra-watchdog/hw-orphans.toml", DAEMON_CONFIG)
    ns.install_unit(unit, f"[Service]\nWorkingDirectory={NS_TREE}\nExecStart={NS_TREE}/launch.sh\n")
    env = {**os.environ, nvml_state.STATE_ENV: f"{NS_SIM}/nvml.state"}
    watchdog = [sys.executable, "-m", "hydra_watchdog", "run", "--once", "--config",
                "/etc/hydra-watchdog/hw-orphans.toml"]  # fmt: skip
    try:
        assert ns.systemctl("start", unit).returncode == 0
        ns.wait_for(
            lambda: ns.run(["curl", "-sf", f"http://127.0.0.1:{PORT}/health"]).returncode == 0,
            what="the unit's TabbyAPI answering",
        )
        first = ns.run(watchdog, cwd=str(REPO), env=env, timeout=120)
        assert first.returncode == 0, first.stderr[-3000:]
        kept = json.loads(inside.host(f"/var/lib/hw-orphans-state/{SEEN_FILE}").read_text())
        invocation = ns.show(unit, "InvocationID")["InvocationID"]
        assert kept["programs"] == [{"program": f"{NS_TREE}/main.py", "invocation": invocation}]

        assert ns.systemctl("stop", unit).returncode == 0
        python = ["env", f"PATH={SYSTEM_PATH}", "python3"]
        orphan = inside.start(
            [*python, "main.py", "--hold", *inside.args("orphan", PORT)], "orphan"
        )
        second = ns.run(watchdog, cwd=str(REPO), env=env, timeout=120)  # a new process
        said = second.stderr + second.stdout
        assert second.returncode == 0, said[-3000:]
        ns.wait_for(lambda: not inside.alive(orphan), what="the orphan killed")
        assert inside.signals("orphan") == [f"{orphan} {int(signal.SIGTERM)}"], said[-3000:]
    finally:
        for proc in inside.spawned:
            SystemdNamespace.kill_spawned(proc)
        ns.reset_unit(unit, remove=True)
        ns.run(["rm", "-rf", NS_TREE, RUN, NS_SIM, "/var/lib/hw-orphans-state"])
