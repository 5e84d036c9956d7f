"""Issue 22 item 4, the unit cases, under real systemd (PID 1 of a namespace): a load record's
`unit` leads to `systemctl stop` only when it is the helper unit launch() made for the record's
model (hydra-watchdog-load-<hash>.service), and only when the record came from a state dir no
other user can replace. A real helper unit, overdue, is still stopped.

The watchdog's side runs inside the namespace (its systemctl talks to that systemd): the real
LoadHelpers and ModelLoader, whose helper unit systemd-run starts. Its interpreter is a stand-in
that sleeps (there is no TabbyAPI in here to load from): the unit, its name and its stop are
the real ones. The adversary is uid 65534, inside the namespace too.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest

from hydra_watchdog.act.load_launch import unit_name
from tests.harness.adversary import SYSTEM_PYTHON, as_nobody
from tests.harness.systemd_ns import SystemdNamespace

pytest_plugins = ["tests.harness.systemd_fixtures"]
pytestmark = [pytest.mark.systemd, pytest.mark.slow]

# Shared by the scripts below: the loader as the daemon builds it, its clock movable (LATE: every
# load in flight is overdue), and the facts a test asserts on printed as JSON.
_PRELUDE = r"""
import json, os, time
from pathlib import Path
from hydra_watchdog.act.load import ModelLoader
from hydra_watchdog.act.load_launch import LoadHelpers, unit_name
from hydra_watchdog.actions import LoadModel, Reason
from hydra_watchdog.load_record import LoadLaunch, read_launch, write_launch
from hydra_watchdog.statefile import read_boot_id
from hydra_watchdog.states import Rule

spec = json.loads(SPEC)
state = Path(spec["state"])
offset = [0.0]
helpers = LoadHelpers(Path("/etc/hw-test.toml"), state, "", systemd=True, python=spec["python"])
loader = ModelLoader(None, 60.0, clock=lambda: time.monotonic() + offset[0], helpers=helpers)
LATE = 10_000.0

def active(unit):
    out = os.popen(f"systemctl show -p ActiveState,InvocationID {unit}").read()
    return dict(line.split("=", 1) for line in out.split())

def wait(predicate, seconds=60):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
"""

# Records in our own state dir naming units that are not this record's helper unit.
_NAMED = r"""
state.mkdir(mode=0o700, parents=True)
out = {}
for unit in spec["named"]:
    record = LoadLaunch(load_id="0" * 32, model=spec["model"], vram_needed_bytes=None,
                        rule="no_model", evidence="", boot_id=read_boot_id(), started_mono=0.0,
                        started_wall=0.0, unit=unit)
    before = active(unit)
    write_launch(state, record)
    seen = loader.progress()  # overdue since boot, were it ours
    write_launch(state, record)
    loader.cancel(1.0)  # the policy's deliberate cancel
    time.sleep(1.0)  # a stop job, had one been queued, has run
    out[unit] = {"before": before, "after": active(unit), "seen": seen is not None,
                 "moved": sorted(p.name for p in state.iterdir() if ".corrupt" in p.name)}
    for p in state.iterdir():
        p.unlink()

# Our own helper unit, overdue: stopped.
started = loader.start(LoadModel(spec["model"], None, Reason(Rule.NO_MODEL, "test")))
mine = unit_name(spec["model"])
wait(lambda: active(mine).get("ActiveState") == "active")
offset[0] = LATE
loader.progress()
wait(lambda: active(mine).get("ActiveState") in ("inactive", "failed", ""))
out["mine"] = {"started": started.detail, "after": active(mine)}
print(json.dumps(out))
"""

# Our helper unit runs; the parent of the state dir is opened to others by mistake; uid 65534
# swaps in its own state dir naming our helper unit as overdue. The next reads must refuse it.
_START = r"""
state.mkdir(mode=0o700, parents=True)
loader.start(LoadModel(spec["model"], None, Reason(Rule.NO_MODEL, "test")))
mine = unit_name(spec["model"])
wait(lambda: active(mine).get("ActiveState") == "active")
first = active(mine)
"""
_AFTER_SWAP = r"""
mine = unit_name(spec["model"])
seen = loader.progress()  # overdue since boot, were it read
loader.cancel(1.0)
time.sleep(1.0)
print(json.dumps({"seen": seen is not None, "first": first, "after": active(mine)}))
os.system(f"systemctl stop {mine}")
"""
_FORGE = r"""
import json, os, sys
parent, unit, model = sys.argv[1:4]
os.rename(f"{parent}/state", f"{parent}/old")
os.mkdir(f"{parent}/state", 0o755)
boot = open("/proc/sys/kernel/random/boot_id").read().strip()
record = dict(load_id="0" * 32, model=model, vram_needed_bytes=None, rule="no_model",
              evidence="planted", boot_id=boot, started_mono=0.0, started_wall=0.0, unit=unit,
              pid=0, start_ticks=0)
