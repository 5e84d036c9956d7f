# Adds pkgs.hydra-watchdog: `nixpkgs.overlays = [ (import ./nix/overlay.nix) ];`
final: prev: {
  hydra-watchdog = final.callPackage ./package.nix { };
}
