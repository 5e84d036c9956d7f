"""The state file: atomic, private, survives kill -9, never crashes on what it finds."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hydra_watchdog.events import Event, EventKind
from hydra_watchdog.policy_state import STATE_VERSION, Finding, PolicyState, RestartRecord
from hydra_watchdog.statefile import STATE_FILE, StateFile, read_boot_id, write_atomic
from hydra_watchdog.states import Phase, Rule, Severity

BOOT = "11111111-2222-3333-4444-555555555555"


def _state() -> PolicyState:
    return PolicyState(
        phase=Phase.BACKOFF,
        phase_since=1234.5,
        restarts=(RestartRecord(1000.0, "systemd"), RestartRecord(1100.0, "watchdog")),
        backoff_step=3,
        backoff_until=1500.0,
        loop_since=1000.0,
        load_failures=2,
        findings=(Finding(Rule.RESTART_LOOP, Severity.CRIT, "4 restarts in 10m"),),
    )


def _event(n: int) -> Event:
    return Event(
        wall=1.7e9 + n,
        kind=EventKind.ACTION,
        severity=Severity.NOTICE,
        message=f"event {n}",
        state=Phase.DOWN,
        rule=Rule.DOWN,
        action="restart_unit",
        reason="refused 3 times",
        unit="tabbyapi.service",
        fields=(("TARGET_PID", str(n)),),
    )


def testrnd_trip_keeps_state_and_last_events(tmp_path: Path) -> None:
    sf = StateFile(tmp_path / "st", events_kept=3, boot_id=BOOT)
    sf.save(_state(), [_event(n) for n in range(5)])
    loaded = StateFile(tmp_path / "st", events_kept=3, boot_id=BOOT).load()
    assert loaded.state == _state()
    assert [e.message for e in loaded.events] == ["event 2", "event 3", "event 4"]
    assert loaded.events[-1] == _event(4)
    assert loaded.notes == ()
    assert not loaded.rebased


def test_missing_file_is_a_fresh_state(tmp_path: Path) -> None:
    loaded = StateFile(tmp_path / "new", events_kept=5, boot_id=BOOT).load()
    assert loaded.state == PolicyState()
    assert loaded.events == ()
    assert (tmp_path / "new").is_dir()


def test_permissions_are_private_even_for_a_loose_existing_dir(tmp_path: Path) -> None:
    d = tmp_path / "st"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    StateFile(d, events_kept=5, boot_id=BOOT).save(_state(), [])
    assert d.stat().st_mode & 0o777 == 0o700
    assert (d / STATE_FILE).stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"",
        b"[1, 2]",
        b'{"version": "1", "state": {}}',
        b'{"version": 1, "state": {"phase": "no-such-phase"}}',
        b'{"version": 1, "state": {"backoff_step": "three"}}',
        b'{"version": 1}',
        b"\xff\xfe garbage",
    ],
)
def test_corrupt_file_is_moved_aside_with_a_warning(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "st"
    d.mkdir()
    (d / STATE_FILE).write_bytes(content)
    loaded = StateFile(d, events_kept=5, boot_id=BOOT).load()
    assert loaded.state == PolicyState()
    assert loaded.notes and "unusable" in loaded.notes[0]
    aside = list(d.glob(f"{STATE_FILE}.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_bytes() == content
    assert not (d / STATE_FILE).exists()
    assert any("moved it to" in r.getMessage() for r in caplog.records)


def test_future_version_is_moved_aside(tmp_path: Path) -> None:
    d = tmp_path / "st"
    sf = StateFile(d, events_kept=5, boot_id=BOOT)
    sf.save(_state(), [])
    doc = json.loads((d / STATE_FILE).read_text())
    doc["version"] = STATE_VERSION + 1
    (d / STATE_FILE).write_text(json.dumps(doc))
    loaded = sf.load()
    assert loaded.state == PolicyState()
    assert "newer" in loaded.notes[0]
    assert len(list(d.glob(f"{STATE_FILE}.corrupt-*"))) == 1
    # and the next save starts a valid file again
    sf.save(_state(), [])
    assert sf.load().state == _state()


def test_another_boot_rebases_but_keeps_the_backoff_step(tmp_path: Path) -> None:
    d = tmp_path / "st"
    StateFile(d, events_kept=5, boot_id=BOOT).save(_state(), [_event(1)])
    loaded = StateFile(d, events_kept=5, boot_id="another-boot").load()
    assert loaded.rebased
    assert loaded.state == _state().rebased()
    assert loaded.state.backoff_step == 3
    assert loaded.state.restarts == ()  # monotonic stamps of the old boot mean nothing now
    assert loaded.events == (_event(1),)  # wall-clock events stay meaningful
    assert "another boot" in loaded.notes[0]


def test_real_boot_id_is_read() -> None:
    boot = read_boot_id()
    if not Path("/proc/sys/kernel/random/boot_id").exists():
        pytest.skip("no boot id on this kernel")
    assert len(boot) == 36 and boot.count("-") == 4


def test_stale_temp_files_are_removed_on_load(tmp_path: Path) -> None:
    d = tmp_path / "st"
    sf = StateFile(d, events_kept=5, boot_id=BOOT)
    sf.save(_state(), [])
    stale = d / f".tmp-{STATE_FILE}.abc123"
    stale.write_bytes(b'{"half": ')
    fresh = d / f".tmp-{STATE_FILE}.def456"  # maybe another process writing right now
    fresh.write_bytes(b'{"half": ')
    old = time.time() - 3600
    os.utime(stale, (old, old))
    assert sf.load().state == _state()
    assert not stale.exists()
    assert fresh.exists()


def test_write_atomic_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    write_atomic(target, b"one", 0o600)
    write_atomic(target, b"two", 0o644)
    assert target.read_bytes() == b"two"
    assert target.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


_WRITER = """
import sys
from hydra_watchdog.events import Event, EventKind
from hydra_watchdog.policy_state import PolicyState
from hydra_watchdog.statefile import StateFile
from hydra_watchdog.states import Phase, Severity
sf = StateFile(sys.argv[1], events_kept=50, boot_id="b")
n = int(sys.argv[2])
# big enough that a write takes several syscalls, so a kill lands inside one sometimes
events = [Event(float(i), EventKind.ACTION, Severity.INFO, "x" * 400, Phase.DOWN)
          for i in range(50)]
