# Evaluates nix/module.nix with the lib stand-in and the given configuration modules; returns
# plain data for the Python tests (nix-instantiate --eval --strict --json).
{
  configuration,
  packageRoot,
}:
let
  lib = import ./lib.nix;
  pkgs = import ./pkgs.nix { inherit lib packageRoot; };
  evaluated = lib.evalModules {
    modules = [ ./nixos-stubs.nix ../../nix/module.nix ] ++ configuration;
    specialArgs = { inherit pkgs; };
  };
  inherit (evaluated) config options;

  # Dotted paths of every option declared under a tree of declarations.
  optionPaths =
    prefix: decls:
    lib.concatMap (
      name:
      let
        d = decls.${name};
        path = if prefix == "" then name else "${prefix}.${name}";
      in
      if (d._type or null) == "option" then [ path ] else optionPaths path d
    ) (builtins.attrNames decls);
in
{
  settings = config.services.hydra-watchdog.settings;
  services = config.systemd.services;
  etc = builtins.attrNames config.environment.etc;
  firewallTCPPorts = config.networking.firewall.allowedTCPPorts;
  grafana = {
    provision = config.services.grafana.provision.enable;
    # A provider's folder as its build step (the stand-in's runCommand), not just its path.
    providers = map (p: {
      inherit (p) name;
      folder = {
        inherit (p.options.path) name script;
        path = p.options.path.outPath;
      };
    }) config.services.grafana.provision.dashboards.settings.providers;
  };
  failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
  inherit (config) warnings;
  # What /etc/hydra-watchdog/config.toml comes from: the checked file's build step, or the
  # generated file itself (checkConfig = false).
  configSource =
    let
      source = config.environment.etc."hydra-watchdog/config.toml".source or null;
    in
    if source ? script then
      {
        inherit (source) name script;
        path = source.outPath;
        nativeBuildInputs = map toString source.env.nativeBuildInputs;
      }
    else
      source;
  packageOption = {
    defaultText = options.services.hydra-watchdog.package.defaultText.text;
    inherit (options.services.hydra-watchdog.package) description;
  };
  declaredSettings = optionPaths "" (options.services.hydra-watchdog.settings.type.getSubOptions [ ]);
}
