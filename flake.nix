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
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f system nixpkgs.legacyPackages.${system});
    in
    {
      # pkgs.hydra-watchdog, for those who want it in their package set.
      overlays.default = import ./nix/overlay.nix;

      packages = forAllSystems (
        system: pkgs: {
          hydra-watchdog = pkgs.callPackage ./nix/package.nix { };
          default = self.packages.${system}.hydra-watchdog;
        }
      );

      # The module alone: it builds its package from nix/package.nix with the system's nixpkgs
      # (or takes pkgs.hydra-watchdog where the overlay is applied). It sets no nixpkgs.overlays,
      # which a system with a read-only package set (runNixOSTest's) refuses.
      nixosModules.hydra-watchdog = {
        imports = [ ./nix/module.nix ];
      };
      nixosModules.default = self.nixosModules.hydra-watchdog;

      # A NixOS VM test (needs KVM): nix build .#checks.x86_64-linux.nixos-test
      checks = forAllSystems (
        system: pkgs: {
          nixos-test = pkgs.testers.runNixOSTest ./nix/tests/hydra-watchdog.nix;
        }
      );
    };
}