while True:
    n += 1
    sf.save(PolicyState(failures=n, backoff_step=n), events)
"""


@pytest.mark.slow
def test_kill_9_mid_write_leaves_the_old_or_the_new_file(tmp_path: Path) -> None:
    d = tmp_path / "st"
    rng = random.Random(4)
    last = 0
    for rnd in range(6):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(d), str(last)])
        try:
            deadline = time.monotonic() + 60
            # Wait until this writer has written at least once, then kill it at a random moment.
            while time.monotonic() < deadline:
                if (d / STATE_FILE).exists():
                    loaded = StateFile(d, events_kept=50, boot_id="b").load()
                    if loaded.state.failures > last:
                        break
                time.sleep(0.02)
            else:
                pytest.fail("the writer never wrote")
            time.sleep(rng.uniform(0.0, 0.2))
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        loaded = StateFile(d, events_kept=50, boot_id="b").load()
        assert loaded.notes == (), "a kill -9 left a file that does not parse"
        assert loaded.state.failures == loaded.state.backoff_step
        assert loaded.state.failures > last
        assert len(loaded.events) == 50
        assert not list(d.glob(f"{STATE_FILE}.corrupt-*"))
        # at most one per interrupted writer (fresh temps are left for a minute: see load())
        assert len(list(d.glob(".tmp-*"))) <= rnd + 1
        last = loaded.state.failures
