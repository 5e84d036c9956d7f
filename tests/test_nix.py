"""The NixOS module, package and VM test: every .nix parses, and the module, evaluated through the
lib stand-in in tests/nix/, renders a unit that systemd accepts and a config the daemon accepts."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from hydra_watchdog.config import ConfigError, load_config, schema
from tests.nix.units import (
    GENERATED_TOML,
    NIX_INSTANTIATE,
    PACKAGE_ROOT,
    REPO,
    SYSTEMD_ANALYZE,
    NixError,
    evaluate,
    parse_unit,
    render_unit,
    run_build_check,
    to_toml,
    verify,
)

pytestmark = pytest.mark.skipif(
    NIX_INSTANTIATE is None, reason="nix-instantiate missing (apt package nix-bin)"
)
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze missing (apt package systemd)"
)

NIX_FILES = sorted(
    [*REPO.glob("nix/**/*.nix"), *REPO.glob("tests/nix/*.nix"), *REPO.glob("flake.nix")]
)


@pytest.fixture(scope="module")
def typical() -> dict[str, Any]:
    return evaluate()


def write_toml(tmp_path: Path, settings: dict[str, Any]) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(to_toml(settings), encoding="utf-8")
    # The writer must round-trip exactly, or the test would check a different config.
    assert tomllib.loads(path.read_text(encoding="utf-8")) == settings
    return path


def test_the_nix_files_we_expect_exist() -> None:
    names = {p.relative_to(REPO).as_posix() for p in NIX_FILES}
    for wanted in (
        "flake.nix",
        "nix/package.nix",
        "nix/module.nix",
        "nix/default.nix",
        "nix/overlay.nix",
        "nix/tests/hydra-watchdog.nix",
    ):
        assert wanted in names


@pytest.mark.parametrize("path", NIX_FILES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_nix_file_parses(path: Path) -> None:
    assert NIX_INSTANTIATE is not None
    proc = subprocess.run(
        [NIX_INSTANTIATE, "--parse", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_typical_configuration_evaluates_without_failed_assertions(
    typical: dict[str, Any],
) -> None:
    assert typical["failedAssertions"] == []
    unit = typical["services"]["hydra-watchdog"]
    service = unit["serviceConfig"]
    assert service["Type"] == "notify"
    assert service["ExecStart"] == (
        f"{PACKAGE_ROOT}/bin/hydra-watchdog run --config /etc/hydra-watchdog/config.toml"
    )
    assert service["RestartPreventExitStatus"] == 78
    assert service["StateDirectory"] == "hydra-watchdog"
    assert service["RuntimeDirectory"] == "hydra-watchdog"
    assert service["RuntimeDirectoryMode"] == "0755"
    # The key goes in as a credential, by path: never into the settings (and so the store).
    assert service["LoadCredential"] == ["admin_key:/etc/tabbyapi/admin_key"]
    assert "/etc/tabbyapi/admin_key" not in repr(typical["settings"])
    assert unit["environment"] == {"LD_LIBRARY_PATH": "/run/opengl-driver/lib"}
    # The config as checked at build time (checkConfig), never the unchecked file.
    assert unit["restartTriggers"] == [
        "/nix/store/00000000000000000000000000000000-hydra-watchdog-checked.toml"
    ]
    assert typical["configSource"]["path"] == unit["restartTriggers"][0]
    assert typical["etc"] == ["hydra-watchdog/config.toml"]
    assert typical["firewallTCPPorts"] == []
    catalog = typical["services"]["hydra-watchdog-catalog"]
    assert catalog["serviceConfig"]["ExecStart"] == "/usr/bin/journalctl --update-catalog"
    assert "SYSTEMD_CATALOG_SOURCES" in catalog["environment"]


@needs_systemd_analyze
@pytest.mark.parametrize("name", ["hydra-watchdog", "hydra-watchdog-catalog"])
def test_rendered_units_pass_systemd_analyze_verify(
    typical: dict[str, Any], tmp_path: Path, name: str
) -> None:
    unit_file = tmp_path / f"{name}.service"
    unit_file.write_text(render_unit(typical["services"][name]), encoding="utf-8")
    proc = verify(unit_file)
    assert proc.returncode == 0, proc.stderr
    # verify reports unknown keys and bad values as warnings with exit status 0.
    assert proc.stderr == "", proc.stderr


def test_generated_toml_is_accepted_by_the_config_loader(
    typical: dict[str, Any], tmp_path: Path
) -> None:
    cfg = load_config(write_toml(tmp_path, typical["settings"]))
    assert [(d.index, d.power_limit_watts) for d in cfg.gpu.device] == [(0, 450.0), (1, 300.0)]
    assert cfg.model.name == "Midnight-Miqu-70B-v1.5-exl2-2.5bpw"
    assert cfg.model.fallback == "Mistral-7B-Instruct-v0.3-exl2-4.0bpw"
    assert cfg.restart_loop.window == 600.0
    assert cfg.watchdog.state_dir == "/var/lib/hydra-watchdog"
    assert cfg.tabbyapi.admin_key_file == ""  # the daemon falls back to the credential


def test_generated_toml_passes_check_config(typical: dict[str, Any], tmp_path: Path) -> None:
    exe = PACKAGE_ROOT / "bin" / "hydra-watchdog"
    path = write_toml(tmp_path, typical["settings"])
    proc = subprocess.run(
        [str(exe), "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode == 3 and "under construction" in proc.stderr:
        pytest.skip("the CLI has no check-config yet (the loader is tested above)")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_loader_rejects_a_key_the_module_would_pass_through(
    typical: dict[str, Any], tmp_path: Path
) -> None:
    # Freeform settings reach the daemon unchecked by Nix; the daemon must catch typos.
    settings = {**typical["settings"], "model": {**typical["settings"]["model"], "nmae": "x"}}
    with pytest.raises(ConfigError, match=r"model\.nmae: unknown key; did you mean 'name'"):
        load_config(write_toml(tmp_path, settings))


def test_declared_options_are_schema_keys_with_the_schema_defaults() -> None:
    declared = evaluate()["declaredSettings"]
    assert declared, "the module declares no settings options"
    minimal = evaluate("{ services.hydra-watchdog.settings = { }; }")["settings"]
    keys = schema()
    for path in declared:
        section, _, key = path.partition(".")
        assert section in keys and key in keys[section], f"{path} is not in config.schema()"
        assert minimal[section][key] == keys[section][key].default, path


def test_every_key_the_module_writes_is_known_to_the_daemon(typical: dict[str, Any]) -> None:
    keys = schema()
    for section, table in typical["settings"].items():
        assert section in keys
        for key in table:
            assert key in keys[section], f"{section}.{key}"


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (
            "{ services.hydra-watchdog.openFirewall = true; }",
            "openFirewall opens the metrics port",
        ),
        (
            '{ services.hydra-watchdog.settings.metrics.listen = ""; '
            "services.hydra-watchdog.openFirewall = true; }",
            "openFirewall opens the metrics port",
        ),
        (
            '{ services.hydra-watchdog.settings.tabbyapi.admin_key_file = "/etc/key"; }',
            "not both",
        ),
        (
            "{ lib, ... }: "
            '{ services.hydra-watchdog.adminKeyFile = lib.mkForce "/nix/store/abc-key"; }',
            "outside the Nix store",
        ),
        (
            '{ lib, ... }: { services.hydra-watchdog.adminKeyFile = lib.mkForce "admin_key"; }',
            "absolute path",
        ),
        (
            '{ services.hydra-watchdog.settings.watchdog.state_dir = "/srv/watchdog"; }',
            "must lie under /var/lib/",
        ),
        (
            '{ services.hydra-watchdog.settings.watchdog.runtime_dir = "/var/run-hw"; }',
            "must lie under /run/",
        ),
        (
            "{ services.prometheus.exporters.nvidia-gpu.enable = true; }",
            "services.prometheus.exporters.nvidia-gpu",
        ),
        (
            '{ services.hydra-watchdog.settings.watchdog.state_dir = "/var/lib/../../etc/hw"; }',
            'without ".", ".." or empty parts',
        ),
        (
            '{ services.hydra-watchdog.settings.watchdog.state_dir = "/var/lib/"; }',
            "state_dir must lie under /var/lib/",
        ),
        (
            '{ services.hydra-watchdog.settings.watchdog.runtime_dir = "/run/hw/../../etc"; }',
            "runtime_dir must lie under /run/",
        ),
        (
            '{ services.hydra-watchdog.settings.watchdog.runtime_dir = "/run//hw"; }',
            "runtime_dir must lie under /run/",
        ),
        (
            "{ services.hydra-watchdog.openFirewall = true; "
            'services.hydra-watchdog.settings.metrics.listen = "0.0.0.0:http"; }',
            "not host:port with a numeric port",  # an assertion, not toInt's error
        ),
    ],
)
def test_contradictory_settings_fail_an_assertion(module: str, message: str) -> None:
    failed = evaluate(module)["failedAssertions"]
    assert len(failed) == 1, failed
    assert message in failed[0]


def test_open_firewall_on_a_lan_listener_opens_the_port_and_unpins_loopback() -> None:
    result = evaluate(
        "{ services.hydra-watchdog.openFirewall = true; "
        'services.hydra-watchdog.settings.metrics.listen = "0.0.0.0:9100"; }'
    )
    assert result["failedAssertions"] == []
    assert result["firewallTCPPorts"] == [9100]
    service = result["services"]["hydra-watchdog"]["serviceConfig"]
    assert "IPAddressDeny" not in service  # Prometheus on another host must reach it


def test_a_remote_fallback_route_unpins_loopback(typical: dict[str, Any]) -> None:
    assert typical["services"]["hydra-watchdog"]["serviceConfig"]["IPAddressDeny"] == "any"
    result = evaluate(
        '{ services.hydra-watchdog.settings.fallback_route.url = "http://litellm.lan:4000"; }'
    )
    assert "IPAddressDeny" not in result["services"]["hydra-watchdog"]["serviceConfig"]


def test_an_explicit_nvml_library_drops_the_library_path() -> None:
    result = evaluate(
        "{ services.hydra-watchdog.settings.gpu.nvml_library = "
        '"/run/opengl-driver/lib/libnvidia-ml.so.1"; }'
    )
    assert "LD_LIBRARY_PATH" not in result["services"]["hydra-watchdog"].get("environment", {})


def test_tune_tabbyapi_unit_applies_the_drop_in_as_defaults() -> None:
    result = evaluate(
        "{ services.hydra-watchdog.tuneTabbyapiUnit = true; "
        'systemd.services.tabbyapi.serviceConfig.RestartSec = "30s"; }'
    )
    tabby = result["services"]["tabbyapi"]
    drop_in = dict(
        parse_unit((REPO / "systemd/tabbyapi.service.d/10-hydra-watchdog.conf").read_text("utf-8"))[
            "Service"
        ]
    )
    expected = {**drop_in, "RestartSec": "30s"}  # the user's own setting wins over the default
    assert tabby["serviceConfig"] == expected
    assert tabby["startLimitIntervalSec"] == 0


def test_without_tune_tabbyapi_unit_the_module_leaves_tabbyapi_alone(
    typical: dict[str, Any],
) -> None:
    assert "tabbyapi" not in typical["services"]


def test_disabled_module_defines_nothing() -> None:
    result = evaluate("{ lib, ... }: { services.hydra-watchdog.enable = lib.mkForce false; }")
    assert result["services"] == {}
    assert result["etc"] == []


def test_the_grafana_dashboard_is_off_by_default(typical: dict[str, Any]) -> None:
    assert typical["grafana"] == {"provision": False, "providers": []}
    both = "{ lib, ... }: { services.hydra-watchdog = { enable = lib.mkForce false; "
    off = evaluate(both + "grafanaDashboard = true; }; }")  # and with the module off
    assert off["grafana"]["providers"] == []


def test_the_grafana_dashboard_is_provisioned_from_the_committed_json(tmp_path: Path) -> None:
    result = evaluate("{ services.hydra-watchdog.grafanaDashboard = true; }")
    assert result["grafana"]["provision"] is True
    [provider] = result["grafana"]["providers"]
    assert provider["name"] == "hydra-watchdog"
    folder = provider["folder"]
    # The build step copies one file from the store, where Nix put the repository's JSON: run
    # it with that file in the store path's place, as a builder would see it.
    [stored] = re.findall(r"/nix/store/[a-z0-9]{32}-hydra-watchdog\.json", folder["script"])
    committed = REPO / "dashboards" / "hydra-watchdog.json"
    script = folder["script"].replace(stored, str(committed))
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", "-e", "-c", script],
        env={"PATH": "/usr/bin:/bin", "out": str(out)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in out.iterdir()] == ["hydra-watchdog.json"]  # the provider loads all
    assert (out / "hydra-watchdog.json").read_bytes() == committed.read_bytes()


def test_the_stand_in_rejects_a_wrongly_typed_definition() -> None:
    with pytest.raises(NixError, match="is not of type boolean"):
        evaluate('{ services.hydra-watchdog.openFirewall = "yes"; }')


def test_the_stand_in_rejects_conflicting_definitions() -> None:
    with pytest.raises(NixError, match="conflicting definitions"):
        evaluate('{ services.hydra-watchdog.settings.tabbyapi.unit = "other.service"; }')


def test_the_module_watches_the_nixos_system_link_by_default() -> None:
    minimal = evaluate("{ services.hydra-watchdog.settings = { }; }")["settings"]
    assert minimal["nixos"]["current_system"] == "/run/current-system"
    off = evaluate('{ services.hydra-watchdog.settings.nixos.current_system = ""; }')["settings"]
    assert off["nixos"]["current_system"] == ""


# --- issue 24 item 4: settings checked at build time, and what evaluation must refuse ---------


def test_the_build_checks_the_generated_config_with_the_package_itself(
    typical: dict[str, Any], tmp_path: Path
) -> None:
    source = typical["configSource"]
    assert source["nativeBuildInputs"] == [str(PACKAGE_ROOT)]
    assert "hydra-watchdog check-config --config" in source["script"]
    proc = run_build_check(typical, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "out").resolve() == (tmp_path / "hydra-watchdog.toml")


@pytest.mark.parametrize(
    ("module", "needle"),
    [
        # a mistyped key, in a section the module declares options in
        ('{ services.hydra-watchdog.settings.watchdog.intervall = "5s"; }', "did you mean"),
        # a wrong type on a key the module does not declare
        ('{ services.hydra-watchdog.settings.tabbyapi.slow_probes = "three"; }', "slow_probes"),
        # a malformed metrics.listen (the module declares it as a plain string)
        ('{ services.hydra-watchdog.settings.metrics.listen = "localhost"; }', "host:port"),
        ('{ services.hydra-watchdog.settings.metrics.listen = "0.0.0.0:http"; }', "host:port"),
    ],
)
def test_the_build_refuses_what_the_daemon_would_refuse(
    module: str, needle: str, tmp_path: Path
) -> None:
    result = evaluate(module)
    assert result["failedAssertions"] == []  # evaluation alone lets these through
    proc = run_build_check(result, tmp_path)
    assert proc.returncode == 78, proc.stdout + proc.stderr
    assert needle in proc.stderr
    assert not (tmp_path / "out").exists()


def test_the_build_checks_the_file_not_the_build_machine(tmp_path: Path) -> None:
    """A user that exists on the node, not in the build sandbox: the file is fine (the unit's
    own start checks the machine it runs on)."""
    result = evaluate('{ services.hydra-watchdog.settings.tabbyapi.user = "hw-no-such-user"; }')
    proc = run_build_check(result, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_check_config_off_installs_the_generated_file_unchecked() -> None:
    result = evaluate("{ services.hydra-watchdog.checkConfig = false; }")
    assert result["configSource"] == GENERATED_TOML
    assert result["services"]["hydra-watchdog"]["restartTriggers"] == [GENERATED_TOML]


def test_a_nested_state_dir_below_var_lib_is_fine() -> None:
    result = evaluate(
        '{ services.hydra-watchdog.settings.watchdog.state_dir = "/var/lib/hw/main"; }'
    )
    assert result["failedAssertions"] == []
    assert result["services"]["hydra-watchdog"]["serviceConfig"]["StateDirectory"] == "hw/main"


def test_tuning_a_unit_no_module_defines_warns() -> None:
    result = evaluate("{ services.hydra-watchdog.tuneTabbyapiUnit = true; }")
    assert len(result["warnings"]) == 1, result["warnings"]
    assert "no NixOS module" in result["warnings"][0]
    assert "tabbyapi.service" in result["warnings"][0]


@pytest.mark.parametrize(
    "definition",
    [
        'systemd.services.tabbyapi.serviceConfig.ExecStart = "/opt/tabbyapi/start.sh";',
        'systemd.services.tabbyapi.script = "exec /opt/tabbyapi/start.sh";',
    ],
)
def test_tuning_a_unit_with_a_command_does_not_warn(definition: str) -> None:
    result = evaluate(f"{{ services.hydra-watchdog.tuneTabbyapiUnit = true; {definition} }}")
    assert result["warnings"] == []


def test_the_package_option_is_a_package_option(typical: dict[str, Any]) -> None:
    declared = evaluate()["packageOption"]
    assert declared["defaultText"] == "pkgs.hydra-watchdog"
    assert "nix/package.nix" in declared["description"]
    service = typical["services"]["hydra-watchdog"]["serviceConfig"]
    assert service["ExecStart"].startswith(f"{PACKAGE_ROOT}/bin/hydra-watchdog ")


def test_package_nix_lists_every_dependency_of_pyproject() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    wanted = {
        re.split(r"[<>=!~ \[]", dep, maxsplit=1)[0].lower().replace("_", "-")
        for dep in pyproject["project"]["dependencies"]
    }
    text = (REPO / "nix" / "package.nix").read_text(encoding="utf-8")
    block = text.split("dependencies = with python3Packages; [", 1)[1].split("];", 1)[0]
    listed = {line.strip() for line in block.splitlines() if line.strip()}
    assert listed == wanted


# --- issue 24 item 3: the flake's outputs instantiate (scripts/flake-check.sh, also in .ci/run) --

FLAKE_CHECK = REPO / "scripts" / "flake-check.sh"


def flake_check(source: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FLAKE_CHECK), *([str(source)] if source else [])],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_every_flake_output_instantiates_against_the_nixpkgs_stand_in() -> None:
    proc = flake_check()
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stderr
    for output in ("packages", "nixosModules", "overlays", "checks"):
        assert f"checking flake output '{output}'" in log, log[-4000:]
    # two systems each: the package, and the VM test with its node evaluated
    assert log.count("instantiated 'hydra-watchdog-0.1.0'") >= 2, log[-4000:]
    assert log.count("instantiated 'vm-test-run-hydra-watchdog'") == 2, log[-4000:]


def _checkout_copy(dest: Path) -> Path:
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in listed:
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(source.read_bytes())
    return dest


# The three ways the flake's checks failed before issue 24, each put back into a copy.
_BROKEN = {
    "the test called with an argument it does not take": (
        "flake.nix",
        "pkgs.testers.runNixOSTest ./nix/tests/hydra-watchdog.nix;",
        "pkgs.testers.runNixOSTest (import ./nix/tests/hydra-watchdog.nix {\n"
        "            nixosModule = self.nixosModules.hydra-watchdog;\n          });",
        # (the old test took `{ module ? ... }` and named the unexpected argument instead)
        "called without required argument 'lib'",
    ),
    "a node module that sets nixpkgs.overlays": (
        "nix/tests/hydra-watchdog.nix",
        "imports = [ ../module.nix ];",
        "imports = [ ../module.nix ];\n      nixpkgs.overlays = [ (import ../overlay.nix) ];",
        "nixpkgs.overlays is set to read-only",
    ),
    "the application handed to python3.withPackages": (
        "nix/tests/hydra-watchdog.nix",
        "(ps.toPythonModule config.services.hydra-watchdog.package)",
        "config.services.hydra-watchdog.package",
        "is no Python module",
    ),
}


@pytest.mark.parametrize("case", sorted(_BROKEN))
def test_the_flake_check_catches_what_broke_the_checks_before(case: str, tmp_path: Path) -> None:
    name, good, bad, error = _BROKEN[case]
    copy = _checkout_copy(tmp_path / "src")
    text = (copy / name).read_text(encoding="utf-8")
    assert text.count(good) == 1, f"{name} no longer holds {good!r}"
    (copy / name).write_text(text.replace(good, bad), encoding="utf-8")
    proc = flake_check(copy)
    assert proc.returncode != 0, proc.stderr[-4000:]
    assert error in proc.stderr, proc.stderr[-4000:]
