"""The CLI as users run it: real subprocesses, real files, the real TabbyAPI simulator."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hydra_watchdog import __version__, control
from hydra_watchdog.config import Config, parse_config
from hydra_watchdog.events import Event, EventKind
from hydra_watchdog.policy_state import Finding, PolicyState
from hydra_watchdog.report.status import replace
from hydra_watchdog.report.status_build import build_status
from hydra_watchdog.report.status_file import STATUS_FILE, mark_stopped, write_status
from hydra_watchdog.report.status_view import process_start
from hydra_watchdog.statefile import StateFile
from hydra_watchdog.states import Phase, Rule, Severity
from tests.harness.lines import unwrapped
from tests.harness.tabby import ADMIN_KEY, TabbySims, free_port, wait_for

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hydra_watchdog", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def write_config(path: Path, data: dict[str, Any]) -> Path:
    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def dirs_config(tmp_path: Path) -> tuple[Path, Config]:
    data = {
        "watchdog": {
            "state_dir": str(tmp_path / "state"),
            "runtime_dir": str(tmp_path / "run"),
            "interval": "1s",
        }
    }
    path = write_config(tmp_path / "config.toml", data)
    return path, parse_config(data)


def test_version() -> None:
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"hydra-watchdog {__version__}"


def test_check_config_accepts_the_example_and_refuses_credentials(tmp_path: Path) -> None:
    out = cli("check-config", "--config", str(EXAMPLE))
    assert out.returncode == 0, out.stderr
    assert "[tabbyapi]" in out.stdout and 'url = "http://127.0.0.1:5000"' in out.stdout
    secret = write_config(
        tmp_path / "c.toml",
        {"fallback_route": {"url": "http://user:hunter2@127.0.0.1:4000/v1?token=abc"}},
    )
    out = cli("check-config", "--config", str(secret))
    # Credentials in a URL are refused (they would travel with every probe), without echoing them.
    assert out.returncode == 78
    assert "fallback_route.url" in out.stderr and "***@127.0.0.1" in out.stderr
    assert "hunter2" not in out.stderr + out.stdout and "abc" not in out.stderr + out.stdout


@pytest.mark.parametrize("body", ["", "# nothing but a comment\n\n[watchdog]\n"])
def test_check_config_says_when_a_config_sets_nothing(tmp_path: Path, body: str) -> None:
    # An empty file is valid (every default is safe) but is rarely what the operator meant: the
    # README's install once opened an editor on a file that did not exist.
    path = tmp_path / "config.toml"
    path.write_text(body)
    out = cli("check-config", "--config", str(path))
    assert out.returncode == 0, out.stderr
    assert out.stderr == f"warning: {path}: every option is at its default\n"
    assert "[tabbyapi]" in out.stdout  # the defaults, printed as always
    assert cli("check-config", "--config", str(EXAMPLE)).stderr == ""


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ('[tabbyapi]\nhealth_timeot = "5s"\n', "did you mean 'health_timeout'"),
        ('[tabbyapi]\nurl = "http://192.0.2.7:5000"\n', "loopback"),
        ('[restart_loop]\nwindow = "ten minutes"\n', 'a duration like "500ms"'),
        ("[watchdog\n", "not valid TOML"),
    ],
)
def test_check_config_rejects_with_ex_config_and_no_traceback(
    tmp_path: Path, body: str, needle: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body)
    out = cli("check-config", "--config", str(path))
    assert out.returncode == 78
    assert needle in out.stderr and "Traceback" not in out.stderr


def test_missing_config_is_ex_config(tmp_path: Path) -> None:
    out = cli("run", "--once", "--config", str(tmp_path / "nope.toml"))
    assert out.returncode == 78 and "does not exist" in out.stderr


@pytest.mark.parametrize("body", [None, "[watchdog\n"])
@pytest.mark.parametrize(
    ("command", "code"),
    [("status", 3), ("check", 3), ("verify", 3), ("check-config", 78), ("run", 78)],
)
def test_a_config_that_cannot_be_read_is_unknown_to_reports_and_ex_config_to_actors(
    tmp_path: Path, body: str | None, command: str, code: int
) -> None:
    """status, check and verify report: without their config they cannot say (UNKNOWN, 3);
    run and check-config act on it: EX_CONFIG (78). One line, never a traceback."""
    path = tmp_path / "config.toml"
    if body is not None:
        path.write_text(body)
    extra = ["--runtime-dir", str(tmp_path)] if command == "status" else []
    out = cli(command, "--config", str(path), *extra, *(["--once"] if command == "run" else []))
    assert out.returncode == code, out.stdout + out.stderr
    said = out.stderr + out.stdout
    assert "Traceback" not in said
    assert command == "status" or str(path) in said  # status with --runtime-dir needs none


_STANDIN = "import time; time.sleep(600)"


@pytest.fixture
def standin() -> Iterator[int]:
    """A live process whose command line says hydra_watchdog: what `status` takes for the
    daemon that wrote the file. Its pid goes into the status files below."""
    proc = subprocess.Popen([sys.executable, "-c", _STANDIN, "hydra_watchdog-standin"])
    cmdline = Path(f"/proc/{proc.pid}/cmdline")
    wait_for(lambda: b"hydra_watchdog" in cmdline.read_bytes(), 30, "the stand-in's exec")
    yield proc.pid
    proc.kill()
    proc.wait()


def _publish(cfg: Config, state: PolicyState, *, pid: int, age: float = 0.0) -> None:
    wall = time.time() - age
    report = build_status(
        state,
        None,
        cfg,
        [],
        wall_now=wall,
        mono_now=time.monotonic(),
        pid=pid,
        pid_start=process_start(pid),
    )
    write_status(cfg.watchdog.runtime_dir, replace(report, heartbeat=wall))


def test_status_without_a_daemon_is_unknown(dirs_config: tuple[Path, Config]) -> None:
    path, _ = dirs_config
    out = cli("status", "--config", str(path))
    assert out.returncode == 3
    assert out.stdout.startswith("UNKNOWN: no status file")


@pytest.mark.parametrize(
    ("phase", "code", "name"),
    [(Phase.HEALTHY, 0, "OK"), (Phase.DEGRADED, 1, "WARNING"), (Phase.BACKOFF, 2, "CRITICAL")],
)
def test_status_verdicts_follow_nagios(
    dirs_config: tuple[Path, Config], phase: Phase, code: int, name: str, standin: int
) -> None:
    path, cfg = dirs_config
    finding = Finding(Rule.SLOW_HEALTH, Severity.WARNING, "slow as molasses")
    _publish(cfg, PolicyState(phase=phase, findings=(finding,)), pid=standin)
    out = cli("status", "--config", str(path))
    assert out.returncode == code, out.stdout + out.stderr
    assert out.stdout.startswith(f"{name}: {phase.value}")  # not "OK: OK: ..."
    out = cli("status", "--json", "--config", str(path))
    doc = json.loads(out.stdout)
    assert (doc["verdict"], doc["exit_code"]) == (name, code)
    assert doc["report"]["phase"] == phase.value and doc["report"]["pid"] == standin


def test_stale_status_is_unknown(dirs_config: tuple[Path, Config], standin: int) -> None:
    path, cfg = dirs_config
    _publish(cfg, PolicyState(phase=Phase.HEALTHY), pid=standin, age=600)
    out = cli("status", "--config", str(path))
    assert out.returncode == 3 and "stale" in out.stdout


def test_garbage_status_file_is_unknown_with_the_reason(dirs_config: tuple[Path, Config]) -> None:
    path, cfg = dirs_config
    run = Path(cfg.watchdog.runtime_dir)
    run.mkdir(parents=True)
    (run / "status.json").write_text("{not json")
    out = cli("status", "--config", str(path))
    assert out.returncode == 3 and "not valid JSON" in out.stdout


def test_pause_and_resume_reach_the_state_dir(dirs_config: tuple[Path, Config]) -> None:
    path, cfg = dirs_config
    out = cli("pause", "--for", "5m", "--reason", "driver upgrade", "--config", str(path))
    assert out.returncode == 0, out.stderr
    pause = control.read_pause(cfg.watchdog.state_dir, time.time(), time.monotonic())
    assert pause is not None and pause.reason == "driver upgrade"
    assert pause.until is not None and 290 < pause.until - time.monotonic() <= 300
    assert cli("resume", "--config", str(path)).stdout.strip() == "resumed"
    assert control.read_pause(cfg.watchdog.state_dir, time.time(), time.monotonic()) is None
    bad = cli("pause", "--for", "soon", "--config", str(path))
    assert bad.returncode == 2 and "--for 'soon'" in bad.stderr


def test_events_lists_what_the_state_file_kept(dirs_config: tuple[Path, Config]) -> None:
    path, cfg = dirs_config
    events = [
        Event(time.time(), EventKind.ACTION, Severity.NOTICE, f"action {i}", Phase.DOWN, Rule.DOWN)
        for i in range(5)
    ]
    StateFile(cfg.watchdog.state_dir, events_kept=50).save(PolicyState(), events)
    out = cli("events", "-n", "2", "--json", "--config", str(path))
    assert out.returncode == 0, out.stderr
    assert [e["message"] for e in json.loads(out.stdout)] == ["action 3", "action 4"]
    text = cli("events", "-n", "1", "--config", str(path)).stdout
    assert "action 4" in text and "[tabbyapi_down]" in text


def _sim_config(tmp_path: Path, sim_url: str, models_dir: Path) -> Path:
    key = tmp_path / "admin_key"
    key.write_text(ADMIN_KEY)
    return write_config(
        tmp_path / "sim.toml",
        {
            "watchdog": {
                "state_dir": str(tmp_path / "state"),
                "runtime_dir": str(tmp_path / "run"),
            },
            "tabbyapi": {
                "url": sim_url,
                "admin_key_file": str(key),
                "venv": "",
                "cmdline_patterns": [str(models_dir.parent / "tabbyapi")],  # the sim's install tree
                "health_timeout": "3s",
                "canary_deadline": "5s",
            },
            "model": {"name": "m1", "models_dir": str(models_dir), "vram_required_gib": 1.0},
            "gpu": {"nvml_library": str(tmp_path / "no-such-libnvidia-ml.so.1")},
            "metrics": {"listen": ""},
        },
    )


def test_check_plans_but_never_acts(tmp_path: Path, tabby_sim: TabbySims) -> None:
    sim = tabby_sim.start(flavor="exl2")
    path = _sim_config(tmp_path, sim.url, sim.models_dir)
    out = cli("check", "--json", "--config", str(path))
    doc = json.loads(out.stdout)
    assert doc["phase"] == "no_model"  # as seen: the load is only planned, nothing loads
    assert [a["rule"] for a in doc["planned_actions"]] == ["no_model"]
    assert doc["planned_actions"][0]["action"] == "load model m1"
    assert out.returncode == 2  # no daemon to load it: CRITICAL, as verify says
    assert sim.loads() == []  # planned, never executed
    assert ADMIN_KEY not in out.stdout + out.stderr
    text = cli("check", "--config", str(path)).stdout
    assert "would load model m1" in text and "NVML unavailable" in text


# --- issue 12: a dead daemon is never OK ----------------------------------------------------------


def test_status_of_a_daemon_whose_pid_is_gone_is_unknown_at_once(
    dirs_config: tuple[Path, Config],
) -> None:
    path, cfg = dirs_config
    dead = subprocess.Popen([sys.executable, "-c", "pass", "hydra_watchdog"])
    dead.wait()
    _publish(cfg, PolicyState(phase=Phase.HEALTHY), pid=dead.pid)  # a fresh heartbeat
    out = cli("status", "--config", str(path))
    assert out.returncode == 3, out.stdout
    assert out.stdout.startswith(f"UNKNOWN: daemon pid {dead.pid} is gone")


def test_status_of_a_pid_reused_by_another_program_is_unknown(
    dirs_config: tuple[Path, Config],
) -> None:
    path, cfg = dirs_config
    other = subprocess.Popen([sys.executable, "-c", _STANDIN])
    try:
        cmdline = Path(f"/proc/{other.pid}/cmdline")
        wait_for(lambda: b"sleep" in cmdline.read_bytes(), 30, "the exec")
        _publish(cfg, PolicyState(phase=Phase.HEALTHY), pid=other.pid)
        out = cli("status", "--config", str(path))
        assert out.returncode == 3 and "is now another process" in out.stdout
    finally:
        other.kill()
        other.wait()


def test_status_after_a_clean_stop_is_unknown_stopped(
    dirs_config: tuple[Path, Config], standin: int
) -> None:
    path, cfg = dirs_config
    _publish(cfg, PolicyState(phase=Phase.HEALTHY), pid=standin)
    assert cli("status", "--config", str(path)).returncode == 0
    mark_stopped(cfg.watchdog.runtime_dir, wall=time.time(), pid=standin)
    out = cli("status", "--config", str(path))
    assert out.returncode == 3
    assert out.stdout.startswith(f"UNKNOWN: hydra-watchdog (pid {standin}) stopped at ")


# --- issue 10: garbage status files are UNKNOWN, never a traceback, never OK ----------------------


def _garbage(base: str) -> list[bytes]:
    doc = json.loads(base)
    out: list[bytes] = []
    for key, poison in [
        ("heartbeat", "NaN"),
        ("heartbeat", "Infinity"),
        ("heartbeat", "1e400"),
        ("heartbeat", str(time.time() + 3600)),  # a heartbeat from the future
        ("pid", "9" * 400),
        ("pid", "9" * 5000),
        ("summary", '"\\ud800"'),
        ("phase", "[" * 100_000 + "]" * 100_000),
    ]:
        doc2 = dict(doc, **{key: "__P__"})
        out.append(json.dumps(doc2).replace('"__P__"', poison).encode())
    out.append(base.encode().replace(b"healthy", b"\xff\xfe"))
    return out


def test_status_of_garbage_files_is_unknown_never_a_traceback(
    dirs_config: tuple[Path, Config], standin: int
) -> None:
    path, cfg = dirs_config
    _publish(cfg, PolicyState(phase=Phase.HEALTHY), pid=standin)
    status_file = Path(cfg.watchdog.runtime_dir) / STATUS_FILE
    base = status_file.read_text()
    assert cli("status", "--config", str(path)).returncode == 0  # the file before the poison
    for content in _garbage(base):
        status_file.write_bytes(content)
        for extra in ((), ("--json",)):
            out = cli("status", *extra, "--config", str(path))
            assert out.returncode == 3, (content[:80], out.stdout, out.stderr)
            assert "Traceback" not in out.stderr + out.stdout
            if extra:
                assert json.loads(out.stdout)["verdict"] == "UNKNOWN"
            else:
                assert out.stdout.startswith("UNKNOWN: ")


def test_status_of_a_huge_file_is_unknown_and_reads_at_most_the_cap(
    dirs_config: tuple[Path, Config],
) -> None:
    path, cfg = dirs_config
    run = Path(cfg.watchdog.runtime_dir)
    run.mkdir(parents=True)
    with (run / STATUS_FILE).open("wb") as f:
        f.truncate(300 * 1024**2)  # sparse: no disk, but 300 MB of memory if read whole
    # The child reports its own peak (VmHWM belongs to the exec'd image; wait4's ru_maxrss would
    # also count the pages it shared with this test process before the exec).
    peak = (
        "import atexit, sys\n"
        "def hwm():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmHWM:'):\n"
        "            sys.stderr.write('PEAK ' + line.split()[1] + '\\n')\n"
        "atexit.register(hwm)\n"
        "from hydra_watchdog.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", peak, "status", "--config", str(path)],
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert out.returncode == 3 and out.stdout.startswith(b"UNKNOWN: "), out
    assert b"more than the 4194304" in out.stdout
    peak_kib = int(out.stderr.split(b"PEAK ")[1].split()[0])
    assert peak_kib < 150 * 1024, f"status used {peak_kib} KiB"


# --- issue 10: the daemon refuses dirs it must not trust ------------------------------------------


def _nobody(code: str) -> None:
    """Run `code` as an unprivileged user (nobody), with the system's python."""
    subprocess.run(
        ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
         "/usr/bin/python3", "-c", code],
        check=True, timeout=60, cwd="/",
    )  # fmt: skip


