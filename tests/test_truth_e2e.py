"""What the daemon says, end to end against the TabbyAPI simulator with the real server's
behaviours (notes/tabbyapi.md): a stale admin key, a load that can never succeed, the exl2
build's load-lock leak. The daemon runs as a subprocess with the demo's stand-in unit."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hydra_watchdog.events import EventKind
from hydra_watchdog.observe import MODEL_QUIET
from hydra_watchdog.report.status import from_json
from hydra_watchdog.sim.tabby_server import NO_MODEL_LOGGED, write_control
from hydra_watchdog.states import Phase
from tests.harness.nvml import NvmlSim, nvml_sim, nvml_sim_library  # noqa: F401
from tests.harness.tabby import ADMIN_KEY, API_KEY, free_port, wait_for
from tests.test_daemon import WAIT, Daemons, Node


@pytest.fixture
def sim_node(tmp_path: Path, nvml_sim: NvmlSim) -> Node:  # noqa: F811
    n = Node(tmp_path, nvml_sim)
    n.write_config()
    return n


@pytest.fixture
def runner() -> Iterator[Daemons]:
    d = Daemons()
    yield d
    d.cleanup()


def _findings(node: Node) -> list[tuple[str, str]]:
    report = from_json((node.runtime_dir / "status.json").read_bytes())
    return [(f.rule, f.message) for f in report.findings]


def _status_exit(node: Node) -> int:
    out = subprocess.run(
        [sys.executable, "-m", "hydra_watchdog", "status", "--config", str(node.config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return out.returncode


def test_a_stale_admin_key_is_named_and_no_load_is_tried(sim_node: Node, runner: Daemons) -> None:
    sim_node.key_file.write_text("a-stale-key-from-last-month\n")
    runner.start(sim_node)
    wait_for(lambda: sim_node.phase() is Phase.BLOCKED, WAIT, "the rejected key to block")
    _, message = next(f for f in _findings(sim_node) if f[0] == "admin_key_rejected")
    assert f"the file {sim_node.key_file}" in message and "loads are impossible" in message
    assert "a-stale-key" not in message
    assert EventKind.ADMIN_KEY_REJECTED in sim_node.kinds()
    assert sim_node.loads() == []  # the 401 on /v1/model: a load could only fail the same way
    assert _status_exit(sim_node) == 2


def test_a_permanent_load_error_is_tried_once_per_model(sim_node: Node, runner: Daemons) -> None:
    words = (
        "Models quantized with 'exl2' require the exllamav2 backend, which is no longer supported"
    )
    write_control(sim_node.control, load_error=words)
    sim_node.write_config(model={"name": "m1", "fallback": "m2", "max_load_attempts": 5})
    runner.start(sim_node)
    wait_for(lambda: len(sim_node.loads()) >= 2, WAIT, "the main and the fallback load")
    time.sleep(3.0)  # ~15 more cycles: nothing is retried
    assert [r["model"] for r in sim_node.loads()] == ["m1", "m2"]
    crit = [m for r, m in _findings(sim_node) if r == "load_failed" and "no longer supported" in m]
    assert crit and "not retried until" in crit[0]
    failed = [e for e in sim_node.events() if e.kind is EventKind.LOAD_FAILED]
    assert len(failed) == 2 and all("no longer supported" in e.message for e in failed)


def test_the_load_lock_leak_is_seen_restarted_and_verified(sim_node: Node, runner: Daemons) -> None:
    sim_node.write_config(tabbyapi={"canary_interval": "1s", "canary_deadline": "1s"})
    runner.start(sim_node)
    wait_for(lambda: sim_node.phase() is Phase.HEALTHY, WAIT, "the model to be loaded")
    # A client sends a completion while no model is loaded (a router during an outage): the
    # exl2 build leaks its load lock, and every completion hangs from then on.
    unload = httpx.post(
        f"http://127.0.0.1:{sim_node.port}/v1/model/unload",
        headers={"Authorization": f"Bearer {sim_node.key_file.read_text().strip()}"},
        timeout=10,
    )
    assert unload.status_code == 200
    leak = httpx.post(
        f"http://127.0.0.1:{sim_node.port}/v1/completions",
        json={"prompt": "Hi", "max_tokens": 1},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=10,
    )
    assert leak.status_code in (400, 503)  # "no model": 503, or 400 on builds before 2025-04
    wait_for(lambda: EventKind.GENERATION_HANG in sim_node.kinds(), WAIT, "the stall to be seen")
    hang = next(e for e in sim_node.events() if e.kind is EventKind.GENERATION_HANG)
    assert "completions stalled while /health is 200" in hang.message

    def recovered_after_the_hang() -> bool:
        kinds = sim_node.kinds()
        hung = kinds.index(EventKind.GENERATION_HANG)
        return EventKind.RECOVERED in kinds[hung:]

    wait_for(recovered_after_the_hang, WAIT, "a verified recovery after the hang")
    events = sim_node.events()
    hung = next(i for i, e in enumerate(events) if e.kind is EventKind.GENERATION_HANG)
    after = events[hung:]
    restarts = [i for i, e in enumerate(after) if e.action == "restart_unit"]
    recovered = [i for i, e in enumerate(after) if e.kind is EventKind.RECOVERED]
    # restarted once, and called recovered only after that (a passing canary came in between)
    assert len(restarts) == 1 and restarts[0] < recovered[0]
    # The events come from the state file, the phase from the status file the same cycle writes
    # after it (reporters' order): read at once, the phase can still be the cycle's before.
    wait_for(lambda: sim_node.phase() is Phase.HEALTHY, 5, "the status file of that cycle")


# --- issue 23 item 1: an API key in the admin key's place --------------------------------------


def test_an_api_key_in_the_key_file_is_named_and_one_load_is_sent(
    sim_node: Node, runner: Daemons
) -> None:
    # TabbyAPI takes its ordinary API key for GET /v1/model and answers the load 401 "Invalid
    # admin key" (notes/tabbyapi.md): the watchdog once sent that load every cycle.
    sim_node.key_file.write_text(API_KEY + "\n")
    runner.start(sim_node)
    wait_for(lambda: bool(_rejected(sim_node)), WAIT, "the load's 401 to be named")
    time.sleep(3.0)  # ~15 cycles at 200 ms
    assert len(sim_node.loads()) == 1
    assert sim_node.loads()[0]["status"] == 401
    message = _rejected(sim_node)
    assert f"the file {sim_node.key_file}" in message
    assert "accepted for reading (/v1/model) but not for loading" in message
    assert "api_key, not its admin_key" in message
    assert "read again when it changes" in message and API_KEY not in message
    assert sim_node.phase() is Phase.BLOCKED
    assert EventKind.ADMIN_KEY_REJECTED in sim_node.kinds()
    assert _status_exit(sim_node) == 2

    # The right key put in place: read again without SIGHUP, and the model loads.
    sim_node.key_file.write_text(ADMIN_KEY + "\n")
    wait_for(lambda: sim_node.phase() is Phase.HEALTHY, WAIT, "the load with the new key")
    assert [r["status"] for r in sim_node.loads()] == [401, 200]
    assert _rejected(sim_node) == ""


def _rejected(node: Node) -> str:
    try:
        return next((m for r, m in _findings(node) if r == "admin_key_rejected"), "")
    except (OSError, ValueError):
        return ""


# --- issue 23 item 5: TabbyAPI's own log -------------------------------------------------------


def _no_model_lines(node: Node) -> int:
    """The ERROR lines TabbyAPI (the simulator) wrote for "no model" answers."""
    text = (node.root / "unit.log").read_text(errors="replace")
    return sum(1 for line in text.splitlines() if line.startswith(NO_MODEL_LOGGED))


def test_no_model_is_asked_once_a_minute_while_nothing_changes(
    sim_node: Node, runner: Daemons
) -> None:
    words = "Backend 'exllamav2' selected, but required dependencies are not installed."
    write_control(sim_node.control, load_error=words)
    runner.start(sim_node)
    wait_for(lambda: EventKind.LOAD_FAILED in sim_node.kinds(), WAIT, "the permanent failure")
    time.sleep(1.0)  # the ask after the load's end
    before = _no_model_lines(sim_node)
    time.sleep(5.0)  # 25 cycles at 200 ms: one ERROR line each before
    assert _no_model_lines(sim_node) - before == 0
    assert len(sim_node.loads()) == 1

    # A model loaded by hand is still seen within the minute.
    write_control(sim_node.control)
    loaded = httpx.post(
        f"http://127.0.0.1:{sim_node.port}/v1/model/load",
        json={"model_name": "m2"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=30,
    )
    assert loaded.status_code == 200
    by_hand = time.monotonic()
    wait_for(lambda: _loaded(sim_node) == "m2", MODEL_QUIET + WAIT, "the model loaded by hand")
    assert time.monotonic() - by_hand <= MODEL_QUIET + 5.0
    assert len(sim_node.loads()) == 2  # ours, and the one by hand


def _loaded(node: Node) -> str | None:
    try:
        return from_json((node.runtime_dir / "status.json").read_bytes()).model.loaded
    except (OSError, ValueError):
        return None


# --- issue 23 item 7: the end of every load ----------------------------------------------------


def _metrics_page(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def _ended(node: Node, result: str, port: int) -> bool:
    line = f'hydra_watchdog_actions_total{{action="load_model",result="{result}"}} 1.0'
    try:
        return line in _metrics_page(port)
    except httpx.HTTPError:
        return False


def test_every_load_end_is_an_event_with_its_duration_and_counted(
    sim_node: Node, runner: Daemons
) -> None:
    port = free_port()
    sim_node.write_config(metrics={"listen": f"127.0.0.1:{port}"})
    runner.start(sim_node)
    wait_for(lambda: EventKind.MODEL_LOADED in sim_node.kinds(), WAIT, "the load's end")
    loaded = next(e for e in sim_node.events() if e.kind is EventKind.MODEL_LOADED)
    assert re.fullmatch(r"loaded m1 in [0-9.]+m?s: confirmed by /v1/model", loaded.message)
    took = float(dict(loaded.fields)["HYDRA_DURATION_S"])
    assert 0.4 <= took < WAIT  # the simulator loads for 0.4 s
    wait_for(lambda: _ended(sim_node, "ok", port), WAIT, "the load counted as ok")
    assert _ended(sim_node, "in_progress", port)

    # Unloaded by hand while its backend is gone: the next load fails, told with its duration.
    words = "Backend 'exllamav2' selected, but required dependencies are not installed."
    write_control(sim_node.control, load_error=words)
    unloaded = httpx.post(
        f"http://127.0.0.1:{sim_node.port}/v1/model/unload",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=10,
    )
    assert unloaded.status_code == 200
    wait_for(lambda: EventKind.LOAD_FAILED in sim_node.kinds(), WAIT, "the failed load's end")
    failed = next(e for e in sim_node.events() if e.kind is EventKind.LOAD_FAILED)
    assert re.match(r"load of m1 failed after [0-9.]+m?s and will not be retried", failed.message)
    assert "HYDRA_DURATION_S" in dict(failed.fields)
    wait_for(lambda: _ended(sim_node, "failed", port), WAIT, "the load counted as failed")


# --- issue 23 item 9: the crash loop's diagnosis -----------------------------------------------


def test_a_crash_loop_is_explained_by_its_error_not_its_start_up_lines(
    sim_node: Node, runner: Daemons
) -> None:
    crash = "RuntimeError: CUDA error: an illegal memory access was encountered"
    write_control(sim_node.control, exit_code=1, exit_error=crash)
    runner.start(sim_node)
    wait_for(lambda: sim_node.phase() is Phase.BACKOFF, WAIT, "the restart loop")
    wait_for(lambda: bool(_journal_finding(sim_node)), WAIT, "the journal's diagnosis")
    said = _journal_finding(sim_node)
    assert said.startswith("last log lines that explain the exit: ")
    assert re.search(
        r"RuntimeError: CUDA error: an illegal memory access was encountered \(\dx\)", said
    )
    assert "Uvicorn running on" not in said and "Traceback" not in said
    result = [m for r, m in _findings(sim_node) if r == "tabbyapi_down" and "Result=" in m]
    assert result and "Result=exit-code (exit status 1)" in result[0], _findings(sim_node)


def _journal_finding(node: Node) -> str:
    try:
        return next((m for _, m in _findings(node) if m.startswith("last log lines")), "")
    except (OSError, ValueError):
        return ""
