# `import nixpkgs { system; overlays; }`, as a flake may call its nixpkgs input: the stand-in's
# package set (nixpkgs.nix) with the overlays applied.
{
  system ? builtins.currentSystem,
  overlays ? [ ],
  config ? { },
}:
let
  lib = import ./lib.nix;
  base = import ./nixpkgs.nix { inherit lib system; };
  final = builtins.foldl' (prev: overlay: prev // overlay final prev) base overlays;
in
assert config == { } || builtins.isAttrs config;
final
