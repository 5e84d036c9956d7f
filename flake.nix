{
  description = "hydra-watchdog: TabbyAPI's incident runbook as an on-node watchdog";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems =
        f: nixpkgs.lib.genAttrs systems (system: f (import nixpkgs {
          inherit system;
          overlays = [ self.overlays.default ];
        }));
    in
    {
      overlays.default = import ./nix/overlay.nix;

      packages = forAllSystems (pkgs: {
        hydra-watchdog = pkgs.hydra-watchdog;
        default = pkgs.hydra-watchdog;
      });

      nixosModules.hydra-watchdog = {
        imports = [ ./nix/module.nix ];
        nixpkgs.overlays = [ self.overlays.default ];
      };
      nixosModules.default = self.nixosModules.hydra-watchdog;

      checks = forAllSystems (pkgs: {
        nixos-test = pkgs.testers.runNixOSTest (import ./nix/tests/hydra-watchdog.nix {
          nixosModule = self.nixosModules.hydra-watchdog;
        });
      });
    };
}
