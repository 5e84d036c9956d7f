"""The one place that knows the configuration schema.

Each TOML table is a frozen dataclass below; a field's metadata says how its value is parsed and
documents it (the docs feed `check-config`, the example file's test and the NixOS module's test).
`load_config()` turns a file into a `Config` or raises `ConfigError`, whose message names the key,
the bad value and what is accepted. The CLI maps `ConfigError` to exit status 78 (EX_CONFIG).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import ipaddress
import math
import posixpath
import pwd
import re
import reprlib
import tomllib
import unicodedata
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra_watchdog import paths
from hydra_watchdog.durations import ACCEPTED as DURATION_ACCEPTED
from hydra_watchdog.durations import format_duration, parse_duration
from hydra_watchdog.printable import CUT, cut
from hydra_watchdog.regular_file import UnusableFileError, file_identity, read_regular

DEFAULT_CONFIG_PATH = Path(paths.DEFAULT_CONFIG_PATH)
EX_CONFIG = 78
MAX_CONFIG_BYTES = paths.MAX_CONFIG_BYTES
# No timer of ours needs longer; a sane cap also keeps sleeps and timeouts in the C library's range.
MAX_DURATION = 7 * 86400.0
MAX_COUNT = 1000  # probes, restarts, attempts: beyond this a "limit" no longer limits anything
MAX_GIB = 65536.0  # 64 TiB of VRAM; bytes = GiB * 2**30 must stay an exact, finite integer
MAX_NAME_BYTES = 255  # NAME_MAX: a model folder or a unit name is one path component
MAX_PATH_BYTES = 4095  # PATH_MAX less the terminating NUL


class ConfigError(Exception):
    """An invalid configuration; str() is the whole, actionable message."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