def _safe_run_config(tmp_path: Path, state: Path, run: Path) -> Path:
    # dry run, a closed loopback port, no GPU library: should a refusal ever fail, the one
    # cycle that follows acts on nothing
    return write_config(
        tmp_path / "run.toml",
        {
            "watchdog": {"state_dir": str(state), "runtime_dir": str(run), "dry_run": True},
            "tabbyapi": {"url": f"http://127.0.0.1:{free_port()}", "venv": ""},
            "gpu": {"nvml_library": str(tmp_path / "no-libnvidia-ml.so")},
        },
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_run_refuses_a_state_dir_another_user_created_first(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # not under tmp_path: its parents are 0700, out of nobody's reach
    shared = Path(tempfile.mkdtemp(prefix="hydra-shared-"))
    request.addfinalizer(lambda: shutil.rmtree(shared))
    shared.chmod(0o1777)  # a parent others can write into (a mistake, or /tmp itself)
    state = shared / "state"
    _nobody(
        f"import os; os.mkdir({str(state)!r}, 0o700); "
        f"open({str(state / 'pause.json')!r}, 'w').write("
        '\'{"version": 1, "reason": "planted", "until_wall": null}\')'
    )
    config = _safe_run_config(tmp_path, state, tmp_path / "run")
    out = cli("run", "--once", "--config", str(config))
    assert out.returncode == 78, out.stdout + out.stderr
    assert f"state dir {state} is owned by uid 65534, not by uid 0" in unwrapped(out.stderr)
    assert "Traceback" not in out.stderr
    # never repaired and trusted: still theirs, nothing of ours written into it
    assert (state.stat().st_uid, state.stat().st_mode & 0o777) == (65534, 0o700)
    assert sorted(p.name for p in state.iterdir()) == ["pause.json"]
    # `pause` refuses it too
    bad = cli("pause", "--reason", "x", "--config", str(config))
    assert bad.returncode == 3 and "owned by uid 65534" in bad.stderr


def test_run_refuses_a_world_writable_runtime_dir(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o1777)
    config = _safe_run_config(tmp_path, tmp_path / "state", run)
    out = cli("run", "--once", "--config", str(config))
    assert out.returncode == 78, out.stdout + out.stderr
    assert f"runtime dir {run} is writable by others (mode 1777)" in unwrapped(out.stderr)
    assert list(run.iterdir()) == []


@pytest.mark.parametrize(
    "content",
    [b'{"version": 1, "state": {"phase_since": ' + b"9" * 400 + b"}}", b"directory"],
)
def test_events_quarantines_a_corrupt_state_file_without_a_traceback(
    dirs_config: tuple[Path, Config], content: bytes
) -> None:
    path, cfg = dirs_config
    state = Path(cfg.watchdog.state_dir)
    state.mkdir(mode=0o700)
    if content == b"directory":
        (state / "state.json").mkdir()
    else:
        (state / "state.json").write_bytes(content)
    out = cli("events", "--config", str(path))
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "no events recorded" in out.stdout
    assert len(list(state.glob("state.json.corrupt-*"))) == 1
