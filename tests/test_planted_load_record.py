# ruff: noqa: F811  (pytest fixtures imported from tests/harness are redefined as arguments)
"""Issue 22 item 4: a load record is acted on only when what it names is provably the watchdog's
own helper, and only when it was read from a state dir no other user can replace.

Real processes throughout: the real load helper (a detached process, no systemd here) loading
from the real exl2 simulator, root's `sleep` as a bystander, and uid 65534 (the adversary of
tests/harness/adversary.py) planting records and running look-alikes. The unit cases run under
real systemd in tests/test_planted_load_unit.py.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from hydra_watchdog.act.load import ModelLoader
from hydra_watchdog.act.load_launch import HELPER_MODULE, LoadHelpers
from hydra_watchdog.actions import LoadModel, Reason, ResultStatus
from hydra_watchdog.adapters.identity import live_start_ticks
from hydra_watchdog.adapters.tabby import TabbyClient
from hydra_watchdog.config import load_config
from hydra_watchdog.load_record import LAUNCH_FILE, LoadLaunch, read_launch, write_launch
from hydra_watchdog.statefile import read_boot_id
from hydra_watchdog.states import Rule
from tests.harness.adversary import SYSTEM_PYTHON, as_nobody, plant, public_dir
from tests.harness.tabby import ADMIN_KEY, SimProcess, TabbySims, tabby_sim, wait_for  # noqa: F401

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as uid 65534"),
]
WAIT = 60.0
LOAD = LoadModel("m1", None, Reason(Rule.NO_MODEL, "healthy but no model loaded"))
LATE = 10_000.0  # seconds added to the loader's clock: every load in flight is overdue


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


@pytest.fixture
def node(tabby_sim: TabbySims) -> Iterator[tuple[ModelLoader, LoadHelpers, Path, Clock]]:
    """A loader with helpers, its state dir under a root-owned parent every user can reach."""
    sim = tabby_sim.start(flavor="exl2", load_seconds=30.0, modules=30)
    with public_dir() as top:
        parent = top / "parent"
        parent.mkdir(mode=0o755)
        state = parent / "state"
        state.mkdir(mode=0o700)
        key = top / "admin_key"
        key.write_text(ADMIN_KEY + "\n")
        config = top / "config.toml"
        config.write_text(_config(state, key, sim))
        helpers = LoadHelpers(config, state, str(key), systemd=False)
        clock = Clock()
        loader = ModelLoader(
            TabbyClient.from_config(load_config(config)), 60.0, clock=clock, helpers=helpers
        )
        try:
            yield loader, helpers, parent, clock
        finally:
            clock.offset = 0.0
            parent.chmod(0o755)
            launch = read_launch(state)
            if launch is not None and launch.pid > 0:
                loader.cancel(WAIT)


def _config(state: Path, key: Path, sim: SimProcess) -> str:
    return (
        f'[watchdog]\nstate_dir = "{state}"\n'
        f'[tabbyapi]\nurl = "{sim.url}"\nadmin_key_file = "{key}"\nvenv = ""\n'
        f'cmdline_patterns = ["{sim.install_dir}"]\n'
        f'[model]\nname = "m1"\nmodels_dir = "{sim.models_dir}"\nload_timeout = "60s"\n'
    )


def _record(pid: int, **fields: object) -> LoadLaunch:
    ticks = live_start_ticks(pid)
    assert ticks is not None
    launch = LoadLaunch(
        load_id="0" * 32,
        model="m1",
        vram_needed_bytes=None,
        rule=Rule.NO_MODEL.value,
        evidence="",
        boot_id=read_boot_id(),
        started_mono=0.0,
        started_wall=0.0,
        pid=pid,
        start_ticks=ticks,
    )
    return replace(launch, **fields)  # type: ignore[arg-type]


def _running(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


def test_a_record_naming_a_process_that_is_not_our_helper_is_never_acted_on(
    node: tuple[ModelLoader, LoadHelpers, Path, Clock], caplog: pytest.LogCaptureFixture
) -> None:
    """Records in our own state dir (as a bug, an old version or a restore could leave them)
    naming, with their true start ticks, a root process that is no helper and uid 65534's
    process dressed in the helper's command line: overdue and cancelled, neither is signalled,
    the record is moved aside. Our real helper, overdue, is still stopped."""
    loader, helpers, _, clock = node
    state = helpers.state_dir
    bystander = subprocess.Popen(["sleep", "600"])
    sleeper = [SYSTEM_PYTHON, "-c", "import time; time.sleep(600)"]
    dressed = ["-m", HELPER_MODULE, "--load-id", "0" * 32, "--state-dir", str(state)]
    look_alike = subprocess.Popen(as_nobody([*sleeper, *dressed]))
    try:
        wait_for(lambda: (live_start_ticks(look_alike.pid) or 0) > 0, WAIT, "the look-alike")
        wait_for(
            lambda: "sleep" in Path(f"/proc/{look_alike.pid}/cmdline").read_text(), WAIT, "exec"
        )
        for victim, why in ((bystander, "is not its load helper"), (look_alike, "runs as uid")):
            caplog.clear()
            record = _record(victim.pid)
            with caplog.at_level(logging.WARNING):
                write_launch(state, record)
                seen = loader.progress()  # overdue since boot, were it ours
                write_launch(state, record)
                loader.cancel(1.0)  # the policy's deliberate cancel
                drained = loader.drain()
            time.sleep(0.5)  # a SIGTERM, had one been sent, has landed
            assert _running(victim), f"pid {victim.pid} was signalled ({victim.returncode})"
            assert seen is None and drained == ()  # never taken for a load in flight
            assert read_launch(state) is None
            moved = [p for p in state.iterdir() if p.name.startswith(LAUNCH_FILE + ".corrupt")]
            assert len(moved) == 2, moved
            for path in moved:
                path.unlink()
            assert caplog.text.count(why) == 2, caplog.text
    finally:
        bystander.kill()
        look_alike.kill()
        bystander.wait(10)
        look_alike.wait(10)
    assert bystander.returncode == look_alike.returncode == -9  # our kill, no earlier signal

    # Our own helper, overdue, is still stopped (the same path as the records above took).
    assert loader.start(LOAD).status is ResultStatus.IN_PROGRESS
    launch = read_launch(state)
    assert launch is not None
    wait_for(lambda: (p := loader.progress()) is not None and p.module >= 1, WAIT, "progress")
    clock.offset = LATE
    loader.progress()
    wait_for(lambda: live_start_ticks(launch.pid) != launch.start_ticks, WAIT, "the stop")
    results = loader.drain()
    assert [(r.status, r.error_kind) for r in results] == [(ResultStatus.FAILED, "cancelled")]


# Run as uid 65534: what the adversary can learn of root's helper from /proc (world-readable),
# and the record it writes into a state dir of its own, swapped in for root's.
_FORGE = r"""
import json, os, sys
pid, parent = int(sys.argv[1]), sys.argv[2]
argv = open(f"/proc/{pid}/cmdline", "rb").read().decode().rstrip("\0").split("\0")
options = dict(zip(argv[3::2], argv[4::2]))
ticks = int(open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[19])
boot = open("/proc/sys/kernel/random/boot_id").read().strip()
os.rename(f"{parent}/state", f"{parent}/old")
os.mkdir(f"{parent}/state", 0o755)
record = dict(load_id=options["--load-id"], model=options["--model"], vram_needed_bytes=None,
              rule="no_model", evidence="planted", boot_id=boot, started_mono=0.0,
              started_wall=0.0, unit="", pid=pid, start_ticks=ticks)
