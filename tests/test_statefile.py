"""The state file: atomic, private, survives kill -9, never crashes on what it finds."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hydra_watchdog.config import Config
from hydra_watchdog.events import Event, EventKind
from hydra_watchdog.load_record import LAUNCH_FILE, quarantine
from hydra_watchdog.policy_state import (
    STATE_VERSION,
    Finding,
    PolicyState,
    RestartOrigin,
    RestartRecord,
    to_jsonable,
)
from hydra_watchdog.report.status import from_json, to_json
from hydra_watchdog.report.status_build import build_status
from hydra_watchdog.statefile import (
    MAX_COUNT,
    MAX_TIME,
    STATE_FILE,
    StateFile,
    read_boot_id,
    write_atomic,
)
from hydra_watchdog.states import Phase, Rule, Severity
from hydra_watchdog.trusted_path import UnsafeDirectoryError

BOOT = "11111111-2222-3333-4444-555555555555"


def _state() -> PolicyState:
    return PolicyState(
        phase=Phase.BACKOFF,
        phase_since=1234.5,
        restarts=(
            RestartRecord(1000.0, RestartOrigin.SYSTEMD),
            RestartRecord(1100.0, RestartOrigin.WATCHDOG),
        ),
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


def test_round_trip_keeps_state_and_last_events(tmp_path: Path) -> None:
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


def test_a_new_state_dir_is_created_private(tmp_path: Path) -> None:
    d = tmp_path / "a" / "st"
    StateFile(d, events_kept=5, boot_id=BOOT).save(_state(), [])
    assert d.stat().st_mode & 0o777 == 0o700
    assert (d / STATE_FILE).stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("mode", [0o755, 0o770, 0o701])
def test_a_loose_existing_state_dir_is_refused_not_chmodded(tmp_path: Path, mode: int) -> None:
    # Whoever made it loose may have planted files in it: repairing the mode would trust them.
    d = tmp_path / "st"
    d.mkdir()
    d.chmod(mode)
    sf = StateFile(d, events_kept=5, boot_id=BOOT)
    with pytest.raises(UnsafeDirectoryError, match=f"mode {mode:04o}, not 0700"):
        sf.load()
    with pytest.raises(UnsafeDirectoryError):
        sf.save(_state(), [])
    assert d.stat().st_mode & 0o777 == mode
    assert list(d.iterdir()) == []


def test_a_state_dir_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to own a directory as another user")
    d = tmp_path / "st"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(UnsafeDirectoryError, match="owned by uid 65534, not by uid 0"):
        StateFile(d, events_kept=5, boot_id=BOOT).load()
    assert d.stat().st_uid == 65534


def test_a_symlink_or_a_file_as_state_dir_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(UnsafeDirectoryError, match="symlink"):
        StateFile(link, events_kept=5, boot_id=BOOT).load()
    plain = tmp_path / "plain"
    plain.write_text("x")
    with pytest.raises(UnsafeDirectoryError, match="not a directory"):
        StateFile(plain, events_kept=5, boot_id=BOOT).load()
    with pytest.raises(UnsafeDirectoryError, match="not a directory"):
        StateFile(plain / "below", events_kept=5, boot_id=BOOT).load()


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
        # json accepts these; the policy cannot use them (issue 10: crash or wrong at start-up)
        b'{"version": 1, "state": {"phase_since": ' + b"9" * 400 + b"}}",
        b'{"version": 1, "state": {"failures": ' + b"9" * 400 + b"}}",
        b'{"version": 1, "state": {"failures": ' + b"9" * 5000 + b"}}",
        b'{"version": 1, "state": {"backoff_until": Infinity, "backoff_step": 2}}',
        b'{"version": 1, "state": {"load_started": NaN}}',
        b'{"version": 1, "state": {"next_load_at": -Infinity}}',
        b'{"version": 1, "state": {"healthy_since": 1e400}}',
        b'{"version": 1, "state": {"backoff_step": -3}}',
        b'{"version": 1, "state": {"restarts": [{"at": NaN, "by": "systemd"}]}}',
        b'{"version": 1, "state": {"power_denied": [[0, 1e999, 5.0]]}}',
        b'{"version": 1, "state": {}, "events": [{"wall": NaN}]}',
        b'{"version": 1, "state": {}, "events": {"not": "a list"}}',
        b'{"version": 1, "state": {}, "events": 7}',
        b'{"version": ' + b"1" * 400 + b', "state": {}}',
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_corrupt_file_is_moved_aside_with_a_warning(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "st"
    d.mkdir(mode=0o700)
    (d / STATE_FILE).write_bytes(content)
    loaded = StateFile(d, events_kept=5, boot_id=BOOT).load()
    assert loaded.state == PolicyState()
    assert loaded.notes and "unusable" in loaded.notes[0] and "quarantined" in loaded.notes[0]
    aside = list(d.glob(f"{STATE_FILE}.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_bytes() == content
    assert not (d / STATE_FILE).exists()
    assert any("moved it to" in r.getMessage() for r in caplog.records)


def test_each_file_moved_aside_says_what_happens_without_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The state starts afresh; a load record that names what is not our helper does not: it is
    never acted on, and the log line says that, not "started afresh"."""
    d = tmp_path / "st"
    d.mkdir(mode=0o700)
    (d / STATE_FILE).write_bytes(b"garbage")
    StateFile(d, events_kept=5, boot_id=BOOT).load()
    (d / LAUNCH_FILE).write_bytes(b"{}")
    quarantine(d, "pid 1 is not our helper")
    said = [r.getMessage() for r in caplog.records if "moved it to" in r.getMessage()]
    assert len(said) == 2, said
    assert said[0].endswith("started afresh"), said[0]
    assert f"{LAUNCH_FILE} is unusable (not a load of ours: pid 1 is not our helper)" in said[1]
    assert "afresh" not in said[1], said[1]
    assert said[1].endswith("; nothing it names is acted on"), said[1]


