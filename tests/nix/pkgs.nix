# The few `pkgs` attributes nix/module.nix touches, standing in for nixpkgs in the tests.
# Store paths are fake strings; nothing is built. `packageRoot` is where the test's
# hydra-watchdog lives (the project's venv), so the rendered unit's ExecStart really exists.
{ lib, packageRoot }:
let
  storePath = name: "/nix/store/00000000000000000000000000000000-${name}";
in
{
  formats.toml = _: {
    # TOML values: tables merge per key, arrays append, scalars must agree (nixpkgs' format type
    # behaves the same way for these).
    type = lib.types.anything // {
      name = "TOML value";
    };
    generate = name: _value: storePath name;
  };
  runCommand = name: _env: _script: storePath name;
  coreutils = "/usr";
  hydra-watchdog = {
    type = "derivation";
    name = "hydra-watchdog";
    outPath = packageRoot;
    meta.mainProgram = "hydra-watchdog";
  };
}
