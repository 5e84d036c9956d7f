# ruff: noqa: F811  (pytest fixtures imported from tests/harness are redefined as arguments)
"""`hydra-watchdog status` as an operator reads it: golden screens at 100 columns.

The inputs are status files the real daemon wrote while it ran against the TabbyAPI simulator
(tests/golden/status/*.json): healthy, degraded, blocked, paused, stopped with SIGTERM, killed
with SIGKILL. What differs from run to run is made stable when they are captured: the node's
temporary root becomes /srv/node, its port 5000, the daemon's pid 4242 and TabbyAPI's 4300, and
every time is shifted so that the last cycle was at T0 (values, not shapes: each file is what
the daemon wrote). The screens (*.txt) are rendered from them as `status` renders them, with no
colour, in UTC, three seconds after the last cycle; whether the daemon's pid is alive is asked of
a /proc laid out for it (the killed daemon's pid has no entry there).

Regenerate both after a change of the daemon's texts (one command), then read the diff:

    HYDRA_GOLDEN=regen .venv/bin/pytest tests/test_status_screens.py && git diff tests/golden
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hydra_watchdog.report.status import StatusReport, from_json
from hydra_watchdog.report.status_view import daemon_problem, judge, render, summarize
from hydra_watchdog.sim import nvml_state
from hydra_watchdog.sim.tabby_server import write_control
from hydra_watchdog.states import Phase
from tests.harness.nvml import NvmlSim, nvml_sim_library  # noqa: F401
from tests.harness.tabby import wait_for
from tests.test_daemon import WAIT, Daemons, Node

GOLDEN = Path(__file__).resolve().parent / "golden" / "status"
REGEN = os.environ.get("HYDRA_GOLDEN") == "regen"
STATES = ("healthy", "degraded", "blocked", "paused", "stopped", "killed")
T0 = 1_797_000_000.0  # 2026-12-11 14:40:00 UTC: the last cycle of every captured file
NOW = T0 + 3.0
DAEMON_PID, TABBY_PID, DAEMON_START = 4242, 4300, 123456
_TIMES = {"generated_at", "heartbeat", "stopped_at", "since", "started_at", "deadline_at"}
_TIMES |= {"next_attempt_at", "loop_since", "until", "at", "ended_at"}


# --- the screens, from the captured files --------------------------------------------------------


def fake_proc(root: Path, *, alive: bool) -> Path:
    """A /proc where the daemon (pid 4242) runs as hydra-watchdog, or has no entry at all."""
    (root / "1").mkdir(parents=True, exist_ok=True)
    if alive:
        entry = root / str(DAEMON_PID)
        entry.mkdir(exist_ok=True)
        (entry / "cmdline").write_bytes(b"/usr/bin/python3\0/usr/bin/hydra-watchdog\0run\0")
        fields = ["S", *["0"] * 18, str(DAEMON_START)]  # field 22: the start time
        (entry / "stat").write_text(f"{DAEMON_PID} (hydra-watchdog) {' '.join(fields)}\n")
    return root


def screen(report: StatusReport, proc: Path) -> str:
    """What `status` prints for `report` at NOW (cli.cmd_status, without its file lookups)."""
    gone = daemon_problem(report, proc=str(proc)) if report.stopped_at is None else ""
    verdict, why, current = judge(report, wall_now=NOW, stale_after=report.stale_after, daemon=gone)
    return render(report, verdict, " ".join(why.split()), now=NOW, current=current)


@pytest.fixture(autouse=True)
def utc() -> Iterator[None]:
    before = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


@pytest.mark.parametrize("state", STATES)
def test_the_status_screen(state: str, tmp_path: Path, capture: None) -> None:
    report = from_json((GOLDEN / f"{state}.json").read_bytes())
    text = screen(report, fake_proc(tmp_path / "proc", alive=state != "killed"))
    if REGEN:
        (GOLDEN / f"{state}.txt").write_text(text)
    assert text == (GOLDEN / f"{state}.txt").read_text()
    assert max(map(len, text.splitlines())) <= 100


# --- capturing the files from real daemon runs (HYDRA_GOLDEN=regen) ------------------------------


def _normalize(raw: dict[str, object], node: Node, daemon: int, tabby: int | None) -> object:
    """The captured file with the run's incidental values made stable (see the module's doc)."""
    shift = T0 - float(raw["heartbeat"])  # type: ignore[arg-type]

    def walk(value: object, key: str = "") -> object:
        if isinstance(value, dict):
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, key) for v in value]
        if key in _TIMES and isinstance(value, float):
            return round(value + shift, 3)
        if key == "latency_s" and isinstance(value, float):
            # a fast answer's jitter made stable; a slow one kept to the ms, as findings say it
            return 0.004 if value < 0.5 else round(value, 3)
        if key == "pid_start" and value is not None:
            return DAEMON_START
        if key in ("config_file", "config_sha256") and value:
            return f"<{key} of /srv/node/config.toml>"
        if isinstance(value, str):
            value = value.replace(str(node.root), "/srv/node")
            value = re.sub(
                rf"\b{node.port + 1}\b", "5001", re.sub(rf"\b{node.port}\b", "5000", value)
            )
            value = re.sub(rf"\b{daemon}\b", str(DAEMON_PID), value)
            return re.sub(rf"\b{tabby}\b", str(TABBY_PID), value) if tabby else value
        if isinstance(value, int) and not isinstance(value, bool):
            return {daemon: DAEMON_PID, tabby: TABBY_PID, node.port: 5000}.get(value, value)
        return value

    doc = walk(raw)
    assert isinstance(doc, dict)
    # the daemon's summary of the values kept (a latency made stable is said in it too)
    return {**doc, "summary": summarize(from_json(json.dumps(doc)))}


def _keep(node: Node, state: str, daemon: int) -> None:
    raw = json.loads((node.runtime_dir / "status.json").read_text())
    tabby = (raw.get("unit") or {}).get("main_pid")
    doc = _normalize(raw, node, daemon, tabby)
    (GOLDEN / f"{state}.json").write_text(json.dumps(doc, indent=1) + "\n")


def _cycles(node: Node, n: int = 3) -> None:
    """Wait until the daemon completed n more cycles (its heartbeat moved n times)."""
    for _ in range(n):
        beat = node.heartbeat()

        def moved(before: float | None = beat) -> bool:
            return node.heartbeat() != before

        wait_for(moved, WAIT, "the next cycle")


def _cli(node: Node, *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "hydra_watchdog", *args, "--config", str(node.config)],
        check=True,
        capture_output=True,
        timeout=60,
    )


def _capture(tmp_path: Path, nvml: NvmlSim) -> None:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    runner = Daemons()
    try:
        # healthy, degraded, paused, stopped: one daemon, one node
        node = Node(tmp_path / "a", nvml)
        node.write_config()
        proc = runner.start(node)
        wait_for(lambda: node.phase() is Phase.HEALTHY, WAIT, "healthy")
        _cycles(node)
        _keep(node, "healthy", proc.pid)
        write_control(node.control, slow_seconds=1.3)
        wait_for(lambda: node.phase() is Phase.DEGRADED, WAIT, "degraded")
        _keep(node, "degraded", proc.pid)
        write_control(node.control)
        _cli(node, "pause", "--for", "30m", "--reason", "nixos-rebuild switch")
        wait_for(lambda: node.phase() is Phase.PAUSED, WAIT, "paused")
        _cycles(node)
        _keep(node, "paused", proc.pid)
        _cli(node, "resume")
        wait_for(lambda: node.phase() is Phase.HEALTHY, WAIT, "healthy again")
        proc.send_signal(signal.SIGTERM)
        proc.wait(WAIT)
        _keep(node, "stopped", proc.pid)
        # blocked: today's build (exllamav3) refuses the exl2 model, for good
        node = Node(tmp_path / "b", nvml, flavor="modern")
        node.write_config()
        config = node.models / "m1" / "config.json"
        exl2 = {**json.loads(config.read_text()), "quantization_config": {"quant_method": "exl2"}}
        config.write_text(json.dumps(exl2))
        proc = runner.start(node)
        wait_for(lambda: node.phase() is Phase.BLOCKED, WAIT, "blocked")
        _cycles(node)
        _keep(node, "blocked", proc.pid)
        proc.kill()
        proc.wait(WAIT)
        # killed: SIGKILL, no chance to say so
        node = Node(tmp_path / "c", nvml)
        node.write_config()
        proc = runner.start(node)
        wait_for(lambda: node.phase() is Phase.HEALTHY, WAIT, "healthy")
        _cycles(node)
        proc.kill()
        proc.wait(WAIT)
        _keep(node, "killed", proc.pid)
    finally:
        runner.cleanup()


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory, nvml_sim_library: Path) -> None:
    """With HYDRA_GOLDEN=regen, the status files are captured afresh before the screens."""
    if REGEN:
        root = tmp_path_factory.mktemp("capture")
        state = root / "nvml-state"
        nvml_state.write_state(state, nvml_state.default_state())
        _capture(root, NvmlSim(nvml_sim_library, state))


def test_each_captured_files_summary_says_its_own_values() -> None:
    """The summary line is what the daemon makes of the file's own values: a latency made
    stable at capture is also the one the summary says (it said 16 ms beside 4 ms)."""
    for state in STATES:
        report = from_json((GOLDEN / f"{state}.json").read_bytes())
        assert report.summary == summarize(report), state


def test_the_captured_files_are_the_daemons() -> None:
    """Each file parses as a report of the state it is named after (a capture went right)."""
    phases = {"healthy": "healthy", "degraded": "degraded", "blocked": "blocked"}
    phases |= {"paused": "paused", "stopped": "healthy", "killed": "healthy"}
    for state, phase in phases.items():
        report = from_json((GOLDEN / f"{state}.json").read_bytes())
        assert report.phase == phase, state
        assert (report.stopped_at is not None) == (state == "stopped"), state
        assert report.heartbeat == T0, state


# --- how the screen reaches the operator ---------------------------------------------------------


def _status_cli(
    *args: str, stdout: int | None = subprocess.PIPE, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hydra_watchdog", "status", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_a_reader_that_went_away_ends_status_quietly_with_its_verdict(tmp_path: Path) -> None:
    """`status | head -c1`: the pipe closes while status writes; no traceback, the exit code is
    the verdict's (3 here: no status file), not Python's 1 or 120."""
    read, write = os.pipe()
    os.close(read)  # nobody will read: every write fails with EPIPE
    try:
        out = _status_cli("--runtime-dir", str(tmp_path), stdout=write)
    finally:
        os.close(write)
    assert out.returncode == 3
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr


def test_status_is_coloured_on_a_terminal_only_and_never_with_no_color(tmp_path: Path) -> None:
    import pty  # a terminal for this test alone

    def on_a_terminal(env: dict[str, str]) -> str:
        leader, follower = pty.openpty()
        try:
            _status_cli("--runtime-dir", str(tmp_path), stdout=follower, env=env)
            os.close(follower)
            chunks = []
            while True:
                try:
                    chunk = os.read(leader, 4096)
                except OSError:  # EIO: the terminal's other side is closed
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks).decode()
        finally:
            os.close(leader)

    coloured = on_a_terminal({"TERM": "xterm"})
    assert coloured.startswith("\x1b[35mUNKNOWN\x1b[0m: no status file"), coloured
    assert "\x1b" not in on_a_terminal({"TERM": "xterm", "NO_COLOR": "1"})
    assert "\x1b" not in _status_cli("--runtime-dir", str(tmp_path)).stdout  # piped


def test_text_from_other_processes_is_escaped_on_the_screen(tmp_path: Path) -> None:
    """A model id TabbyAPI reports, as it reported it: an escape sequence that clears the
    terminal is shown, not obeyed (issue 22, item 7)."""
    golden = json.loads((GOLDEN / "healthy.json").read_text())
    golden["model"]["loaded"] = golden["model"]["wanted"] = "m1\x1b[2J\x1b[H\nOK: all fine"
    golden["findings"] = [{"rule": "x", "severity": "warning", "message": "\x1b]0;owned\x07"}]
    report = from_json(json.dumps(golden))
    text = screen(report, fake_proc(tmp_path / "proc", alive=True))
    assert "\x1b" not in text and "\x07" not in text
    assert "m1\\x1b[2J\\x1b[H\\nOK: all fine loaded" in text
    assert "\\x1b]0;owned\\x07" in text
    assert not any(line.startswith("OK: all fine") for line in text.splitlines())
