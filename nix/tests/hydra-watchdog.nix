# A NixOS VM test, written as nixpkgs writes its own (nixos/tests/ollama.nix): a test module for
# pkgs.testers.runNixOSTest. It cannot run in this project's CI (no KVM, no nixpkgs; CI only
# instantiates it, scripts/flake-check.sh); run it where you can:
#   nix build .#checks.x86_64-linux.nixos-test                                   (flake)
#   nix-build -E 'with import <nixpkgs> { }; testers.runNixOSTest ./nix/tests/hydra-watchdog.nix'
#
# TabbyAPI is stood in for by the package's simulator; the VM has no GPU, so NVML reports the
# library missing and the watchdog must keep going on everything else.
{ lib, ... }:
let
  tabbyPort = 5000;
  metricsPort = 9835;
  modelName = "Midnight-Miqu-70B-v1.5-exl2-2.5bpw";
in
{
  name = "hydra-watchdog";

  nodes.machine =
    { config, pkgs, ... }:
    let
      # The simulator ships inside the package, an application; python3.withPackages takes
      # modules only (it leaves an application out), so the package goes in as one.
      python = pkgs.python3.withPackages (ps: [
        (ps.toPythonModule config.services.hydra-watchdog.package)
      ]);
    in
    {
      imports = [ ../module.nix ];

      users.users.alice = {
        isNormalUser = true;
      };

      # The admin key lives outside the store, as it would on hydra-ai.
      systemd.tmpfiles.rules = [
        "d /etc/tabbyapi 0700 root root -"
        "f+ /etc/tabbyapi/admin_key 0600 root root - test-admin-key"
        "f+ /etc/tabbyapi/api_tokens.yml 0600 root root - admin_key: test-admin-key"
        "d /var/lib/models/${modelName} 0755 root root -"
        "f+ /var/lib/models/${modelName}/config.json 0644 root root - {}"
      ];

      # A stand-in for TabbyAPI's unit: the simulator, as tabbyapi.service.
      systemd.services.tabbyapi = {
        wantedBy = [ "multi-user.target" ];
        after = [ "systemd-tmpfiles-setup.service" ];
        serviceConfig.ExecStart = lib.concatStringsSep " " [
          "${python}/bin/python -m hydra_watchdog.sim.tabby_server"
          "--port ${toString tabbyPort}"
          "--models-dir /var/lib/models"
          "--tokens /etc/tabbyapi/api_tokens.yml"
        ];
      };

      services.hydra-watchdog = {
        enable = true;
        adminKeyFile = "/etc/tabbyapi/admin_key";
        tuneTabbyapiUnit = true;
        settings = {
          watchdog.interval = "1s";
          tabbyapi.url = "http://127.0.0.1:${toString tabbyPort}";
          tabbyapi.startup_grace = "30s";
          # no install tree here: the simulator runs from the Nix store; the unit vouches for it
          tabbyapi.cmdline_patterns = [ "/opt/tabbyapi" ];
          tabbyapi.venv = "";
          model.name = modelName;
          model.models_dir = "/var/lib/models";
          model.vram_required_gib = 1;
          metrics.listen = "127.0.0.1:${toString metricsPort}";
        };
      };
    };

  testScript = ''
    machine.start()
    machine.wait_for_unit("tabbyapi.service")
    machine.wait_for_open_port(${toString tabbyPort})
    machine.wait_for_unit("hydra-watchdog.service")
    machine.wait_for_open_port(${toString metricsPort})

    with subtest("the config the module wrote is accepted by the daemon"):
        machine.succeed("hydra-watchdog check-config --config /etc/hydra-watchdog/config.toml")

    with subtest("the unit is as hardened as in CI"):
        out = machine.succeed("systemd-analyze security hydra-watchdog.service | tail -n 1")
        print(out)
        exposure = float(out.split("level for hydra-watchdog.service:")[1].split()[0])
        assert exposure <= 4.5, f"exposure {exposure} > 4.5"

    with subtest("the admin key never reached the store"):
        machine.fail("grep -rl test-admin-key /nix/store/*hydra-watchdog* 2>/dev/null")

    with subtest("status works for an unprivileged user"):
        machine.succeed("su - alice -c 'hydra-watchdog status --json'")

    with subtest("metrics are served on loopback"):
        machine.succeed("curl -sf http://127.0.0.1:${toString metricsPort}/metrics | grep -q '^hydra_watchdog_'")

    with subtest("a stopped TabbyAPI is brought back by the watchdog"):
        machine.succeed("systemctl stop tabbyapi.service")
        machine.wait_until_succeeds("systemctl is-active tabbyapi.service", timeout=120)
        machine.wait_for_open_port(${toString tabbyPort})

    with subtest("the journal catalog knows the watchdog's events"):
        machine.wait_for_unit("hydra-watchdog-catalog.service")
        machine.succeed("journalctl --list-catalog | grep -qi hydra")
  '';
}
