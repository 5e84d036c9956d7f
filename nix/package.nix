# hydra-watchdog as a nixpkgs-style Python application (modelled on nixpkgs' nvitop).
{
  lib,
  python3Packages,
}:

let
  # One version, kept in hydra_watchdog/__init__.py (hatch reads it from there too).
  versionLine = builtins.head (
    builtins.filter (line: lib.hasPrefix "__version__" line)
      (lib.splitString "\n" (builtins.readFile ../hydra_watchdog/__init__.py))
  );
  version = builtins.head (builtins.match ''__version__ = "([^"]+)"'' versionLine);
in
python3Packages.buildPythonApplication {
  pname = "hydra-watchdog";
  inherit version;
  pyproject = true;

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../pyproject.toml
      ../README.md
      ../hydra_watchdog
      ../systemd
    ];
  };

  build-system = with python3Packages; [ hatchling ];

  dependencies = with python3Packages; [
    nvidia-ml-py
    psutil
    httpx
    httpcore
    prometheus-client
    jeepney
    structlog
    logging-journald
  ];

  postInstall = ''
    # Where systemd packages keep their journal catalogs; the NixOS module feeds it to
    # `journalctl --update-catalog`.
    install -Dm444 systemd/hydra-watchdog.catalog $out/lib/systemd/catalog/hydra-watchdog.catalog
    # The hardened unit and TabbyAPI's drop-in, for non-NixOS hosts that install from the store.
    install -Dm444 systemd/hydra-watchdog.service $out/share/hydra-watchdog/hydra-watchdog.service
    install -Dm444 systemd/tabbyapi.service.d/10-hydra-watchdog.conf \
      $out/share/hydra-watchdog/tabbyapi.service.d/10-hydra-watchdog.conf
  '';

  # The test suite boots systemd in namespaces and drives real processes as root; the build
  # sandbox has neither, so it runs in CI (make test) instead.
  doCheck = false;

  pythonImportsCheck = [
    "hydra_watchdog"
    "hydra_watchdog.config"
    "hydra_watchdog.cli"
  ];

  meta = {
    description = "On-node watchdog that turns TabbyAPI's incident runbook into safe, automatic recovery";
    license = lib.licenses.mit;
    mainProgram = "hydra-watchdog";
    platforms = lib.platforms.linux;
  };
}