def _quarantined(d: Path) -> list[Path]:
    return list(d.glob(f"{STATE_FILE}.corrupt-*"))


def test_a_directory_fifo_or_symlink_in_place_of_the_file_is_quarantined(tmp_path: Path) -> None:
    d = tmp_path / "st"
    d.mkdir(mode=0o700)
    sf = StateFile(d, events_kept=5, boot_id=BOOT)
    (d / STATE_FILE).mkdir()
    (d / STATE_FILE / "inside").write_text("kept")
    loaded = sf.load()
    assert loaded.state == PolicyState() and "not a regular file" in loaded.notes[0]
    assert [p.joinpath("inside").read_text() for p in _quarantined(d)] == ["kept"]

    os.mkfifo(d / STATE_FILE)  # opening a FIFO blocks without O_NONBLOCK: start-up would hang
    assert "not a regular file" in sf.load().notes[0]
    target = tmp_path / "elsewhere.json"
    StateFile(tmp_path / "other", events_kept=5, boot_id=BOOT).save(_state(), [])
    (tmp_path / "other" / STATE_FILE).rename(target)
    (d / STATE_FILE).symlink_to(target)  # never followed, even to a valid state
    loaded = sf.load()
    assert loaded.state == PolicyState() and "a symlink" in loaded.notes[0]
    assert len(_quarantined(d)) == 3
    sf.save(_state(), [])  # and the daemon goes on with a fresh file
    assert sf.load().state == _state()


def test_a_huge_file_is_quarantined_without_being_read(tmp_path: Path) -> None:
    d = tmp_path / "st"
    d.mkdir(mode=0o700)
    sf = StateFile(d, events_kept=5, boot_id=BOOT)
    with (d / STATE_FILE).open("wb") as f:
        f.truncate(sf.max_bytes + 1)  # sparse: costs no disk; reading it whole would cost RAM
    loaded = sf.load()
    assert loaded.state == PolicyState()
    assert f"more than the {sf.max_bytes}" in loaded.notes[0]
    assert len(_quarantined(d)) == 1


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
from hydra_watchdog.config import Config
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


# --- fuzz: whatever is in the file, load() returns a usable state or quarantines -----------------

_POISON = st.sampled_from(
    [
        "NaN",
        "Infinity",
        "-Infinity",
        "1e400",
        "9" * 400,
        "-1",
        "-1.5",
        "1e13",
        str(MAX_COUNT + 1),
        '"text"',
        "true",
        "null",
        "[]",
        "{}",
        "[" * 5000 + "]" * 5000,
        '"\\ud800"',
    ]
)


