# A typical configuration, mirroring hydra-ai: two GPUs at 450 W and 300 W, the 70B model and a
# fallback, the admin key as a credential.
{
  services.hydra-watchdog = {
    enable = true;
    adminKeyFile = "/etc/tabbyapi/admin_key";
    settings = {
      watchdog.interval = "5s";
      tabbyapi = {
        url = "http://127.0.0.1:5000";
        unit = "tabbyapi.service";
        venv = "/opt/tabbyapi/venv";
      };
      model = {
        name = "Midnight-Miqu-70B-v1.5-exl2-2.5bpw";
        models_dir = "/mnt/models";
        vram_required_gib = 48;
        fallback = "Mistral-7B-Instruct-v0.3-exl2-4.0bpw";
      };
      gpu.device = [
        {
          index = 0;
          power_limit_watts = 450;
        }
        {
          index = 1;
          power_limit_watts = 300;
        }
      ];
      restart_loop = {
        max_restarts = 3;
        window = "10m";
      };
    };
  };

  # On NixOS this is the systemd package; /usr/bin/journalctl exists on the CI host.
  systemd.package = "/usr";
}
