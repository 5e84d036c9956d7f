"""`hydra-watchdog verify` as an operator runs it (issue 23, item 4): real subprocesses, the
TabbyAPI simulator playing each build (the exl2-era one ships ExLlamaV2 and ExLlamaV3, today's
ExLlamaV3 only), a uid 65534 squatter on the port. Golden screens under tests/golden/verify/,
with the run's incidental values (paths, ports, pids, milliseconds) made stable; regenerate with
HYDRA_GOLDEN=regen, then read the diff."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from hydra_watchdog.adapters.backend import configured_backend, detect
from tests.harness.adversary import Squatter
from tests.harness.tabby import ADMIN_KEY, SimProcess, TabbySims, free_port
from tests.test_cli import cli, write_config

GOLDEN = Path(__file__).resolve().parent / "golden" / "verify"
REGEN = os.environ.get("HYDRA_GOLDEN") == "regen"


def _config(tmp_path: Path, url: str, install: Path, models: Path, **tabby: Any) -> Path:
    key = tmp_path / "admin_key"
    key.write_text(ADMIN_KEY)
    tables: dict[str, Any] = {
        "watchdog": {"state_dir": str(tmp_path / "state"), "runtime_dir": str(tmp_path / "run")},
        "tabbyapi": {
            "url": url,
            "admin_key_file": str(key),
            "venv": "",
            "cmdline_patterns": [str(install)],
            "health_timeout": "3s",
            "canary_deadline": "5s",
            **tabby,
        },
        "model": {"name": "m1", "models_dir": str(models), "vram_required_gib": 1.0},
        "gpu": {"nvml_library": str(tmp_path / "no-such-libnvidia-ml.so.1")},
        "metrics": {"listen": ""},
    }
    return write_config(tmp_path / "config.toml", tables)


def verify(config: Path) -> subprocess.CompletedProcess[str]:
    return cli("verify", "--config", str(config))


def unwrapped(out: subprocess.CompletedProcess[str]) -> str:
    """The screen with each check on one line: where the screen wraps at 100 columns depends on
    the run's paths, so a phrase is looked for here, never in the raw screen."""
    return re.sub(r"\n {7}(?=\S)", " ", out.stdout)


def golden(name: str, out: subprocess.CompletedProcess[str], *stable: tuple[str, str]) -> None:
    """The screen equals tests/golden/verify/<name>.txt, once made stable: each check on one
    line (the screen wraps at 100 columns, where the run's paths fall), the `stable` pairs
    replaced, then pids and milliseconds."""
    text = unwrapped(out)
    for old, new in stable:
        text = text.replace(old, new)
    text = re.sub(r"\bpid \d+", "pid N", re.sub(r"\b\d+ ms\b", "N ms", text))
    path = GOLDEN / f"{name}.txt"
    if REGEN:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text()
    assert max(map(len, out.stdout.splitlines())) <= 100


def _stable(tmp_path: Path, sim: SimProcess) -> tuple[tuple[str, str], ...]:
    return ((str(sim.root), "/srv/sim"), (str(tmp_path), "/srv/node"), (f":{sim.port}", ":5000"))


def _quantized(sim: SimProcess, name: str, method: str) -> None:
    config = sim.models_dir / name / "config.json"
    doc = {**json.loads(config.read_text()), "quantization_config": {"quant_method": method}}
    config.write_text(json.dumps(doc))


def test_todays_build_serving_its_model_passes(tmp_path: Path, tabby_sim: TabbySims) -> None:
    sim = tabby_sim.start(flavor="modern", startup_model="m1")
    out = verify(_config(tmp_path, sim.url, sim.install_dir, sim.models_dir))
    assert out.returncode == 0, out.stdout
    golden("todays-build-ok", out, *_stable(tmp_path, sim))


def test_an_exl2_model_on_todays_build_fails_naming_why(
    tmp_path: Path, tabby_sim: TabbySims
) -> None:
    sim = tabby_sim.start(flavor="modern")
    _quantized(sim, "m1", "exl2")
    out = verify(_config(tmp_path, sim.url, sim.install_dir, sim.models_dir))
    assert out.returncode == 2, out.stdout
    assert "FAIL model dir: " in unwrapped(out) and "which needs exllamav2" in unwrapped(out)
    golden("exl2-model-on-todays-build", out, *_stable(tmp_path, sim))


def test_a_missing_exllamav2_extension_fails_the_libraries(
    tmp_path: Path, tabby_sim: TabbySims
) -> None:
    """The exl2 build with its venv but no compiled extension: every exl2 load fails (notes:
    "Backend 'exllamav2' selected, but required dependencies are not installed")."""
    sim = tabby_sim.start(flavor="exl2", startup_model="m1")
    _quantized(sim, "m1", "exl2")
    venv = tmp_path / "venv"
    (venv / "lib" / "python3.11" / "site-packages" / "exllamav2").mkdir(parents=True)
    out = verify(_config(tmp_path, sim.url, sim.install_dir, sim.models_dir, venv=str(venv)))
    assert out.returncode == 2, out.stdout
    assert "FAIL libraries: no ExLlamaV2 extension" in unwrapped(out)
    # before: "exllamav2 cannot load a model from this venv", above "OK model loaded: m1"
    assert "a restart or reload would fail; the running process still serves m1" in unwrapped(out)
    golden("exl2-build-without-its-extension", out, *_stable(tmp_path, sim))