def _valid_doc() -> dict[str, object]:
    sf_doc = {
        "version": STATE_VERSION,
        "boot_id": BOOT,
        "written_wall": 1.7e9,
        "state": to_jsonable(_state()),
        "events": [to_jsonable(_event(1))],
    }
    return sf_doc


def _paths(value: object, prefix: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Every place in a JSON document a value can be replaced."""
    found: list[tuple[object, ...]] = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _paths(v, (*prefix, i))
    return found


def _numbers_are_sane(value: object) -> bool:
    if isinstance(value, bool | str) or value is None:
        return True
    if isinstance(value, float):
        return math.isfinite(value) and 0 <= value <= MAX_TIME
    if isinstance(value, int):
        return 0 <= value <= MAX_COUNT
    if isinstance(value, tuple | frozenset):
        return all(_numbers_are_sane(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return all(_numbers_are_sane(getattr(value, f.name)) for f in dataclasses.fields(value))
    return True


def _check_load(d: Path, content: bytes) -> None:
    for p in d.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    (d / STATE_FILE).write_bytes(content)
    loaded = StateFile(d, events_kept=5, boot_id=BOOT).load()  # must not raise
    if loaded.notes and "unusable" in loaded.notes[0]:
        assert loaded.state == PolicyState() and loaded.events == ()
        assert [p.read_bytes() for p in _quarantined(d)] == [content]
        assert not (d / STATE_FILE).exists()
    else:
        assert (d / STATE_FILE).read_bytes() == content
    assert _numbers_are_sane(loaded.state) and _numbers_are_sane(loaded.events)
    # what was loaded can be reported (the daemon publishes it every cycle)
    report = build_status(
        loaded.state, None, Config(), loaded.events, wall_now=1.7e9, mono_now=1e3, pid=1
    )
    assert from_json(to_json(report)) == report


@settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_fuzz_a_poisoned_field_loads_or_is_quarantined(tmp_path: Path, data: st.DataObject) -> None:
    doc = _valid_doc()
    path = data.draw(st.sampled_from(_paths(doc)[1:]))
    poison = data.draw(_POISON)
    text = json.dumps(doc)
    # put the raw poison text in place: json.dumps cannot write most of these
    marker = "__POISON__"
    target: Any = doc  # a JSON document: dicts and lists, keyed by the path's str and int
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = marker
    text = json.dumps(doc).replace(f'"{marker}"', poison)
    d = tmp_path / "fuzz"
    d.mkdir(mode=0o700, exist_ok=True)
    _check_load(d, text.encode())


@settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(content=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_fuzz_arbitrary_bytes_never_raise(tmp_path: Path, content: bytes) -> None:
    d = tmp_path / "fuzz"
    d.mkdir(mode=0o700, exist_ok=True)
    _check_load(d, content)


def test_to_jsonable_gives_each_kind_of_value_its_json_form() -> None:
    """The per-class field cache and the exact-type shortcut change no answer: an Enum that is
    also a str or an int gives its value, bool stays bool, a frozenset is sorted, a dataclass
    *class* is left as it is, and a second call (from the cache) answers as the first did."""

    class Colour(enum.StrEnum):
        RED = "red"

    class Level(enum.IntEnum):
        HIGH = 3

    @dataclasses.dataclass(frozen=True)
    class Inner:
        colour: Colour
        flags: frozenset[str]

    @dataclasses.dataclass(frozen=True)
    class Outer:
        inner: Inner
        level: Level
        on: bool
        items: tuple[Inner, ...]
        missing: float | None

    value = Outer(Inner(Colour.RED, frozenset({"b", "a"})), Level.HIGH, True, (), None)
    expected = {
        "inner": {"colour": "red", "flags": ["a", "b"]},
        "level": 3,
        "on": True,
        "items": [],
        "missing": None,
    }
    for _ in range(2):
        got = to_jsonable(value)
        assert got == expected
        assert type(got["inner"]["colour"]) is str and type(got["level"]) is int
        assert got["on"] is True
    assert to_jsonable(Inner) is Inner
