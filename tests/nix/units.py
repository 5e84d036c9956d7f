"""Helpers for the deployment tests: evaluate nix/module.nix through the lib stand-in, render the
units it defines the way NixOS writes them, read unit files, and write TOML."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# The venv that runs the tests holds a real hydra-watchdog executable for ExecStart=.
PACKAGE_ROOT = Path(sys.prefix)
NIX_INSTANTIATE = shutil.which("nix-instantiate")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


class NixError(Exception):
    pass


def evaluate(*modules: str) -> dict[str, Any]:
    """The module evaluated with tests/nix/typical.nix plus `modules` (Nix expressions)."""
    configuration = " ".join(["./tests/nix/typical.nix", *(f"({m})" for m in modules)])
    expr = (
        f"import ./tests/nix/eval.nix {{ configuration = [ {configuration} ]; "
        f"packageRoot = {json.dumps(str(PACKAGE_ROOT))}; }}"
    )
    assert NIX_INSTANTIATE is not None
    proc = subprocess.run(
        [NIX_INSTANTIATE, "--eval", "--strict", "--json", "-E", expr],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise NixError(proc.stderr)
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def _unit_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def render_unit(service: Mapping[str, Any]) -> str:
    """A systemd.services.<name> attrset as the unit file NixOS generates from it."""
    unit: list[str] = []
    if "description" in service:
        unit.append(f"Description={service['description']}")
    for attr, key in (
        ("after", "After"),
        ("before", "Before"),
        ("wants", "Wants"),
        ("requires", "Requires"),
    ):
        if service.get(attr):
            unit.append(f"{key}={' '.join(service[attr])}")
    if service.get("restartTriggers"):
        unit.append(f"X-Restart-Triggers={' '.join(service['restartTriggers'])}")
    for attr, key in (
        ("startLimitIntervalSec", "StartLimitIntervalSec"),
        ("startLimitBurst", "StartLimitBurst"),
    ):
        if attr in service:
            unit.append(f"{key}={service[attr]}")
    body = ["[Unit]", *unit, "", "[Service]"]
    for name, value in sorted(service.get("environment", {}).items()):
        body.append("Environment=" + json.dumps(f"{name}={value}"))
    for key, value in service.get("serviceConfig", {}).items():
        values = value if isinstance(value, list) else [value]
        body.extend(f"{key}={_unit_value(v)}" for v in values)
    if service.get("wantedBy"):
        # NixOS links wantedBy itself; an [Install] section says the same to systemd-analyze.
        body += ["", "[Install]", f"WantedBy={' '.join(service['wantedBy'])}"]
    return "\n".join(body) + "\n"


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections → (key, value) lines in order; comments and blank lines dropped."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        key, _, value = line.partition("=")
        sections.setdefault(current, []).append((key.strip(), value.strip()))
    return sections


def directives(lines: Sequence[tuple[str, str]]) -> dict[str, tuple[str, ...]]:
    """Key → the tokens it ends up with (repeated lines add, an empty value resets), so that
    `A=x y` and `A=x` + `A=y` (NixOS renders lists that way) compare equal."""
    result: dict[str, list[str]] = {}
    for key, value in lines:
        if value == "":
            result[key] = []
            continue
        result.setdefault(key, []).extend(value.split())
    return {key: tuple(sorted(tokens)) for key, tokens in result.items()}


def exposure(unit_file: Path) -> tuple[float, str]:
    """`systemd-analyze security --offline=true` on a unit file: (exposure, full output)."""
    assert SYSTEMD_ANALYZE is not None
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(unit_file)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout)
    if match is None:
        raise AssertionError(f"no exposure figure in:\n{proc.stdout}\n{proc.stderr}")
    return float(match.group(1)), proc.stdout


def verify(unit_file: Path, unit_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` on a unit file (drop-ins found through unit_path)."""
    assert SYSTEMD_ANALYZE is not None
    env = dict(os.environ)
    if unit_path is not None:
        # A trailing ':' keeps the built-in search path (targets like multi-user.target).
        env["SYSTEMD_UNIT_PATH"] = f"{unit_path}:"
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--no-pager", str(unit_file)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )


# --- TOML, as nixpkgs' formats.toml writes an evaluated attrset --------------------------------


def _toml_scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} has no TOML form here")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON's escapes are all valid in a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_scalar(v) for v in value) + "]"
    raise ValueError(f"{value!r} has no TOML form")


def _is_table_array(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _toml_table(prefix: str, table: Mapping[str, Any], out: list[str]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and not _is_table_array(v)}
    if prefix and scalars:
        out.append(f"[{prefix}]")
    out.extend(f"{key} = {_toml_scalar(value)}" for key, value in scalars.items())
    if scalars:
        out.append("")
    for key, value in table.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            _toml_table(name, value, out)
        elif _is_table_array(value):
            for item in value:
                out.append(f"[[{name}]]")
                out.extend(f"{k} = {_toml_scalar(v)}" for k, v in item.items())
                out.append("")


def to_toml(data: Mapping[str, Any]) -> str:
    out: list[str] = []
    _toml_table("", data, out)
    return "\n".join(out)


# --- the module's build steps, run as Nix would run them -----------------------------------------

GENERATED_TOML = "/nix/store/00000000000000000000000000000000-hydra-watchdog.toml"


def run_build_check(result: Mapping[str, Any], workdir: Path) -> subprocess.CompletedProcess[str]:
    """Run the build step that checks the generated config (nix/module.nix, checkConfig) the way
    a Nix builder would: bash -e, a bare environment, the inputs' bin/ on PATH, $out in a scratch
    folder, and the TOML that formats.toml would write from the evaluated settings in place of
    its store path. The script is the module's own text."""
    source = result["configSource"]
    assert isinstance(source, dict) and "script" in source, source
    toml = workdir / "hydra-watchdog.toml"
    toml.write_text(to_toml(result["settings"]), encoding="utf-8")
    script = source["script"].replace(GENERATED_TOML, str(toml))
    assert str(toml) in script, script
    path = ":".join(
        [*(f"{p}/bin" for p in source["nativeBuildInputs"]), "/usr/bin", "/bin"],
    )
    env = {"PATH": path, "HOME": "/homeless-shelter", "out": str(workdir / "out")}
    return subprocess.run(
        ["bash", "-e", "-c", script],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
