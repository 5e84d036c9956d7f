"""A state or runtime dir that becomes untrusted while the daemon runs, or that a reloaded config
names: the daemon never reads a pause (or anything else) from it, never lets an operator's pause
go unread, and says so once, not every cycle.

The daemon is the real Daemon with the real adapters (no systemd: the unit manager points at a
root without one; TabbyAPI's port is closed; no GPU library), cycled by the test. The adversary
is a real process of uid 65534 (tests/harness/adversary.py) that swaps in a directory of its own
where a parent was opened to others.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hydra_watchdog import control
from hydra_watchdog.actions import Action
from hydra_watchdog.adapters.systemd import SystemctlUnit
from hydra_watchdog.config import Config, load_config
from hydra_watchdog.daemon import Daemon, build_adapters
from hydra_watchdog.events import Event, EventKind
from hydra_watchdog.policy import decide
from hydra_watchdog.policy_state import PolicyState
from hydra_watchdog.report.log import capture_logs
from hydra_watchdog.report.sdnotify import Notifier
from hydra_watchdog.states import Phase, Rule, Severity
from tests.harness.adversary import plant, public_dir

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as uid 65534")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Node:
    top: Path  # root's, 0755: the adversary may read below it, not write
    parent: Path  # holds the state and runtime dirs
    config: Path
    told: list[Event]
    planned: list[tuple[Action, ...]]  # the actions each cycle's decision planned

    @property
    def state(self) -> Path:
        return self.parent / "state"

    def write_config(self, state: Path, run: Path) -> None:
        self.config.write_text(
            f'[watchdog]\nstate_dir = "{state}"\nruntime_dir = "{run}"\n'
            f'[tabbyapi]\nurl = "http://127.0.0.1:{_closed_port()}"\nvenv = ""\n'
            f'[gpu]\nnvml_library = "{self.top}/no-libnvidia-ml.so.1"\n'
        )

    def daemon(self) -> Daemon:
        (self.top / "no-systemd").mkdir(exist_ok=True)

        def factory(config: Config) -> Any:
            units = SystemctlUnit(config.tabbyapi.unit, root=str(self.top / "no-systemd"))
            return dataclasses.replace(build_adapters(config), units=units)

        def deciding(*args: Any) -> tuple[PolicyState, tuple[Action, ...]]:
            new, actions = decide(*args)
            self.planned.append(actions)
            return new, actions

        cfg = load_config(self.config)
        return Daemon(
            cfg,
            adapters=factory(cfg),
            decide=deciding,
            config_path=self.config,
            adapter_factory=factory,
            notifier=Notifier({}),
            emit=self.told.append,
        )


@pytest.fixture
def node() -> Iterator[Node]:
    with public_dir() as top:
        parent = top / "parent"
        parent.mkdir(mode=0o755)
        n = Node(top, parent, top / "config.toml", [], [])
        n.write_config(parent / "state", parent / "run")
        try:
            yield n
        finally:
            parent.chmod(0o755)


def _said(records: Sequence[Mapping[str, Any]], text: str) -> int:
    return sum(1 for r in records if r.get("event") == text)


def test_a_state_dir_swapped_while_running_keeps_an_operators_pause(node: Node) -> None:
    """Paused by the operator; then root opens the parent to others by mistake and uid 65534
    swaps in a state dir of its own, with no pause.json. Before, the pause read as 'not paused'
    and the daemon went back to acting. Now: it observes only, one finding names the component,
    and the state and status.json that cannot be written are each said once, for three cycles;
    once mended, the operator's pause is read again and each write is said to work again."""
    daemon = node.daemon()
    control.pause(node.state, "driver upgrade", None)
    daemon.cycle()
    assert daemon.state.phase is Phase.PAUSED

    node.parent.chmod(0o777)
    plant('mv "$1/state" "$1/old" && mkdir -m 700 "$1/state"', str(node.parent))
    node.told.clear()
    with capture_logs() as records:
        for _ in range(3):
            daemon.cycle()
            assert daemon.state.phase is Phase.PAUSED
    assert node.planned[-3:] == [(), (), ()]
    unreadable = [e for e in node.told if e.rule is Rule.PAUSED and e.severity is Severity.ERR]
    assert len(unreadable) == 1, [e.message for e in node.told]
    assert f"{node.parent} is writable by others" in unreadable[0].message
    assert unreadable[0].message.endswith("; observing only")
    assert _said(records, "cannot persist the state") == 1, records
    assert _said(records, "cannot write status.json") == 1, records

    plant('rm -r "$1/state"', str(node.parent))
    (node.parent / "old").rename(node.state)
    node.parent.chmod(0o755)
    with capture_logs() as records:
        daemon.cycle()
        daemon.cycle()
    assert daemon.state.phase is Phase.PAUSED
    assert [f.message for f in daemon.state.findings if f.rule is Rule.PAUSED] == [
        "paused until resumed: driver upgrade"
    ]
    assert _said(records, "the state is persisted again") == 1, records
    assert _said(records, "status.json is written again") == 1, records
    daemon.close()


@pytest.mark.parametrize("key", ["state_dir", "runtime_dir"])
@pytest.mark.parametrize("how", ["parent others can write", "theirs in a sticky parent"])
def test_a_reload_to_an_untrusted_dir_keeps_the_old_config(node: Node, key: str, how: str) -> None:
    """What `run` refuses at start (exit 78), a SIGHUP refuses too: the old config stays, the
    new dir is never read from (its planted pause.json pauses nothing) and the rejection is
    said once, naming the component."""
    daemon = node.daemon()
    daemon.cycle()
    old = daemon.config
    if how == "parent others can write":
        shared = node.top / "shared"
        shared.mkdir(mode=0o755)
        shared.chmod(0o777)
        (shared / "dir").mkdir(mode=0o700)
        plant('mv "$1/dir" "$1/roots" && mkdir -m 700 "$1/dir"', str(shared))  # swapped
        blame = f"{shared} is writable by others"
    else:  # /tmp-like: ours could not be swapped, but uid 65534 made the dir first
        shared = node.top / "tmp"
        shared.mkdir()
        shared.chmod(0o1777)
        plant('mkdir -m 700 "$1/dir"', str(shared))
        blame = f"{shared}/dir is owned by uid 65534"
    planted = '{"version": 1, "reason": "planted", "until_wall": null}'
    plant('echo "$2" > "$1/dir/pause.json"', str(shared), planted)
    dirs = {"state_dir": node.parent / "state", "runtime_dir": node.parent / "run"}
    dirs[key] = shared / "dir"
    node.write_config(dirs["state_dir"], dirs["runtime_dir"])
    node.told.clear()
    assert not daemon.reload()
    assert daemon.config is old
    rejected = [e for e in node.told if e.kind is EventKind.CONFIG_REJECTED]
    assert len(rejected) == 1, [e.message for e in node.told]
    assert blame in rejected[0].message
    daemon.cycle()
    assert daemon.state.phase is not Phase.PAUSED  # the planted pause was never read
    daemon.close()
