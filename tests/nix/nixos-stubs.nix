# Declarations of the NixOS options nix/module.nix sets (in NixOS other modules declare them),
# with NixOS's types and defaults, so a disabled module leaves them at their defaults.
{ lib, ... }:
let
  inherit (lib) mkOption types;
in
{
  options = {
    assertions = mkOption {
      type = types.listOf types.anything;
      default = [ ];
    };
    warnings = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };
    environment.systemPackages = mkOption {
      type = types.listOf types.package;
      default = [ ];
    };
    environment.etc = mkOption {
      type = types.attrsOf types.anything;
      default = { };
    };
    networking.firewall.allowedTCPPorts = mkOption {
      type = types.listOf types.port;
      default = [ ];
    };
    systemd.package = mkOption {
      type = types.package;
    };
    systemd.services = mkOption {
      type = types.attrsOf types.anything;
      default = { };
    };
    services.grafana.provision.enable = mkOption {
      type = types.bool;
      default = false;
    };
    services.grafana.provision.dashboards.settings.providers = mkOption {
      type = types.listOf types.anything;
      default = [ ];
    };
  };
}