with open(f"{parent}/state/load.json", "w") as f:
    json.dump(record, f)
"""


def test_a_state_dir_swapped_while_the_daemon_runs_is_not_read(
    node: tuple[ModelLoader, LoadHelpers, Path, Clock], caplog: pytest.LogCaptureFixture
) -> None:
    """Trusted at start; then root opens the parent to others by mistake (chmod 0777) and the
    adversary swaps in a state dir of its own, its load.json naming root's real helper as
    overdue (pid, start ticks, load id and state dir all read from /proc). The next read walks
    the path again: nothing is read from it, and the helper goes on loading."""
    loader, helpers, parent, _ = node
    assert loader.start(LOAD).status is ResultStatus.IN_PROGRESS
    launch = read_launch(helpers.state_dir)
    assert launch is not None
    wait_for(lambda: (p := loader.progress()) is not None and p.module >= 1, WAIT, "progress")

    parent.chmod(0o777)
    forge = as_nobody([SYSTEM_PYTHON, "-c", _FORGE, str(launch.pid), str(parent)])
    subprocess.run(forge, check=True, timeout=60, capture_output=True)
    planted = json.loads((parent / "state" / LAUNCH_FILE).read_text())
    assert (planted["pid"], planted["load_id"]) == (launch.pid, launch.load_id)
    with caplog.at_level(logging.WARNING):
        seen = loader.progress()  # overdue since boot, were it read
        in_flight = loader.in_flight
        drained = loader.drain()
    time.sleep(0.5)
    assert live_start_ticks(launch.pid) == launch.start_ticks, "our helper was signalled"
    assert (seen, in_flight, drained) == (None, False, ())
    assert f"{parent} is writable by others" in caplog.text, caplog.text

    # Mended by root: the planted dir removed, ours back; the load is seen again.
    plant('rm -r "$1/state"', str(parent))
    (parent / "old").rename(parent / "state")
    parent.chmod(0o755)
    seen = loader.progress()
    assert seen is not None and seen.model == "m1"
    assert live_start_ticks(launch.pid) == launch.start_ticks
