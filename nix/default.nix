# Without flakes: `nix-build nix` builds the package;
# `import ./nix { }` evaluates to the package (built with the overlay in ./overlay.nix).
{
  pkgs ? import <nixpkgs> { overlays = [ (import ./overlay.nix) ]; },
}:
pkgs.hydra-watchdog
