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
  failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
  declaredSettings = optionPaths "" (options.services.hydra-watchdog.settings.type.getSubOptions [ ]);
}
