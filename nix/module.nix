# NixOS module for hydra-watchdog: TabbyAPI's incident runbook as an on-node watchdog.
#
# The systemd unit set here carries the same hardening as systemd/hydra-watchdog.service (a test
# compares the two). Everything the module sets is a plain attrset, so the project's CI can evaluate
# it through a small lib stand-in (tests/nix/lib.nix) without nixpkgs.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.hydra-watchdog;
  s = cfg.settings;
  format = pkgs.formats.toml { };
  generatedConfig = format.generate "hydra-watchdog.toml" cfg.settings;
  # The daemon's own loader checks the generated file at build time (as nixpkgs' Prometheus module
  # runs promtool): unknown or mistyped keys, wrong types and bad values fail `nixos-rebuild` with
  # the key, the value and what is accepted, instead of the unit failing with exit 78 after the
  # switch. check-config --file-only reads only the file: nothing of the build sandbox (which has
  # no TabbyAPI user) decides the verdict; the unit's own start checks the machine.
  configFile =
    if cfg.checkConfig then
      pkgs.runCommand "hydra-watchdog-checked.toml" { nativeBuildInputs = [ cfg.package ]; } ''
        hydra-watchdog check-config --config ${generatedConfig} --file-only > /dev/null
        ln -s ${generatedConfig} $out
      ''
    else
      generatedConfig;
  configPath = "/etc/hydra-watchdog/config.toml";

  # metrics.listen is "host:port" ("" turns the exporter off); the daemon splits at the last ":"
  # and wants a port of digits. A malformed value leaves metricsPort null: an assertion names it
  # where the firewall needs the port, and check-config refuses it at build time.
  listenParts = builtins.match "(.*):([0-9]+)" s.metrics.listen;
  metricsHost =
    if listenParts == null then
      lib.concatStringsSep ":" (lib.init (lib.splitString ":" s.metrics.listen))
    else
      builtins.head listenParts;
  metricsPort = if listenParts == null then null else lib.toInt (lib.last listenParts);
  metricsOn = s.metrics.listen != "";
  metricsOnLoopback = lib.hasPrefix "127." metricsHost
    || builtins.elem metricsHost [ "localhost" "::1" "[::1]" ];
  # Traffic can be pinned to loopback unless the user asked for a remote fallback check or a
  # metrics listener on the LAN.
  loopbackOnly = s.fallback_route.url == "" && (!metricsOn || metricsOnLoopback);

  tabbyapiService = lib.removeSuffix ".service" s.tabbyapi.unit;
  # Whether a NixOS module gives TabbyAPI's unit a command; the drop-in's settings alone would
  # render a unit without ExecStart= (unless a package in systemd.packages ships the unit).
  tabbyapiUnit = config.systemd.services.${tabbyapiService} or { };
  tabbyapiHasCommand =
    (tabbyapiUnit.serviceConfig or { }) ? ExecStart || (tabbyapiUnit.script or "") != "";

  # StateDirectory=/RuntimeDirectory= take the part below /var/lib/ or /run/: normalised, or
  # "/var/lib/../../etc/hw" would pass a prefix check and name /etc/hw.
  underDir =
    top: path:
    let
      parts = lib.splitString "/" (lib.removePrefix top path);
    in
    lib.hasPrefix top path
    && parts != [ "" ]
    && !(builtins.any (part: builtins.elem part [ "" "." ".." ]) parts);

  # The journal catalog database is built from one source directory: systemd's own catalogs plus
  # ours (nixpkgs' systemd reads catalogs from its store path only).
  catalogSources = pkgs.runCommand "hydra-watchdog-journal-catalog" { } ''
    mkdir -p $out
    ln -s ${config.systemd.package}/lib/systemd/catalog/*.catalog $out/
    ln -s ${cfg.package}/lib/systemd/catalog/hydra-watchdog.catalog $out/
  '';

  # The same directives, with the same reasons, as systemd/hydra-watchdog.service.
  hardening = {
    # uid 0, not a DynamicUser with a polkit rule: root restarts tabbyapi.service over PID 1's
    # private socket without D-Bus/polkitd (the parts most likely to be unwell in an incident),
    # journald takes OBJECT_SYSTEMD_UNIT= only from root, and CAP_SYS_ADMIN (power limits) is
    # root-equivalent anyway. Root is boxed in by the bounding set and the sandbox below.
    User = "root";
    Group = "root";
    # CAP_KILL: signal TabbyAPI's orphans, which may run under another user.
    # CAP_SYS_ADMIN: NVML power limits (the NVIDIA driver checks capable(CAP_SYS_ADMIN)).
    # CAP_SYS_PTRACE: read other users' /proc/PID/fd to find who holds TabbyAPI's port.
    CapabilityBoundingSet = [ "CAP_KILL" "CAP_SYS_ADMIN" "CAP_SYS_PTRACE" ];
    # Power limits: /dev/nvidiactl and /dev/nvidiaN (major "nvidia-frontend" or "nvidia").
    PrivateDevices = false;
    DevicePolicy = "closed";
    DeviceAllow = [ "/dev/nvidiactl rw" "char-nvidia-frontend rw" "char-nvidia rw" ];
    # Orphans are found in /proc: other users' processes must stay visible (no hidepid, no
    # ProcSubset=pid since the port check reads /proc/net, no PrivateUsers).
    ProtectProc = "default";
    # TabbyAPI over loopback HTTP, the metrics exporter, journald/sd_notify/systemctl over AF_UNIX;
    # AF_NETLINK: sock_diag lists the LISTEN sockets on TabbyAPI's port (cheaper than /proc/net).
    RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" "AF_NETLINK" ];
    # The status file in the runtime directory must be world-readable; state stays in a 0700 dir.
    UMask = "0022";

    NoNewPrivileges = true;
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateNetwork = false;
    ProtectClock = true;
    ProtectHostname = true;
    ProtectKernelLogs = true;
    ProtectKernelModules = true;
    ProtectKernelTunables = true;
    ProtectControlGroups = true;
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    RemoveIPC = true;
    KeyringMode = "private";
    SystemCallArchitectures = "native";
    SystemCallFilter = [ "@system-service" "~@privileged @resources" ];
    SystemCallErrorNumber = "EPERM";
  } // lib.optionalAttrs loopbackOnly {
    IPAddressDeny = "any";
    IPAddressAllow = "localhost";
  };
in
{
  options.services.hydra-watchdog = {
    enable = lib.mkEnableOption "hydra-watchdog, the on-node watchdog that recovers TabbyAPI";

    # pkgs.hydra-watchdog comes with this repository's overlay; without it, the package is built
    # from ./package.nix with the system's nixpkgs.
    package = lib.mkPackageOption (pkgs // {
      hydra-watchdog = pkgs.hydra-watchdog or (pkgs.callPackage ./package.nix { });
    }) "hydra-watchdog" {
      extraDescription = "Without this repository's overlay, it is built from nix/package.nix.";
    };

    checkConfig = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = ''
        Check the generated config with the package's own `hydra-watchdog check-config` at build
        time, so a mistyped key, a wrong type or a bad value fails the build (turn off only when
        the build machine cannot run the package, e.g. when cross-compiling).
      '';
    };

    settings = lib.mkOption {
      default = { };
      description = ''
        The daemon's configuration, written to ${configPath} (TOML). Every key of
        `hydra-watchdog check-config` may be set here; the keys below are the ones this module
        reads itself.
      '';
      example = lib.literalExpression ''
        {
          model.name = "Midnight-Miqu-70B-v1.5-exl2-2.5bpw";
          model.fallback = "Mistral-7B-Instruct-v0.3-exl2-4.0bpw";
          gpu.device = [
            { index = 0; power_limit_watts = 450; }
            { index = 1; power_limit_watts = 300; }
          ];
        }
      '';
      type = lib.types.submodule {
        freeformType = format.type;
        options = {
          watchdog.state_dir = lib.mkOption {
            type = lib.types.str;
            default = "/var/lib/hydra-watchdog";
            description = "State directory; must lie under /var/lib (the unit's StateDirectory=).";
          };
          watchdog.runtime_dir = lib.mkOption {
            type = lib.types.str;
            default = "/run/hydra-watchdog";
            description = "World-readable status directory; must lie under /run (RuntimeDirectory=).";
          };
          tabbyapi.unit = lib.mkOption {
            type = lib.types.str;
            default = "tabbyapi.service";
            description = "The systemd unit that runs TabbyAPI.";
          };
          tabbyapi.admin_key_file = lib.mkOption {
            type = lib.types.str;
            default = "";
            description = ''
              Path of TabbyAPI's admin key as the daemon sees it. Leave empty and use
              `adminKeyFile` instead, so the key arrives as a systemd credential.
            '';
          };
          gpu.nvml_library = lib.mkOption {
            type = lib.types.str;
            default = "";
            description = ''
              Explicit path of libnvidia-ml.so.1. Empty: the module puts /run/opengl-driver/lib on
              LD_LIBRARY_PATH, where NixOS links the running driver's library.
            '';
          };
          metrics.listen = lib.mkOption {
            type = lib.types.str;
            default = "127.0.0.1:9835";
            description = "host:port of the Prometheus exporter (empty: off).";
          };
          nixos.current_system = lib.mkOption {
            type = lib.types.str;
            default = "/run/current-system";
            description = ''
              The system link watched for `nixos-rebuild switch`: on a switch the watchdog re-checks
              TabbyAPI's libraries (in TabbyAPI's environment), the models folder, health and model
              at once and logs a `system_switched` event; libraries missing while TabbyAPI still
              runs are a `restart_will_fail` warning. Empty: off.
            '';
          };
          fallback_route.url = lib.mkOption {
            type = lib.types.str;
            default = "";
            description = ''
              LiteLLM base URL to verify the fallback route (empty: off). When set, the unit no
              longer pins its traffic to loopback.
            '';
          };
        };
      };
    };

    adminKeyFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "/run/secrets/tabbyapi-admin-key";
      description = ''
        File holding TabbyAPI's admin key (needed to load models). Passed to the daemon with
        `LoadCredential=`, so it is read by systemd at start and never copied into the Nix store.
        Give it as a string, not a Nix path literal.
      '';
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Open the metrics port (from `settings.metrics.listen`) in the firewall.";
    };

    tuneTabbyapiUnit = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = ''
        Give TabbyAPI's unit the settings of systemd/tabbyapi.service.d/10-hydra-watchdog.conf
        (as defaults): Restart=on-failure after 100ms (as systemd's stock setting; growing to 2s
        over back-to-back crashes), no start limit (the watchdog handles loops), OOMPolicy=stop,
        a start timeout long enough for a 70B model.
      '';
    };
  };

  config = lib.mkIf cfg.enable (lib.mkMerge [
    {
      assertions = [
        {
          assertion = cfg.adminKeyFile == null || s.tabbyapi.admin_key_file == "";
          message = ''
            services.hydra-watchdog: set either adminKeyFile (a systemd credential) or
            settings.tabbyapi.admin_key_file, not both; the daemon would ignore the credential.
          '';
        }
        {
          assertion = cfg.adminKeyFile == null
            || (lib.hasPrefix "/" cfg.adminKeyFile && !lib.hasPrefix builtins.storeDir cfg.adminKeyFile);
          message = ''
            services.hydra-watchdog.adminKeyFile must be an absolute path outside the Nix store
            (the store is world-readable); got ${toString cfg.adminKeyFile}.
          '';
        }
        {
          assertion = !cfg.openFirewall || !metricsOn || metricsPort != null;
          message = ''
            services.hydra-watchdog.openFirewall needs the metrics port, but
            settings.metrics.listen is "${s.metrics.listen}", not host:port with a numeric port
            (e.g. "0.0.0.0:9835").
          '';
        }
        {
          assertion = !cfg.openFirewall || (metricsOn && !metricsOnLoopback);
          message = ''
            services.hydra-watchdog.openFirewall opens the metrics port, but settings.metrics.listen
            is "${s.metrics.listen}" (off or loopback only); listen on a LAN address or leave the
            firewall closed.
          '';
        }
        {
          assertion = underDir "/var/lib/" s.watchdog.state_dir;
          message = ''
            services.hydra-watchdog.settings.watchdog.state_dir must lie under /var/lib/, written
            without ".", ".." or empty parts (the unit is ProtectSystem=strict and gets it as
            StateDirectory=); got ${s.watchdog.state_dir}.
          '';
        }
        {
          assertion = underDir "/run/" s.watchdog.runtime_dir;
          message = ''
            services.hydra-watchdog.settings.watchdog.runtime_dir must lie under /run/, written
            without ".", ".." or empty parts (the unit gets it as RuntimeDirectory=); got
            ${s.watchdog.runtime_dir}.
          '';
        }
        {
          assertion = !(metricsOn
            && metricsPort != null
            && (config.services.prometheus.exporters.nvidia-gpu.enable or false)
            && metricsPort == (config.services.prometheus.exporters.nvidia-gpu.port or 9835));
          message = ''
            services.hydra-watchdog.settings.metrics.listen uses port ${toString metricsPort}, the
            port of services.prometheus.exporters.nvidia-gpu; move one of them.
          '';
        }
      ];

      warnings = lib.optional (cfg.tuneTabbyapiUnit && !tabbyapiHasCommand) ''
        services.hydra-watchdog.tuneTabbyapiUnit tunes ${s.tabbyapi.unit}, but no NixOS module
        gives it an ExecStart= (serviceConfig.ExecStart or script): unless a package in
        systemd.packages ships that unit, NixOS renders one that systemd refuses to start. Define
        TabbyAPI's service, or point settings.tabbyapi.unit at the unit that runs it.
      '';

      environment.systemPackages = [ cfg.package ];
      # The CLI (status, events, pause, check-config) finds the config at its default path.
      environment.etc."hydra-watchdog/config.toml".source = configFile;

      systemd.services.hydra-watchdog = {
        description = "hydra-watchdog: automatic recovery for TabbyAPI (${s.tabbyapi.unit})";
        wantedBy = [ "multi-user.target" ];
        after = [ "network.target" ];
        restartTriggers = [ configFile ];
        startLimitIntervalSec = 600;
        startLimitBurst = 5;
        environment = lib.optionalAttrs (s.gpu.nvml_library == "") {
          # NixOS links the running driver's libnvidia-ml.so.1 here.
          LD_LIBRARY_PATH = "/run/opengl-driver/lib";
        };
        serviceConfig = hardening // {
          Type = "notify";
          NotifyAccess = "main";
          ExecStart = "${lib.getExe cfg.package} run --config ${configPath}";
          ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
          # Longer than one cycle (interval + canary_deadline), short enough to catch a hung loop.
          WatchdogSec = "90s";
          Restart = "on-failure";
          RestartSec = "5s";
          # 78 = EX_CONFIG: a bad config must not loop.
          RestartPreventExitStatus = 78;
          TimeoutStopSec = "60s";
          # Bounds on the watchdog itself, as in systemd/hydra-watchdog.service: it normally
          # holds ~40 descriptors (the metrics exporter at most 17, whoever connects) and ~40 MB.
          LimitNOFILE = 1024;
          MemoryMax = "256M";
          StateDirectory = lib.removePrefix "/var/lib/" s.watchdog.state_dir;
          StateDirectoryMode = "0700";
          RuntimeDirectory = lib.removePrefix "/run/" s.watchdog.runtime_dir;
          RuntimeDirectoryMode = "0755";
        } // lib.optionalAttrs (cfg.adminKeyFile != null) {
          LoadCredential = [ "admin_key:${cfg.adminKeyFile}" ];
        };
      };

      # journalctl -x: rebuild the catalog database from systemd's catalogs plus ours, after the
      # upstream catalog update (which knows only systemd's). SYSTEMD_CATALOG_SOURCES needs a
      # systemd newer than 252 (NixOS 24.05 and later ship 255+).
      systemd.services.hydra-watchdog-catalog = {
        description = "Add hydra-watchdog's entries to the journal catalog";
        wantedBy = [ "multi-user.target" ];
        after = [ "systemd-journal-catalog-update.service" ];
        before = [ "hydra-watchdog.service" ];
        restartTriggers = [ catalogSources ];
        environment.SYSTEMD_CATALOG_SOURCES = "${catalogSources}";
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          ExecStart = "${config.systemd.package}/bin/journalctl --update-catalog";
        };
      };
    }

    (lib.mkIf cfg.openFirewall {
      networking.firewall.allowedTCPPorts = lib.optional (metricsOn && metricsPort != null) metricsPort;
    })

    (lib.mkIf cfg.tuneTabbyapiUnit {
      # The same settings as systemd/tabbyapi.service.d/10-hydra-watchdog.conf, as defaults.
      systemd.services.${tabbyapiService} = {
        startLimitIntervalSec = lib.mkDefault 0;
        serviceConfig = {
          Restart = lib.mkDefault "on-failure";
          # 100ms growing to 2s over back-to-back crashes; a RestartSec above RestartMaxDelaySec
          # is cut to it by systemd, so override the two together.
          RestartSec = lib.mkDefault "100ms";
          RestartSteps = lib.mkDefault "3";
          RestartMaxDelaySec = lib.mkDefault "2s";
          TimeoutStartSec = lib.mkDefault "15min";
          OOMPolicy = lib.mkDefault "stop";
          KillMode = lib.mkDefault "control-group";
          TimeoutStopSec = lib.mkDefault "60s";
        };
      };
    })
  ]);
}