def _opt(default: Any, doc: str, kind: str, **rules: Any) -> Any:
    meta = {"doc": doc, "kind": kind, **rules}
    if isinstance(default, list | tuple):
        return field(default=tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class WatchdogSection:
    interval: float = _opt(
        5.0, "How often to observe, decide and act.", "duration", min=0.05, max=3600.0
    )
    state_dir: str = _opt(
        "/var/lib/hydra-watchdog",
        "Where state (back-off, history, events, pause) survives restarts.",
        "path",
    )
    runtime_dir: str = _opt(
        paths.DEFAULT_RUNTIME_DIR,
        "World-readable status (no secrets) for `hydra-watchdog status` as any user.",
        "path",
    )
    dry_run: bool = _opt(False, "Decide as usual, but only log what would be done.", "bool")
    events_kept: int = _opt(
        200, "How many recent events the state file keeps.", "int", min=1, max=100_000
    )


@dataclass(frozen=True)
class TabbyAPISection:
    url: str = _opt(
        "http://127.0.0.1:5000",
        "TabbyAPI's base URL; must be on this node (loopback).",
        "local_url",
    )
    unit: str = _opt("tabbyapi.service", "The systemd unit that runs TabbyAPI.", "unit")
    admin_key_file: str = _opt(
        "",
        "File holding TabbyAPI's admin key (empty: none; under systemd the credential "
        "'admin_key' is used when present).",
        "path_or_empty",
    )
    health_timeout: float = _opt(5.0, "Total deadline of one /health probe.", "duration", min=0.01)
    slow_threshold: float = _opt(
        2.0, "Health latency above this is slow (the runbook's alert).", "duration", min=0.001
    )
    slow_probes: int = _opt(
        3, "Consecutive slow probes before the node counts as degraded.", "int", min=1
    )
    failures_before_down: int = _opt(
        3,
        "Consecutive failed probes (GET /health, each with health_timeout) before TabbyAPI counts "
        "as down; a hung probe is confirmed in its own cycle (observe.py).",
        "int",
        min=1,
    )
    startup_grace: float = _opt(
        300.0,
        "After a (re)start, refused connections mean 'starting' for this long "
        "(TabbyAPI loads its startup model before it opens the port).",
        "duration",
    )
    canary_interval: float = _opt(
        60.0, "How often a 1-token completion checks generation (0: only when slow).", "duration"
    )
    canary_deadline: float = _opt(
        30.0,
        "A canary slower than this while /health is 200 is a generation hang.",
        "duration",
        min=0.01,
    )
    venv: str = _opt(
        "/opt/tabbyapi/venv",
        "TabbyAPI's virtualenv, for the missing-library (ldd) check.",
        "path_or_empty",
    )
    cmdline_patterns: tuple[str, ...] = _opt(
        ("/opt/tabbyapi",),
        "TabbyAPI's install tree(s), absolute paths: an orphan runs TabbyAPI's own program "
        "(its unit's ExecStart=, or one seen in the unit) from inside one, as its user.",
        "install_dirs",
    )
    user: str = _opt(
        "root",
        "The user TabbyAPI runs as (name or uid) when its unit does not say (User=), e.g. "
        "without systemd.",
        "user",
    )

    @property
    def host(self) -> str:
        """The URL's host as written (an IPv6 address without brackets, `localhost` unresolved)."""
        return urllib.parse.urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parsed = urllib.parse.urlsplit(self.url)
        return parsed.port or 80  # http:// only (see _url)


@dataclass(frozen=True)
class ModelSection:
    name: str = _opt(
        "Midnight-Miqu-70B-v1.5-exl2-2.5bpw",
        "The model to keep loaded (a folder under models_dir; empty: never load).",
        "model_name",
    )
    models_dir: str = _opt(
        "/mnt/models", "Where the model folders live (a mount on hydra-ai).", "path"
    )
    vram_required_gib: float | None = _opt(
        None,
        "VRAM the model needs, summed over the GPUs (unset: estimated from the folder size).",
        "optional_float",
        min=0.0,
        max=MAX_GIB,
    )
    estimate_overhead_gib: float = _opt(
        4.0,
        "Added to the folder size when estimating (KV cache, CUDA context).",
        "float",
        min=0.0,
        max=MAX_GIB,
    )
    load_timeout: float = _opt(
        900.0, "Give up on a model load after this long.", "duration", min=1.0
    )
    max_load_attempts: int = _opt(
        3, "Failed loads of the model before the fallback is tried.", "int", min=1, max=MAX_COUNT
    )
    fallback: str = _opt(
        "", "A smaller model to load when the main one cannot (empty: none).", "model_name"
    )
    fallback_vram_required_gib: float | None = _opt(
        None, "VRAM the fallback needs (unset: estimated).", "optional_float", min=0.0, max=MAX_GIB
    )


@dataclass(frozen=True)
class RestartLoopSection:
    max_restarts: int = _opt(
        3, "More restarts than this within `window` is a restart loop.", "int", min=1, max=MAX_COUNT
    )
    window: float = _opt(600.0, "The window restarts are counted in.", "duration", min=1.0)
    backoff_initial: float = _opt(
        30.0, "First wait before a start attempt in a loop.", "duration", min=0.01
    )
    backoff_max: float = _opt(900.0, "Longest wait between start attempts.", "duration", min=0.01)
    reset_after: float = _opt(600.0, "Healthy time that resets the back-off.", "duration")
    escalate_after: float = _opt(1800.0, "Time in a loop before escalating.", "duration")


@dataclass(frozen=True)
class GpuDevice:
    # NVML takes an unsigned int: a larger index would wrap around to another GPU.
    index: int | None = _opt(None, "NVML index of the GPU.", "optional_int", min=0, max=255)
    uuid: str | None = _opt(None, "UUID of the GPU (instead of index).", "optional_str")
    power_limit_watts: float | None = _opt(
        None,
        "Power limit to enforce (unset: leave it alone).",
        "optional_float",
        min=1.0,
        max=10_000.0,
    )

    @property
    def label(self) -> str:
        return f"gpu{self.index}" if self.index is not None else f"gpu {self.uuid}"


@dataclass(frozen=True)
class GpuSection:
    nvml_library: str = _opt(
        "", "Explicit path of libnvidia-ml.so.1 (empty: the loader's search path).", "path_or_empty"
    )
    call_timeout: float = _opt(
        2.0, "Deadline for one NVML call (a lost GPU can hang it).", "duration", min=0.01
    )
    device: tuple[GpuDevice, ...] = _opt(
        (), "The GPUs TabbyAPI uses ([[gpu.device]] tables).", "devices"
    )


@dataclass(frozen=True)
class OrphansSection:
    enabled: bool = _opt(True, "Kill TabbyAPI processes left outside the unit's cgroup.", "bool")
    term_grace: float = _opt(10.0, "Wait between SIGTERM and SIGKILL.", "duration")


@dataclass(frozen=True)
class GpuResetSection:
    enabled: bool = _opt(
        False,
        "Allow `GPU reset` in full recovery (only when no other process uses the GPU).",
        "bool",
    )


@dataclass(frozen=True)
class FallbackRouteSection:
    url: str = _opt(
        "", "LiteLLM base URL to verify the fallback route (empty: off).", "url_or_empty"
    )
    model: str = _opt("tabby", "Model name to ask LiteLLM for.", "str")
    timeout: float = _opt(10.0, "Deadline of the fallback-route check.", "duration", min=0.01)


@dataclass(frozen=True)
class MetricsSection:
    listen: str = _opt(
        "127.0.0.1:9835", "host:port of the Prometheus exporter (empty: off).", "listen_or_empty"
    )


@dataclass(frozen=True)
class NixosSection:
    # The default is the NixOS path itself, not a guess made at load time: where it does not
    # exist (any other distribution) there is nothing to watch, so the same config (and
    # check-config) works on every machine. Empty turns the watch off everywhere.
    current_system: str = _opt(
        "/run/current-system",
        "The NixOS system link watched for `nixos-rebuild switch` (empty: off; a path that does "
        "not exist, as on any non-NixOS machine, is off too).",
        "path_or_empty",
    )
    profiles_dir: str = _opt(
        "/nix/var/nix/profiles",
        "Where the system-N-link generation links live (names the generation of a switch).",
        "path",
    )


@dataclass(frozen=True)
class Config:
    watchdog: WatchdogSection = field(default_factory=WatchdogSection)
    tabbyapi: TabbyAPISection = field(default_factory=TabbyAPISection)
    model: ModelSection = field(default_factory=ModelSection)
    restart_loop: RestartLoopSection = field(default_factory=RestartLoopSection)
    gpu: GpuSection = field(default_factory=GpuSection)
    orphans: OrphansSection = field(default_factory=OrphansSection)
    gpu_reset: GpuResetSection = field(default_factory=GpuResetSection)
    fallback_route: FallbackRouteSection = field(default_factory=FallbackRouteSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    nixos: NixosSection = field(default_factory=NixosSection)
    source: str = field(default="(defaults)", compare=False)
    # SHA-256 of the file's bytes and the file's identity (load_config): `status` trusts the
    # daemon's published view of its config only for the very same file (report/status_file.py)
    sha256: str = field(default="", compare=False)
    file_identity: str = field(default="", compare=False)


SECTIONS: dict[str, type[Any]] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in dataclasses.fields(Config)
    if f.name not in ("source", "sha256", "file_identity")
}


def schema() -> dict[str, dict[str, dataclasses.Field[Any]]]:
    """Every section and key, for docs and cross-checks (example file, NixOS module)."""
    return {name: {f.name: f for f in dataclasses.fields(cls)} for name, cls in SECTIONS.items()}


# --- parsing ------------------------------------------------------------------------------------


SHOWN_MAX = 60  # characters of a quoted value in a message: every line stays readable
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = SHOWN_MAX
_REPR.maxlevel = 3
_REPR.fillvalue = CUT  # what it leaves out, marked as every cut is (printable.cut)


def _show(value: object) -> str:
    """A value quoted in a message (every message quotes through this): repr(), cut to
    SHOWN_MAX characters and 3 levels deep. A deeply nested TOML value would make plain repr()
    raise RecursionError, a nested list of strings would run to thousands of characters, and a
    1 MiB string would flood the journal."""
    text = _REPR.repr(value)
    return cut(text, SHOWN_MAX)


# A key as the schema spells them; any other (unknown) key is shown quoted and cut (_show).
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,40}", re.ASCII)


