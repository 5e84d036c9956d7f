# The package set of the nixpkgs stand-in (flake.nix beside it): what ../../flake.nix,
# nix/package.nix, nix/module.nix and nix/tests/hydra-watchdog.nix take from nixpkgs, with
# nixpkgs' semantics where the project has been caught out before:
# - python3Packages.buildPythonApplication makes an application, which is no Python module;
#   python3.withPackages REFUSES one here (nixpkgs leaves it out without a word, and the program
#   then dies with ModuleNotFoundError); toPythonModule makes one a module;
# - testers.runNixOSTest takes a test module (a path, a function or an attrset), calls it with the
#   arguments it asks for, and evaluates each node with lib.evalModules (lib.nix), the package
#   set read-only as under runNixOSTest (a node that sets nixpkgs.overlays is an error), failed
#   assertions an error and warnings traced, as when NixOS builds a system.
# Every derivation is a real one (instantiated into the store, sources copied) whose builder
# refuses to run: `nix flake check --no-build` instantiates them, nothing builds them.
{ lib, system }:
let
  inherit (builtins)
    filter
    functionArgs
    intersectAttrs
    isFunction
    isPath
    isString
    mapAttrs
    toJSON
    ;

  derivationOf =
    name: attrs:
    derivation (
      {
        inherit name system;
        builder = "/bin/sh";
        args = [
          "-c"
          "echo 'the nixpkgs stand-in (tests/nix) builds nothing' >&2; exit 1"
        ];
      }
      // attrs
    );

  python3 =
    derivationOf "python3-3.12.0" { }
    // {
      pythonVersion = "3.12";
      sitePackages = "lib/python3.12/site-packages";
      interpreter = "${python3}/bin/python3.12";
      pkgs = python3Packages;
      withPackages =
        select:
        let
          chosen = select python3Packages;
          applications = filter (p: !(python3Packages.hasPythonModule p)) chosen;
          environment = derivationOf "python3-3.12.0-env" {
            modules = map toString (
              lib.unique (chosen ++ lib.concatMap (p: p.requiredPythonModules or [ ]) chosen)
            );
          };
        in
        if applications != [ ] then
          throw (
            "python3.withPackages: ${
              lib.concatStringsSep ", " (map (p: p.name) applications)
            } is no Python module (an application?); nixpkgs would leave it out of the environment."
            + " Pass python3Packages.toPythonModule of it."
          )
        else
          environment
          // {
            interpreter = "${environment}/bin/python3.12";
          };
    };

  python3Packages = {
    python = python3;
    hasPythonModule = p: p ? pythonModule && p.pythonModule == python3;
    toPythonModule =
      p:
      p
      // {
        pythonModule = python3;
        requiredPythonModules = p.propagatedBuildInputs or [ ];
      };
    buildPythonApplication =
      {
        pname,
        version,
        src,
        dependencies ? [ ],
        build-system ? [ ],
        meta ? { },
        ...
      }@attrs:
      derivationOf "${pname}-${version}" {
        inherit src;
        dependencies = map toString dependencies;
        build_system = map toString build-system;
        postInstall = attrs.postInstall or "";
      }
      // {
        inherit pname version meta;
        propagatedBuildInputs = dependencies;
      };
  }
  # The Python packages of nixpkgs that nix/package.nix names (a new dependency goes here too;
  # structlog and logging-journald are issue 25's).
  // lib.genAttrs [
    "hatchling"
    "httpcore"
    "httpx"
    "jeepney"
    "logging-journald"
    "nvidia-ml-py"
    "prometheus-client"
    "psutil"
    "structlog"
  ] (name: derivationOf "python3.12-${name}" { } // { pythonModule = python3; });

  # A NixOS node under runNixOSTest: the options the project's modules touch (nixos-stubs.nix),
  # nixpkgs.overlays read-only, then the node's own modules.
  evalNode =
    node:
    let
      readOnlyNixpkgs = {
        options.nixpkgs.overlays = lib.mkOption {
          type = lib.types.unique { message = "nixpkgs.overlays is set to read-only"; } lib.types.anything;
        };
        config.nixpkgs.overlays = [ ];
        config.systemd.package = lib.mkDefault pkgs.systemd;
      };
      inherit
        (lib.evalModules {
          modules = [
            ./nixos-stubs.nix
            readOnlyNixpkgs
            node
          ];
          specialArgs = { inherit pkgs; };
        })
        config
        ;
      failed = filter (a: !a.assertion) config.assertions;
      warned = lib.concatMap (w: [ (builtins.trace "warning: ${w}" w) ]) config.warnings;
    in
    if failed != [ ] then
      throw "Failed assertions:\n${lib.concatStringsSep "" (map (a: "- ${a.message}\n") failed)}"
    else
      builtins.seq config.nixpkgs.overlays (
        builtins.seq warned {
          services = config.systemd.services;
          etc = config.environment.etc;
        }
      );

  runNixOSTest =
    testModule:
    let
      loaded = if isPath testModule || isString testModule then import testModule else testModule;
      offered = {
        inherit lib pkgs;
        hostPkgs = pkgs;
      };
      test = if isFunction loaded then loaded (intersectAttrs (functionArgs loaded) offered) else loaded;
      nodes = mapAttrs (_: evalNode) test.nodes;
    in
    derivationOf "vm-test-run-${test.name}" {
      inherit (test) testScript;
      nodes = toJSON nodes;
    };

  pkgs = {
    inherit lib system python3 python3Packages;
    callPackage =
      fn: overrides:
      let
        f = if isFunction fn then fn else import fn;
      in
      f (intersectAttrs (functionArgs f) pkgs // overrides);
    formats.toml = _: {
      type = lib.types.anything // {
        name = "TOML value";
      };
      generate = name: value: derivationOf name { value = toJSON value; };
    };
    runCommand =
      name: env: script:
      derivationOf name (env // { inherit script; });
    coreutils = derivationOf "coreutils" { };
    systemd = derivationOf "systemd" { };
    testers = { inherit runNixOSTest; };
  };
in
pkgs
