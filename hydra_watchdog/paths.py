"""Where the watchdog's files are by default, for config.py and for `status`, which must find
the status file without importing the config's schema (report/status_file.py)."""

DEFAULT_CONFIG_PATH = "/etc/hydra-watchdog/config.toml"
DEFAULT_RUNTIME_DIR = "/run/hydra-watchdog"
# A config is a few kilobytes; anything far larger (or endless, like /dev/zero) is a wrong path.
MAX_CONFIG_BYTES = 1 << 20