def _control_chars(text: str) -> list[str]:
    return [f"U+{ord(ch):04X}" for ch in text if unicodedata.category(ch) == "Cc"]


def _plain_text(key: str, value: str, what: str) -> None:
    """Refuse control characters (NUL, newline, escape...): they end C strings and log lines."""
    bad = _control_chars(value)
    if bad:
        raise ConfigError(
            key, f"{_show(value)} holds control characters ({', '.join(bad[:3])}); {what}"
        )


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url(key: str, value: object, *, local: bool) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"{_show(value)} is not a string; expected an http:// URL")
    if not value.isascii() or any(ch.isspace() or not ch.isprintable() for ch in value):
        raise ConfigError(
            key,
            f"{_show(value)} holds spaces, control or non-ASCII characters; "
            "percent-encode them in an http:// URL",
        )
    try:
        parsed = urllib.parse.urlsplit(value)
    except ValueError:  # e.g. an unclosed "[::1" IPv6 literal
        raise ConfigError(key, f"{_show(value)} is not an http:// URL with a host") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(key, f"{_show(value)} is not an http:// URL with a host")
    # Credentials and queries would be sent on every probe and shown in status and logs; a
    # fragment means nothing to a server. Shown redacted: the message lands in the journal.
    if "@" in parsed.netloc or "?" in value or "#" in value:
        raise ConfigError(
            key,
            f"{_show(redact_url(value))} carries user info, a query or a fragment; give a plain "
            "base URL like 'http://127.0.0.1:5000' (the admin key goes in tabbyapi.admin_key_file)",
        )
    if "%" in parsed.netloc:
        # An IPv6 zone id ("[fe80::1%25eth0]") names an interface, not a host on this node; the
        # client and the listener check would each read it their own way.
        raise ConfigError(
            key,
            f"{_show(value)} holds an IPv6 zone id ('%'); give a plain address, like "
            "'http://127.0.0.1:5000' or 'http://[::1]:5000'",
        )
    if parsed.path not in ("", "/"):
        # Every request appends its own path (/health, /v1/model...): a base path would send
        # them all where nothing answers, and a failing /health restarts TabbyAPI.
        raise ConfigError(
            key,
            f"{_show(value)} has a path ({_show(parsed.path)}); give the base URL alone, like "
            "'http://127.0.0.1:5000' (the watchdog adds /health, /v1/...)",
        )
    if parsed.scheme == "https":
        # The client's deadline-bounded connections speak no TLS: every probe would fail, and a
        # failing /health is what restarts TabbyAPI (measured: "unusable answer").
        raise ConfigError(
            key,
            f"{_show(value)}: https:// is not supported (the watchdog's client speaks plain "
            "HTTP, as TabbyAPI serves it on loopback); use http://",
        )
    try:
        port = parsed.port
    except ValueError:
        port = 0
    if port == 0:  # ":0" would silently mean port 80 to the port scanner
        raise ConfigError(key, f"{_show(value)} has an invalid port (expected 1-65535)")
    if local and not _is_loopback_host(parsed.hostname):
        raise ConfigError(
            key,
            f"{_show(value)} is not on this node; the watchdog runs beside TabbyAPI and only "
            "talks to a loopback address (127.0.0.0/8, ::1 or localhost)",
        )
    return value.rstrip("/")