def test_a_check_that_could_not_run_is_skip_and_warns(tmp_path: Path, tabby_sim: TabbySims) -> None:
    """The exl2 build, no venv configured: the library check applies and could not run."""
    sim = tabby_sim.start(flavor="exl2", startup_model="m1")
    _quantized(sim, "m1", "exl2")
    out = verify(_config(tmp_path, sim.url, sim.install_dir, sim.models_dir))
    assert out.returncode == 1, out.stdout
    assert "SKIP libraries: no tabbyapi.venv configured" in unwrapped(out)
    assert "OK   libraries" not in unwrapped(out)


def test_a_squatters_health_is_a_fail_that_names_it(tmp_path: Path, tabby_sim: TabbySims) -> None:
    """uid 65534 would answer /health 200 on TabbyAPI's port while TabbyAPI is down: it is not
    asked (issue 22: /health only from the verified TabbyAPI), and the FAIL names it."""
    sim = tabby_sim.start(flavor="modern", startup_model="m1")
    sim.stop()
    port = free_port()
    config = _config(tmp_path, f"http://127.0.0.1:{port}", sim.install_dir, sim.models_dir)
    with Squatter.start("127.0.0.1", port) as squatter:
        out = verify(config)
        assert out.returncode == 2, out.stdout
        assert "FAIL health: withheld in " in unwrapped(out) and "uid 65534" in unwrapped(out)
        assert squatter.requests() == []
        assert "not TabbyAPI" in unwrapped(out)
        assert "Authorization" not in squatter.transcript()
        stable = (*_stable(tmp_path, sim), (f":{port}", ":5000"), (f"port {port}", "port 5000"))
        golden("squatter-on-the-port", out, *stable)


def test_tabbyapi_down_fails_health_and_skips_what_needs_it(
    tmp_path: Path, tabby_sim: TabbySims
) -> None:
    sim = tabby_sim.start(flavor="modern", startup_model="m1")
    config = _config(tmp_path, sim.url, sim.install_dir, sim.models_dir)
    sim.stop()
    out = verify(config)
    assert out.returncode == 2, out.stdout
    assert "FAIL health: refused" in unwrapped(out)
    assert "SKIP model loaded: not asked: /health failed" in unwrapped(out)


# --- the backend, from the files -----------------------------------------------------------------


def test_config_yml_model_backend() -> None:
    text = "network:\n  port: 5000\nmodel:\n  model_dir: models\n  backend: exllamav2  # old\n"
    assert configured_backend(text) == "exllamav2"
    assert configured_backend("model:\n  model_name: m\nbackend: x\n") == ""
    assert configured_backend("draft_model:\n  backend: exllamav3\n") == ""


BOTH = ("exllamav2", "exllamav3")
CASES = [  # (the build's backends, config.yml, the model's quant_method, backend, its problem)
    (("exllamav3",), "", "", "exllamav3", ""),
    (("exllamav3",), "", "exl2", "exllamav3", "quantized with exl2, which needs exllamav2"),
    (("exllamav3",), "", "exl3", "exllamav3", ""),
    (BOTH, "", "exl2", "exllamav2", ""),
    (BOTH, "", "", "exllamav2", ""),
    (BOTH, "", "exl3", "exllamav3", ""),
    (BOTH, "model:\n  backend: exllamav3\n", "exl2", "exllamav3", "the exllamav3 backend cannot"),
]


@pytest.mark.parametrize("case", CASES)
def test_the_backend_follows_the_build_its_config_and_the_model(
    tmp_path: Path, case: tuple[tuple[str, ...], str, str, str, str]
) -> None:
    shipped, yml, method, name, problem = case
    tree = tmp_path / "tabbyapi"
    (tree / "main.py").parent.mkdir()
    (tree / "main.py").write_text("")
    for b in shipped:
        (tree / "backends" / b).mkdir(parents=True)
    if yml:
        (tree / "config.yml").write_text(yml)
    model = tmp_path / "m"
    model.mkdir()
    quant = {"quantization_config": {"quant_method": method}} if method else {}
    (model / "config.json").write_text(json.dumps({"model_type": "llama", **quant}))
    found = detect([str(tmp_path / "elsewhere"), str(tree)], "", str(model))
    assert (found.name, found.shipped) == (name, shipped)
    assert problem in found.problem and bool(problem) == bool(found.problem)
    # the venv, when there is one, must hold the chosen backend's package
    venv = tmp_path / "venv"
    (venv / "lib" / "python3.11" / "site-packages").mkdir(parents=True)
    if not problem:
        assert "package is not installed" in detect([str(tree)], str(venv), str(model)).problem
