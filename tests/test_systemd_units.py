"""The hardened unit in systemd/, TabbyAPI's drop-in and the journal catalog: systemd accepts them,
the exposure stays at or below 4.5, and the NixOS module renders the same hardening."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hydra_watchdog.report.exporter import MAX_CONNECTIONS
from tests.nix.units import (
    NIX_INSTANTIATE,
    PACKAGE_ROOT,
    REPO,
    SYSTEMD_ANALYZE,
    directives,
    evaluate,
    exposure,
    parse_unit,
    render_unit,
    verify,
)

pytestmark = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze missing (apt package systemd)"
)

UNIT = REPO / "systemd" / "hydra-watchdog.service"
DROP_IN = REPO / "systemd" / "tabbyapi.service.d" / "10-hydra-watchdog.conf"
CATALOG = REPO / "systemd" / "hydra-watchdog.catalog"
MAX_EXPOSURE = 4.5
TABBY_POOL = 20  # httpcore.ConnectionPool(max_connections=20) in adapters/tabby.py

# [Service] keys that differ between a Debian host and NixOS by nature, not by hardening:
# NixOS sets LD_LIBRARY_PATH for NVML; the admin key's path is the user's choice.
PLATFORM_KEYS = {"Environment", "LoadCredential"}


def installed_unit(tmp_path: Path) -> Path:
    """systemd/hydra-watchdog.service with ExecStart at the venv's real executable (verify wants
    the binary to exist)."""
    installed = "ExecStart=/opt/hydra-watchdog/bin/hydra-watchdog "
    text = UNIT.read_text(encoding="utf-8")
    assert installed in text
    text = text.replace(installed, f"ExecStart={PACKAGE_ROOT / 'bin' / 'hydra-watchdog'} ")
    path = tmp_path / "hydra-watchdog.service"
    path.write_text(text, encoding="utf-8")
    return path


def service_directives(text: str) -> dict[str, tuple[str, ...]]:
    lines = parse_unit(text)["Service"]
    normalised = []
    for key, value in lines:
        if key in PLATFORM_KEYS:
            continue
        if key.startswith("Exec"):
            # /bin/kill vs ${coreutils}/bin/kill, /opt/hydra-watchdog/bin/... vs the store path.
            program, _, args = value.partition(" ")
            normalised.append((key, f"{Path(program).name} {args}"))
        else:
            normalised.append((key, value))
    return directives(normalised)


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    proc = verify(installed_unit(tmp_path))
    assert proc.returncode == 0, proc.stderr
    # Unknown keys and bad values are only warnings (exit 0): there must be none.
    assert proc.stderr == "", proc.stderr


def test_unit_has_what_the_issue_asks_for() -> None:
    service = directives(parse_unit(UNIT.read_text(encoding="utf-8"))["Service"])
    assert service["Type"] == ("notify",)
    assert service["Restart"] == ("on-failure",)
    assert service["RestartPreventExitStatus"] == ("78",)
    assert "WatchdogSec" in service
    assert service["StateDirectory"] == ("hydra-watchdog",)
    assert service["StateDirectoryMode"] == ("0700",)
    assert service["RuntimeDirectoryMode"] == ("0755",)
    assert service["LoadCredential"] == ("admin_key:/etc/hydra-watchdog/admin_key",)
    assert service["CapabilityBoundingSet"] == ("CAP_KILL", "CAP_SYS_ADMIN", "CAP_SYS_PTRACE")
    assert "/dev/nvidiactl" in service["DeviceAllow"]
    # Orphans of other users must stay visible and killable.
    assert service.get("ProtectProc", ("default",)) == ("default",)
    assert service.get("PrivateUsers", ("false",)) in (("false",), ("no",))
    assert "ProcSubset" not in service


def test_unit_bounds_the_watchdogs_own_resources_with_room_for_normal_use() -> None:
    service = directives(parse_unit(UNIT.read_text(encoding="utf-8"))["Service"])
    # Issue 10: a file limit and a memory ceiling of its own (the NixOS unit carries the same:
    # test_module_and_unit_file_carry_the_same_hardening).
    [nofile] = service["LimitNOFILE"]
    [memory] = service["MemoryMax"]
    # What the daemon may hold at once: the exporter's cap and listener, TabbyAPI's pool, and a
    # margin for NVML, journald, the state files and the children's pipes.
    assert int(nofile) >= 4 * (MAX_CONNECTIONS + 1 + TABBY_POOL + 64)
    assert memory.endswith("M") and 4 * 40 <= int(memory[:-1]) <= 1024  # RSS is ~40 MB


def test_every_opened_permission_has_a_comment() -> None:
    lines = UNIT.read_text(encoding="utf-8").splitlines()
    opened = (
        "User=",
        "CapabilityBoundingSet=",
        "PrivateDevices=",
        "DeviceAllow=",
        "ProtectProc=",
        "RestrictAddressFamilies=",
        "IPAddressDeny=",
        "UMask=",
        "LoadCredential=",
    )
    for prefix in opened:
        index = next(i for i, line in enumerate(lines) if line.startswith(prefix))
        # The directive's block (directives with no blank line between) opens with a comment.
        above = index - 1
        while above >= 0 and lines[above].strip() and not lines[above].startswith("#"):
            above -= 1
        assert above >= 0 and lines[above].startswith("#"), f"{prefix} has no comment above it"


def test_unit_exposure_is_at_most_4_5(tmp_path: Path) -> None:
    figure, report = exposure(installed_unit(tmp_path))
    print(f"\nsystemd/hydra-watchdog.service exposure: {figure}")
    assert figure <= MAX_EXPOSURE, report


@pytest.mark.skipif(NIX_INSTANTIATE is None, reason="nix-instantiate missing (apt package nix-bin)")
def test_module_unit_exposure_is_at_most_4_5(tmp_path: Path) -> None:
    path = tmp_path / "hydra-watchdog.service"
    path.write_text(render_unit(evaluate()["services"]["hydra-watchdog"]), encoding="utf-8")
    figure, report = exposure(path)
    print(f"\nNixOS module's hydra-watchdog.service exposure: {figure}")
    assert figure <= MAX_EXPOSURE, report


@pytest.mark.skipif(NIX_INSTANTIATE is None, reason="nix-instantiate missing (apt package nix-bin)")
def test_module_and_unit_file_carry_the_same_hardening() -> None:
    from_file = service_directives(UNIT.read_text(encoding="utf-8"))
    from_module = service_directives(render_unit(evaluate()["services"]["hydra-watchdog"]))
    only_file = {k: v for k, v in from_file.items() if from_module.get(k) != v}
    only_module = {k: v for k, v in from_module.items() if from_file.get(k) != v}
    assert only_file == {} and only_module == {}, (only_file, only_module)


def test_the_comparison_would_notice_a_difference() -> None:
    text = UNIT.read_text(encoding="utf-8")
    weakened = text.replace("ProtectSystem=strict", "ProtectSystem=full")
    assert service_directives(weakened) != service_directives(text)
    # ...and is not fooled by how lists are spelled.
    split = text.replace(
        "CapabilityBoundingSet=CAP_KILL CAP_SYS_ADMIN CAP_SYS_PTRACE",
        "CapabilityBoundingSet=CAP_SYS_ADMIN CAP_SYS_PTRACE\nCapabilityBoundingSet=CAP_KILL",
    )
    assert service_directives(split) == service_directives(text)


def test_tabbyapi_drop_in_passes_verify_with_a_stand_in_unit(tmp_path: Path) -> None:
    (tmp_path / "tabbyapi.service").write_text(
        f"[Service]\nExecStart={shutil.which('sleep')} infinity\n", encoding="utf-8"
    )
    (tmp_path / "tabbyapi.service.d").mkdir()
    shutil.copy(DROP_IN, tmp_path / "tabbyapi.service.d" / DROP_IN.name)
    proc = verify(tmp_path / "tabbyapi.service", unit_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    if systemd_version() >= 254:
        assert proc.stderr == "", proc.stderr
    else:
        # Debian 12's systemd 252 ignores (and names) exactly the keys that systemd 254 added;
        # everything else in the drop-in it applies.
        ignored = re.findall(r"Unknown key '(\w+)' in section \[Service\], ignoring\.", proc.stderr)
        assert sorted(ignored) == sorted(SYSTEMD_254_KEYS), proc.stderr
        assert len(proc.stderr.splitlines()) == len(SYSTEMD_254_KEYS), proc.stderr


SYSTEMD_254_KEYS = ("RestartSteps", "RestartMaxDelaySec")


def systemd_version() -> int:
    assert SYSTEMD_ANALYZE is not None
    out = subprocess.run(
        [SYSTEMD_ANALYZE, "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    match = re.match(r"systemd (\d+)", out)
    assert match is not None, out
    return int(match.group(1))


def test_drop_in_leaves_loops_to_the_watchdog_and_waits_for_a_70b_load() -> None:
    sections = parse_unit(DROP_IN.read_text(encoding="utf-8"))
    unit, service = dict(sections["Unit"]), dict(sections["Service"])
    assert unit["StartLimitIntervalSec"] == "0"
    assert service["Restart"] == "on-failure"
    # A single crash costs no more than under systemd alone (stock RestartSec=100ms); back-to-back
    # crashes slow down to a short cap (systemd >= 254), loops being the watchdog's to stop.
    assert service["RestartSec"] == "100ms"
    assert int(service["RestartSteps"]) >= 1
    assert service["RestartMaxDelaySec"] == "2s"
    assert service["OOMPolicy"] in ("stop", "kill")
    match = re.fullmatch(r"(\d+)min", service["TimeoutStartSec"])
    assert match is not None and int(match.group(1)) >= 10, service["TimeoutStartSec"]


def test_catalog_installs_the_debian_way(tmp_path: Path) -> None:
    journalctl = shutil.which("journalctl")
    if journalctl is None:
        pytest.skip("journalctl missing (apt package systemd)")
    catalog_dir = tmp_path / "usr" / "lib" / "systemd" / "catalog"
    catalog_dir.mkdir(parents=True)
    shutil.copy(CATALOG, catalog_dir / CATALOG.name)
    subprocess.run(
        [journalctl, f"--root={tmp_path}", "--update-catalog"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    listed = subprocess.run(
        [journalctl, f"--root={tmp_path}", "--list-catalog", "--no-pager"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    ids = re.findall(r"^-- ([0-9a-f]{32})", CATALOG.read_text(encoding="utf-8"), re.MULTILINE)
    assert ids, "the catalog has no entries"
    for message_id in ids:
        assert message_id in listed