def _number(key: str, value: object, rules: Mapping[str, Any], integer: bool) -> float:
    what = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, f"{_show(value)} is not {what}")
    if integer and not isinstance(value, int):
        raise ConfigError(key, f"{_show(value)} is not {what}")
    # TOML spells inf and nan; nan would also slip past the minimum check below.
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, f"{_show(value)} is not a finite number")
    if "min" in rules and value < rules["min"]:
        raise ConfigError(key, f"{_show(value)} is below the minimum {rules['min']}")
    if "max" in rules and value > rules["max"]:
        raise ConfigError(key, f"{_show(value)} is above the maximum {rules['max']}")
    return value


# A plain systemd unit name (systemd.unit(5)): these characters only, one optional "@instance".
# No glob characters: systemctl expands "*.service" to every loaded unit.
_UNIT_NAME = re.compile(r"[A-Za-z0-9:_.\\-]+(?:@[A-Za-z0-9:_.\\-]+)?\.service", re.ASCII)
# A host for the metrics listener: an IPv4 literal or a DNS name (checked further below), or a
# bracketed IPv6 literal.
_HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?", re.ASCII)


def _unit(key: str, value: str) -> str:
    if len(value) > MAX_NAME_BYTES or value.startswith("-") or _UNIT_NAME.fullmatch(value) is None:
        raise ConfigError(
            key,
            f"{_show(value)} is not a plain systemd service name like 'tabbyapi.service' "
            "(letters, digits and ':-_.\\', one optional '@instance', ending in '.service'; "
            f"no globs, spaces or leading '-'; at most {MAX_NAME_BYTES} characters)",
        )
    return value


