# nixpkgs, as far as this project's flake needs it, for CI: scripts/flake-check.sh passes this
# folder as the flake's `nixpkgs` input (--override-input) and instantiates every output. The lib
# is the project's stand-in (lib.nix); the packages are nixpkgs.nix. Neither builds anything.
{
  description = "A stand-in for nixpkgs, to instantiate hydra-watchdog's flake without it";

  outputs =
    { self }:
    let
      lib = import ./lib.nix;
    in
    {
      inherit lib;
      legacyPackages = lib.genAttrs lib.platforms.linux (
        system: import ./nixpkgs.nix { inherit lib system; }
      );
    };
}
