"""The CLI as users run it: real subprocesses, real files, the real TabbyAPI simulator."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from hydra_watchdog import __version__, control
from hydra_watchdog.config import Config, parse_config
from hydra_watchdog.events import Event, EventKind
from hydra_watchdog.policy_state import Finding, PolicyState
from hydra_watchdog.report.status import build_status
from hydra_watchdog.statefile import StateFile
from hydra_watchdog.states import Phase, Rule, Severity
from tests.harness.tabby import ADMIN_KEY, TabbySims

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


def _publish(cfg: Config, state: PolicyState, *, age: float = 0.0) -> None:
    wall = time.time() - age
    report = build_status(state, None, cfg, [], wall_now=wall, mono_now=time.monotonic(), pid=1234)
    from dataclasses import replace

    control.write_status(cfg.watchdog.runtime_dir, replace(report, heartbeat=wall))


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
    dirs_config: tuple[Path, Config], phase: Phase, code: int, name: str
) -> None:
    path, cfg = dirs_config
    finding = Finding(Rule.SLOW_HEALTH, Severity.WARNING, "slow as molasses")
    _publish(cfg, PolicyState(phase=phase, findings=(finding,)))
    out = cli("status", "--config", str(path))
    assert out.returncode == code, out.stdout + out.stderr
    assert out.stdout.startswith(f"{name}:")
    out = cli("status", "--json", "--config", str(path))
    doc = json.loads(out.stdout)
    assert (doc["verdict"], doc["exit_code"]) == (name, code)
    assert doc["report"]["phase"] == phase.value and doc["report"]["pid"] == 1234


def test_stale_status_is_unknown(dirs_config: tuple[Path, Config]) -> None:
    path, cfg = dirs_config
    _publish(cfg, PolicyState(phase=Phase.HEALTHY), age=600)
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
                "cmdline_patterns": [str(models_dir)],
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
    assert doc["phase"] == "loading"
    assert [a["rule"] for a in doc["planned_actions"]] == ["no_model"]
    assert doc["planned_actions"][0]["action"] == "load model m1"
    assert out.returncode == 1
    assert sim.loads() == []  # planned, never executed
    assert ADMIN_KEY not in out.stdout + out.stderr
    text = cli("check", "--config", str(path)).stdout
    assert "would load model m1" in text and "NVML unavailable" in text


def test_verify_walks_the_runbook_checks(tmp_path: Path, tabby_sim: TabbySims) -> None:
    sim = tabby_sim.start(flavor="modern", startup_model="m1")
    path = _sim_config(tmp_path, sim.url, sim.models_dir)
    out = cli("verify", "--config", str(path))
    lines = out.stdout.splitlines()
    assert any(ln.startswith("OK   health") for ln in lines)
    assert any(ln.startswith("OK   model loaded: m1") for ln in lines)
    assert any(ln.startswith("OK   1-token completion") for ln in lines)
    assert out.returncode == 0, out.stdout
    sim.stop()
    out = cli("verify", "--config", str(path))
    assert out.returncode == 2 and "FAIL health" in out.stdout