def _model_name(key: str, value: str) -> str:
    if not value:
        return value
    _plain_text(key, value, "expected a folder name under model.models_dir")
    if "/" in value or value in (".", ".."):
        raise ConfigError(
            key,
            f"{_show(value)} is not a folder name under model.models_dir "
            "(no '/', and not '.' or '..')",
        )
    if len(value.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise ConfigError(
            key, f"{_show(value)} is longer than {MAX_NAME_BYTES} bytes, the longest folder name"
        )
    return value


def _path(key: str, value: str, *, empty_ok: bool) -> str:
    if empty_ok and not value:
        return value
    accepted = "an absolute path (or empty)" if empty_ok else "an absolute path"
    _plain_text(key, value, f"expected {accepted}")
    if not value.startswith("/"):
        raise ConfigError(key, f"{_show(value)} is not {accepted}")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise ConfigError(key, f"{_show(value)} is longer than {MAX_PATH_BYTES} bytes")
    return value


def _listen_host(host: str) -> bool:
    if host.startswith("[") and host.endswith("]"):
        try:
            return ipaddress.ip_address(host[1:-1]).version == 6
        except ValueError:
            return False
    labels = host.rstrip(".").split(".")
    return len(host) <= 253 and all(_HOST_NAME.fullmatch(label) for label in labels)


def _duration(key: str, value: object, meta: Mapping[str, Any]) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise ConfigError(key, f"{_show(value)} is not {DURATION_ACCEPTED}") from None
    if "min" in meta and seconds < meta["min"]:
        raise ConfigError(key, f"{_show(value)} is shorter than {format_duration(meta['min'])}")
    longest = meta.get("max", MAX_DURATION)
    if seconds > longest:
        raise ConfigError(
            key, f"{_show(value)} is longer than the maximum {format_duration(longest)}"
        )
    return seconds


def _parse_value(key: str, value: object, meta: Mapping[str, Any]) -> Any:
    kind = meta["kind"]
    if kind == "duration":
        return _duration(key, value, meta)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(key, f"{_show(value)} is not a boolean; use true or false")
        return value
    if kind in ("int", "optional_int"):
        return int(_number(key, value, meta, integer=True))
    if kind in ("float", "optional_float"):
        return float(_number(key, value, meta, integer=False))
    if kind in ("str", "optional_str", "path", "path_or_empty", "unit", "model_name"):
        if not isinstance(value, str):
            raise ConfigError(key, f"{_show(value)} is not a string")
        if kind in ("path", "path_or_empty"):
            return _path(key, value, empty_ok=kind == "path_or_empty")
        if kind == "unit":
            return _unit(key, value)
        if kind == "model_name":
            return _model_name(key, value)
        _plain_text(key, value, "expected plain text")
        return value
    if kind == "str_list":
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(key, f"{_show(value)} is not a list of non-empty strings")
        if meta.get("nonempty") and not value:
            raise ConfigError(key, "the list is empty; give at least one pattern")
        return tuple(value)
    if kind == "local_url":
        return _url(key, value, local=True)
    if kind == "url_or_empty":
        return "" if value == "" else _url(key, value, local=False)
    if kind == "listen_or_empty":
        if not isinstance(value, str):
            raise ConfigError(key, f"{_show(value)} is not a string like '127.0.0.1:9835'")
        if value == "":
            return value
        host, sep, port = value.rpartition(":")
        if (
            not sep
            or not _listen_host(host)
            or not (port.isascii() and port.isdigit())
            or not 0 < int(port) < 65536
        ):
            raise ConfigError(
                key,
                f"{_show(value)} is not 'host:port' like '127.0.0.1:9835' or '[::1]:9835' "
                "(or empty: off)",
            )
        return value
    if kind == "install_dirs":
        return _install_dirs(key, value)
    if kind == "user":
        if not isinstance(value, str) or not _USER_NAME.fullmatch(value):
            raise ConfigError(
                key, f"{_show(value)} is not a user name (like 'tabbyapi') or a numeric uid"
            )
        return value
    raise AssertionError(f"unknown field kind {kind}")  # pragma: no cover - schema bug


_USER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?|[0-9]{1,10}")


def resolve_uid(user: str) -> int | None:
    """A user name or a numeric uid -> uid; None when no such user exists here."""
    if user.isascii() and user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


def _install_dirs(key: str, value: object) -> tuple[str, ...]:
    """Absolute directories, normalised. Bare words ("python", " ") would make any process
    that mentions them TabbyAPI's, and "/" would make every process so: refused."""
    if not isinstance(value, list) or not value:
        raise ConfigError(
            key, f"{_show(value)} is not a non-empty list of absolute paths like ['/opt/tabbyapi']"
        )
    dirs = []
    for item in value:
        if not isinstance(item, str) or not item.startswith("/") or item != item.strip():
            raise ConfigError(
                key,
                f"{_show(item)} is not an absolute path: entries name TabbyAPI's install tree, "
                "like '/opt/tabbyapi' (a bare word would match any command line)",
            )
        if ".." in item.split("/"):
            raise ConfigError(
                key,
                f"{_show(item)} holds '..', which widens the install tree to a parent folder; "
                "name the tree itself, like '/opt/tabbyapi'",
            )
        norm = posixpath.normpath(item)
        if norm in ("/", "//") or any(ord(ch) < 0x20 or ch == "\x7f" for ch in item):
            raise ConfigError(key, f"{_show(item)} is not a usable install directory")
        dirs.append(norm)
    return tuple(dirs)


def _reject_unknown(prefix: str, table: Mapping[str, object], known: Sequence[str]) -> None:
    for key in table:
        if key not in known:
            hint = difflib.get_close_matches(key[:100], known, n=1)
            did_you_mean = f"; did you mean '{hint[0]}'?" if hint else ""
            shown = key if _PLAIN_KEY.fullmatch(key) else _show(key)
            raise ConfigError(
                f"{prefix}{shown}",
                f"unknown key{did_you_mean} (known here: {', '.join(sorted(known))})",
            )


def _parse_table(prefix: str, cls: type[Any], table: object) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(prefix.rstrip("."), f"{_show(table)} is not a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(prefix, table, list(fields))
    values: dict[str, Any] = {}
    for name, raw in table.items():
        meta = fields[name].metadata
        if meta["kind"] == "devices":
            values[name] = _parse_devices(f"{prefix}{name}", raw)
        else:
            values[name] = _parse_value(f"{prefix}{name}", raw, meta)
    return cls(**values)


def _parse_devices(key: str, raw: object) -> tuple[GpuDevice, ...]:
    if not isinstance(raw, list):
        raise ConfigError(key, "expected [[gpu.device]] tables")
    devices = tuple(_parse_table(f"{key}[{i}].", GpuDevice, t) for i, t in enumerate(raw))
    seen: set[tuple[str, str]] = set()
    for i, dev in enumerate(devices):
        if (dev.index is None) == (dev.uuid is None):
            raise ConfigError(f"{key}[{i}]", "give exactly one of 'index' or 'uuid'")
        # Keyed by kind too: index 0 and a uuid spelled "0" are different GPUs.
        ident = ("index", str(dev.index)) if dev.index is not None else ("uuid", str(dev.uuid))
        if ident in seen:
            raise ConfigError(f"{key}[{i}]", f"the GPU {_show(ident[1])} is listed twice")
        seen.add(ident)
    return devices


def _check_cross_keys(cfg: Config) -> None:
    t, r, m = cfg.tabbyapi, cfg.restart_loop, cfg.model
    if t.slow_threshold >= t.health_timeout:
        raise ConfigError(
            "tabbyapi.slow_threshold",
            f"{format_duration(t.slow_threshold)} is not below tabbyapi.health_timeout "
            f"({format_duration(t.health_timeout)}); a slow probe must be able to finish",
        )
    if r.backoff_initial > r.backoff_max:
        raise ConfigError(
            "restart_loop.backoff_initial",
            f"{format_duration(r.backoff_initial)} exceeds restart_loop.backoff_max "
            f"({format_duration(r.backoff_max)})",
        )
    _check_own_names(cfg)
    if m.fallback and m.fallback == m.name:
        raise ConfigError(
            "model.fallback", f"{_show(m.fallback)} is the main model; pick a smaller one"
        )


# The watchdog's own units (systemd/hydra-watchdog.service, and the load helper's transient units,
# act/load_launch.UNIT_PREFIX): restarting or stopping one of them as "TabbyAPI" stops the watchdog.
OWN_UNIT = "hydra-watchdog.service"
OWN_UNIT_PREFIX = "hydra-watchdog-load-"


def _check_own_names(cfg: Config) -> None:
    """Keys that name what the watchdog itself owns: its unit, its port, its folders."""
    t, w = cfg.tabbyapi, cfg.watchdog
    if t.unit == OWN_UNIT or t.unit.startswith(OWN_UNIT_PREFIX):
        raise ConfigError(
            "tabbyapi.unit",
            f"{_show(t.unit)} is the watchdog's own unit, not TabbyAPI's; give the unit that "
            "runs TabbyAPI, like 'tabbyapi.service'",
        )
    if cfg.metrics.listen:
        port = int(cfg.metrics.listen.rpartition(":")[2])
        if port in (t.port, t.port + 1):
            raise ConfigError(
                "metrics.listen",
                f"{_show(cfg.metrics.listen)} takes port {port}, TabbyAPI's "
                f"({t.port}, or {t.port + 1} where TabbyAPI moves when its port is busy); "
                "pick another port, like the default '127.0.0.1:9835'",
            )
    state, runtime = posixpath.normpath(w.state_dir), posixpath.normpath(w.runtime_dir)
    if within_dir(state, runtime) or within_dir(runtime, state):
        raise ConfigError(
            "watchdog.state_dir",
            f"{_show(w.state_dir)} is watchdog.runtime_dir ({_show(w.runtime_dir)}) or shares a "
            "tree with it: the state is root's and kept, the runtime dir world-readable and "
            "removed at stop; give each its own, like /var/lib/hydra-watchdog and "
            "/run/hydra-watchdog",
        )


def check_host(cfg: Config) -> None:
    """What the file alone cannot say, checked on the machine that runs the watchdog: by `run`
    at start and at each reload, and by `check-config` unless told --file-only. Never by
    load_config, whose verdict rests on the file's bytes alone (the status quick path trusts a
    config by its hash; a NixOS build checks the file in a sandbox that has no TabbyAPI user)."""
    user = cfg.tabbyapi.user
    if resolve_uid(user) is None:
        # The processes of a user that does not exist can never be TabbyAPI's: without a unit,
        # the admin key would be withheld and no orphan ever recognised, in silence.
        raise ConfigError(
            "tabbyapi.user",
            f"{_show(user)} is no user on this machine; give the user TabbyAPI runs as (a name "
            "from the user database, or a numeric uid)",
        )


def within_dir(path: str, top: str) -> bool:
    """`path` is `top` or lies below it, by whole components (both normalised, absolute)."""
    return path == top or path.startswith(top.rstrip("/") + "/")


def parse_config(data: Mapping[str, object], source: str = "(inline)") -> Config:
    _reject_unknown("", data, list(SECTIONS))
    sections = {
        name: _parse_table(f"{name}.", SECTIONS[name], table) for name, table in data.items()
    }
    cfg = Config(**sections, source=source)
    _check_cross_keys(cfg)
    return cfg


def load_config(path: Path | str) -> Config:
    path = Path(path)
    try:  # a regular file (NixOS links it into the store), bounded: never a FIFO, /dev/zero
        raw, st = read_regular(path, MAX_CONFIG_BYTES, follow=True)
    except FileNotFoundError:
        raise ConfigError("", f"config file {path} does not exist (pass --config PATH)") from None
    except UnusableFileError as exc:
        raise ConfigError(
            "", f"config file {path} cannot be read: {exc}; is --config the right file?"
        ) from None
    except OSError as exc:
        raise ConfigError("", f"config file {path} cannot be read: {exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            "",
            f"config file {path} cannot be read: it is not UTF-8 text "
            f"(byte 0x{raw[exc.start]:02x} at offset {exc.start})",
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{path} is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(
            "", f"{path} is not a usable config: its arrays or tables are nested too deeply"
        ) from None
    except Exception as exc:  # tomllib's other failures, e.g. a 5,000-digit integer
        raise ConfigError("", f"{path} is not valid TOML: {exc}") from None
    cfg = parse_config(data, source=str(path))
    digest = hashlib.sha256(raw).hexdigest()
    return dataclasses.replace(cfg, sha256=digest, file_identity=file_identity(st))


# --- rendering ----------------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """Hide credentials a URL may carry (user:password@, query strings)."""
    if not url:
        return url
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = "***" if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _toml_value(value: object, kind: str) -> str:
    if kind == "duration" and isinstance(value, float):
        return f'"{format_duration(value)}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v, "str") for v in value) + "]"
    return _toml_string(str(value))


def _toml_string(text: str) -> str:
    # TOML basic strings forbid raw control characters (a newline in a model name would end the
    # line), so those are escaped along with the quote and the backslash.
    out = []
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _render_table(lines: list[str], obj: object) -> None:
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        if f.metadata["kind"] == "devices":
            continue  # rendered as [[gpu.device]] tables after the section
        value = getattr(obj, f.name)
        if f.metadata.get("kind") in ("url_or_empty", "local_url"):
            value = redact_url(value)
        if value is None:
            lines.append(f"# {f.name} = (unset)")
        else:
            lines.append(f"{f.name} = {_toml_value(value, f.metadata['kind'])}")


def render_config(cfg: Config) -> str:
    """The effective configuration as TOML, secrets redacted; parse_config() accepts it again."""
    # Escaped because TOML comments may not hold control characters (a newline would end one).
    lines = [f"# effective configuration from {_toml_string(cfg.source)[1:-1]}"]
    for name in SECTIONS:
        section = getattr(cfg, name)
        lines.append(f"\n[{name}]")
        _render_table(lines, section)
        if name == "gpu":
            for dev in cfg.gpu.device:
                lines.append("\n[[gpu.device]]")
                _render_table(lines, dev)
    return "\n".join(lines) + "\n"
