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
  # A derivation as the module hands it to nixpkgs: its output path, plus what it would run, so
  # a test can run the build step itself (tests/nix/units.py: run_build_check).
  runCommand = name: env: script: {
    type = "derivation";
    inherit name env script;
    outPath = storePath name;
  };
  coreutils = "/usr";
  hydra-watchdog = {
    type = "derivation";
    name = "hydra-watchdog";
    outPath = packageRoot;
    meta.mainProgram = "hydra-watchdog";
  };
}