with open(f"{parent}/state/load.json", "w") as f:
    json.dump(record, f)
"""


@pytest.fixture
def place(systemd_ns: SystemdNamespace) -> Iterator[dict[str, str]]:
    """A state dir under a root-owned parent, a stand-in interpreter, a model of this test."""
    tag = uuid.uuid4().hex[:8]
    spec = {
        "parent": f"/srv/hw-{tag}",
        "state": f"/srv/hw-{tag}/state",
        "python": f"/usr/local/bin/hw-python-{tag}",
        "model": f"model-{tag}",
    }
    systemd_ns.run(["install", "-d", "-m", "0755", spec["parent"]], check=True)
    systemd_ns.write_file(spec["python"], "#!/bin/sh\nexec /bin/sleep 600\n", 0o755)
    yield spec
    systemd_ns.systemctl("stop", unit_name(spec["model"]))
    systemd_ns.run(["rm", "-rf", spec["parent"], spec["python"]])


def _inside(ns: SystemdNamespace, spec: dict[str, object], code: str) -> dict[str, object]:
    done = ns.python(f"SPEC = {json.dumps(spec)!r}\n" + _PRELUDE + code, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_a_record_s_unit_is_stopped_only_when_it_is_our_helper_unit(
    systemd_ns: SystemdNamespace, place: dict[str, str]
) -> None:
    victim = f"hw-victim-{uuid.uuid4().hex[:8]}.service"
    # A unit that wears our prefix but is not the helper unit of the record's model.
    lookalike = unit_name("another model")
    for name in (victim, lookalike):
        systemd_ns.install_unit(name, "[Service]\nExecStart=/bin/sleep 600\n")
        assert systemd_ns.systemctl("start", name).returncode == 0
    try:
        named = [victim, lookalike, "systemd-journald.service"]
        out = _inside(systemd_ns, {**place, "named": named}, _NAMED)
        for unit in named:
            seen = out[unit]
            assert isinstance(seen, dict)
            assert seen["after"] == seen["before"], (unit, seen)  # same invocation, still up
            assert not seen["seen"], unit  # never taken for a load in flight
            assert len(seen["moved"]) == 2, (unit, seen)  # both records moved aside
        assert systemd_ns.show(victim)["ActiveState"] == "active"
        assert systemd_ns.show(lookalike)["ActiveState"] == "active"
        mine = out["mine"]
        assert isinstance(mine, dict)
        assert unit_name(place["model"]) in str(mine["started"])
        assert mine["after"].get("ActiveState") in ("inactive", "failed", None), mine
    finally:
        for name in (victim, lookalike):
            systemd_ns.reset_unit(name, remove=True)


def test_our_helper_unit_is_not_stopped_from_a_state_dir_another_user_swapped_in(
    systemd_ns: SystemdNamespace, place: dict[str, str]
) -> None:
    mine = unit_name(place["model"])
    # One interpreter inside runs the whole story: the loader keeps its helper's launch.
    code = (
        _START.rstrip("\n")
        + "\n"
        + "os.chmod(spec['parent'], 0o777)\n"
        + "import subprocess\n"
        + "subprocess.run(spec['forge'], check=True)\n"
        + _AFTER_SWAP
    )
    forge = as_nobody([SYSTEM_PYTHON, "-c", _FORGE, place["parent"], mine, place["model"]])
    out = _inside(systemd_ns, {**place, "forge": forge}, code)
    planted = systemd_ns.run(["cat", f"{place['parent']}/state/load.json"]).stdout
    assert json.loads(planted)["unit"] == mine  # the adversary's record was in place
    first = out["first"]
    assert isinstance(first, dict) and first.get("ActiveState") == "active", out
    assert out["after"] == first, out  # the same invocation, still active: never stopped
    assert out["seen"] is False  # nothing read from the swapped-in dir
