"""`hydra-watchdog status` without argparse, the config schema or the report's dataclasses.

Monitoring runs `status` every few seconds, and most of its time was start-up: argparse, tomllib
and the config's dataclasses, the report's dataclasses. This quick path answers the common case
with none of them, and answers only when its answer is exactly the full path's:

- the command line is `status` with only --json, --config PATH, --runtime-dir DIR (the full
  path parses everything else: --help, abbreviations, errors);
- the status file is a plain, valid report whose `config_sha256` is the SHA-256 of the bytes of
  this --config file. The daemon loaded and validated those very bytes (load_config depends on
  nothing else), so the full path would read the same config without error, and the report's
  `runtime_dir` and `stale_after` are what it would compute from it. Where the config's
  runtime_dir is, is a guess from a simple scan of the file; the report must confirm it.

Anything else (no status file, an unusable or hostile one, an edited or other config, another
version of the daemon) returns None before printing anything, and the full path in cli.py says
what is wrong. The judging and the text are shared with it (status_view.py).
"""

from __future__ import annotations

import os
import time

from hydra_watchdog import __version__
from hydra_watchdog.regular_file import UnusableFileError, read_regular
from hydra_watchdog.report.status_view import (
    VERDICT_NAMES,
    daemon_problem,
    evaluate,
    print_status,
)

try:  # the C module hashlib's sha256 falls back on; hashlib itself loads OpenSSL (milliseconds)
    from _sha256 import sha256  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - Python >= 3.12 names it _sha2
    from hashlib import sha256

# json's own C scanner, which json.loads runs too: the json package imports re, and re imports
# enum, ~15 ms of this command's start-up (measured). Without the C module, json itself.
try:
    import _json
except ImportError:  # pragma: no cover - every CPython has it
    _json = None  # type: ignore[assignment]

TYPE_CHECKING = False  # not typing's: importing typing alone costs `status` milliseconds
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    from hydra_watchdog.report.status import StatusReport

# Kept equal to config.py and status_file.py (a test checks): importing those is what this avoids.
DEFAULT_CONFIG_PATH = "/etc/hydra-watchdog/config.toml"
DEFAULT_RUNTIME_DIR = "/run/hydra-watchdog"
MAX_CONFIG_BYTES = 1 << 20
STATUS_FILE = "status.json"
STATUS_MAX_BYTES = 4 * 1024**2
SCHEMA_VERSION = 1
_MAX_INT = 2**63

# The report's JSON shape, field by field in the dataclasses' order: (name, kind, default).
# kind: str, bool, int, float, int?/float? (or null), str* (array of strings), a record's name,
# Name? (or null), Name* (array of them), phase, verdict. A test keeps it equal to status.py.
SCHEMA: dict[str, tuple[tuple[str, str, Any], ...]] = {
    "HealthInfo": (
        ("outcome", "str", ""),
        ("healthy", "bool", False),
        ("status", "int?", None),
        ("latency_s", "float", 0.0),
        ("detail", "str", ""),
    ),
    "ModelInfo": (
        ("wanted", "str", ""),
        ("loaded", "str?", None),
        ("known", "bool", False),
        ("fallback", "str", ""),
        ("fallback_in_use", "bool", False),
        ("vram_needed_bytes", "int?", None),
        ("vram_needed_source", "str", ""),
    ),
    "LoadInfo": (
        ("model", "str", ""),
        ("started_at", "float?", None),
        ("deadline_at", "float?", None),
        ("module", "int", 0),
        ("modules", "int", 0),
    ),
    "GpuInfo": (
        ("index", "int", 0),
        ("uuid", "str", ""),
        ("name", "str", ""),
        ("vram_used_bytes", "int?", None),
        ("vram_free_bytes", "int?", None),
        ("vram_total_bytes", "int?", None),
        ("power_limit_w", "float?", None),
        ("power_target_w", "float?", None),
        ("power_usage_w", "float?", None),
        ("temperature_c", "int?", None),
        ("errors", "str*", ()),
    ),
    "UnitInfo": (
        ("name", "str", ""),
        ("available", "bool", False),
        ("active_state", "str", ""),
        ("sub_state", "str", ""),
        ("result", "str", ""),
        ("n_restarts", "int?", None),
        ("main_pid", "int?", None),
        ("detail", "str", ""),
    ),
    "ListenerInfo": (
        ("port", "int", 0),
        ("pid", "int?", None),
        ("role", "str", ""),
        ("command", "str", ""),
    ),
    "ProcessEntry": (
        ("pid", "int", 0),
        ("role", "str", ""),
        ("command", "str", ""),
        ("gpu_bytes", "int", 0),
    ),
    "ActionEntry": (
        ("at", "float", 0.0),
        ("event", "str", ""),
        ("action", "str", ""),
        ("message", "str", ""),
        ("rule", "str", ""),
        ("reason", "str", ""),
    ),
    "BackoffInfo": (
        ("step", "int", 0),
        ("next_attempt_at", "float?", None),
        ("loop_since", "float?", None),
        ("escalated", "bool", False),
        ("restarts_in_window", "int", 0),
        ("restarts_by_watchdog", "int", 0),
        ("restarts_by_systemd", "int", 0),
        ("window_s", "float", 0.0),
    ),
    "PauseInfo": (
        ("paused", "bool", False),
        ("reason", "str", ""),
        ("until", "float?", None),
    ),
    "FindingEntry": (
        ("rule", "str", ""),
        ("severity", "str", ""),
        ("message", "str", ""),
    ),
    "StatusReport": (
        ("schema", "int", SCHEMA_VERSION),
        ("generated_at", "float", 0.0),
        ("pid", "int", 0),
        ("pid_start", "int?", None),
        ("heartbeat", "float?", None),
        ("stopped_at", "float?", None),
        ("phase", "phase", "unknown"),
        ("since", "float?", None),
        ("verdict", "verdict", 3),
        ("summary", "str", ""),
        ("dry_run", "bool", False),
        ("health", "HealthInfo?", None),
        ("model", "ModelInfo", None),  # None: the record's defaults
        ("load", "LoadInfo?", None),
        ("gpus", "GpuInfo*", ()),
        ("gpu_error", "str", ""),
        ("unit", "UnitInfo?", None),
        ("listeners", "ListenerInfo*", ()),
        ("processes", "ProcessEntry*", ()),
        ("actions", "ActionEntry*", ()),
        ("backoff", "BackoffInfo", None),
        ("paused", "PauseInfo", None),
        ("findings", "FindingEntry*", ()),
        ("version", "str", ""),
        ("config_sha256", "str", ""),
        ("runtime_dir", "str", ""),
        ("stale_after", "float", 0.0),
    ),
}
# states.Phase's values (a test keeps them equal): states imports enum.
PHASES = frozenset(
    (
        "unknown",
        "starting",
        "healthy",
        "degraded",
        "no_model",
        "loading",
        "down",
        "recovering",
        "backoff",
        "escalated",
        "blocked",
        "paused",
    )
)
_VERDICTS = frozenset(range(len(VERDICT_NAMES)))


class UnusualError(Exception):
    """Not a plain, valid report: the full path reads it and says what is wrong."""


class View:
    """A read-only record: what status_view's functions read of a StatusReport."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self.__dict__.update(fields)


def _value(kind: str, raw: Any) -> Any:  # noqa: PLR0912 - one branch per kind
    """The JSON value of one field as the full path normalises it (from_jsonable, then
    to_jsonable), or UnusualError for anything it might treat differently or refuse."""
    if kind.endswith("?"):
        return None if raw is None else _value(kind[:-1], raw)
    if kind.endswith("*"):
        if type(raw) is not list:
            raise UnusualError
        return [_value(kind[:-1], v) for v in raw]
    if kind in SCHEMA:
        return normalize(kind, raw)
    if kind in ("str", "phase"):
        if type(raw) is not str or (kind == "phase" and raw not in PHASES):
            raise UnusualError
        try:
            raw.encode("utf-8")  # a lone surrogate from a \ud800 escape is not text
        except UnicodeEncodeError:
            raise UnusualError from None
        return raw
    if kind == "bool":
        if type(raw) is not bool:
            raise UnusualError
        return raw
    if kind in ("int", "verdict"):
        if type(raw) is not int or abs(raw) > _MAX_INT:
            raise UnusualError
        if kind == "verdict" and raw not in _VERDICTS:
            raise UnusualError
        return raw
    if kind == "float":
        if type(raw) is int and abs(raw) <= _MAX_INT:
            return float(raw)
        if type(raw) is not float or not abs(raw) <= _MAX_INT:  # also NaN
            raise UnusualError
        return raw
    raise UnusualError  # pragma: no cover - a kind this table does not use


def normalize(record: str, raw: Any) -> dict[str, Any]:
    """`raw` as the full path would write it back: every field, in order, defaults filled in,
    unknown keys dropped, integers in float fields made floats. UnusualError when in doubt."""
    if type(raw) is not dict:
        raise UnusualError
    out: dict[str, Any] = {}
    for name, kind, default in SCHEMA[record]:
        if name in raw:
            out[name] = _value(kind, raw[name])
        elif kind in SCHEMA:
            out[name] = normalize(kind, {})
        else:
            out[name] = list(default) if isinstance(default, tuple) else default
    return out


def view(record: str, doc: dict[str, Any]) -> View:
    """The normalised JSON as objects shaped like the dataclasses (tuples; the phase a plain
    string and the verdict a plain int, as status_view reads them)."""
    fields: dict[str, Any] = {}
    for name, kind, _ in SCHEMA[record]:
        value = doc[name]
        base = kind.rstrip("?*")
        if value is None:
            pass
        elif kind.endswith("*"):
            value = tuple(view(base, v) if base in SCHEMA else v for v in value)
        elif base in SCHEMA:
            value = view(base, value)
        fields[name] = value
    return View(fields)


def _refuse_constant(name: str) -> Any:
    raise UnusualError


class _Decoding:
    """What json.JSONDecoder hands the C scanner: json.loads's defaults, NaN and Infinity
    refused (the full path refuses them too)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_refuse_constant)


_WHITESPACE = " \t\n\r"  # JSON's, as json.decoder's WHITESPACE pattern has it


def loads(text: bytes) -> Any:
    """json.loads(text) for UTF-8 text; UnusualError for anything json.loads would refuse, or
    might read differently (another encoding, a byte-order mark)."""
    try:
        string = text.decode("utf-8")
        if _json is None:  # pragma: no cover - see the import
            import json  # noqa: PLC0415

            return json.loads(string, parse_constant=_refuse_constant)
        start = len(string) - len(string.lstrip(_WHITESPACE))
        # typeshed types the context as a scanner; any object with JSONDecoder's attributes is
        value, end = _json.make_scanner(_Decoding)(string, start)  # type: ignore[arg-type]
    except Exception:  # any refusal: the full path reads the file and says why
        # (Malformed JSON: the scanner raises JSONDecodeError once json.decoder is imported,
        # Python 3.11's raises SystemError before that; NaN: _refuse_constant's UnusualError.)
        raise UnusualError from None
    if string[end:].strip(_WHITESPACE):
        raise UnusualError  # json.loads: "Extra data"
    return value


def parse_report(text: bytes) -> dict[str, Any]:
    """The status file's report, normalised; UnusualError for anything but a plain, valid one."""
    raw = loads(text)
    if type(raw) is not dict or not (
        type(raw.get("schema")) is int and 1 <= raw["schema"] <= SCHEMA_VERSION
    ):
        raise UnusualError
    return normalize("StatusReport", raw)


def read_small(path: str, limit: int, *, follow: bool = False) -> bytes:
    """read_regular (the config through a symlink when `follow`: NixOS links it); UnusualError
    when it is missing, unreadable or unusable (the full path says which)."""
    try:
        data, _ = read_regular(path, limit, follow=follow)
    except (OSError, UnusableFileError):
        raise UnusualError from None
    return data


def _runtime_dir_line(line: bytes) -> bytes | None:
    """VALUE of a line `runtime_dir = "VALUE"` (a basic string without escapes, spaces or tabs
    around, an optional comment after), or None for any other line."""
    key, eq, rest = line.partition(b"=")
    if not eq or key.strip(b" \t") != b"runtime_dir":
        return None
    rest = rest.lstrip(b" \t")
    if not rest.startswith(b'"'):
        return None
    value, quote, tail = rest[1:].partition(b'"')
    if not quote or b"\\" in value:
        return None
    tail = tail.lstrip(b" \t")
    return value if not tail or tail.startswith(b"#") else None


def guess_runtime_dir(config: bytes) -> str:
    """watchdog.runtime_dir as a simple scan of the config sees it; only a guess, which the
    status file it leads to must confirm (the report names the daemon's runtime_dir)."""
    if b"runtime_dir" not in config:
        return DEFAULT_RUNTIME_DIR
    found = [v for line in config.split(b"\n") if (v := _runtime_dir_line(line)) is not None]
    if len(found) != 1:
        raise UnusualError
    try:
        return found[0].decode("utf-8")
    except UnicodeDecodeError:  # not TOML at all: the full path says so
        raise UnusualError from None


def parse_args(argv: Sequence[str]) -> tuple[str, str | None, bool]:
    """(config, runtime_dir or None, --json) of `status`'s own options in their exact spelling;
    UnusualError for anything else (--help, an abbreviation, a repeated or unknown option)."""
    options: dict[str, str] = {}
    as_json = False
    rest = list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "--json" and not as_json:
            as_json = True
            continue
        name, eq, value = arg.partition("=")
        if name not in ("--config", "--runtime-dir") or name in options:
            raise UnusualError
        if not eq:
            if not rest or rest[0].startswith("-"):
                raise UnusualError
            value = rest.pop(0)
        if not value:
            raise UnusualError
        options[name] = value
    default = os.environ.get("HYDRA_WATCHDOG_CONFIG", DEFAULT_CONFIG_PATH)
    return options.get("--config", default), options.get("--runtime-dir"), as_json


def quick_status(argv: Sequence[str], now: float | None = None) -> int | None:
    """`hydra-watchdog status ARGV`'s exit code, having printed what the full path would print;
    None, having printed nothing, when only the full path can tell (see the module's doc)."""
    try:
        config_path, runtime_dir, as_json = parse_args(argv)
        config = read_small(config_path, MAX_CONFIG_BYTES, follow=True)
        directory = runtime_dir or guess_runtime_dir(config)
        doc = parse_report(read_small(os.path.join(directory, STATUS_FILE), STATUS_MAX_BYTES))
    except UnusualError:
        return None
    if not (
        doc["config_sha256"]
        and doc["config_sha256"] == sha256(config).hexdigest()
        and doc["version"] == __version__
        and doc["stale_after"] > 0
        and (runtime_dir is not None or doc["runtime_dir"] == directory)
    ):
        return None
    now = time.time() if now is None else now
    report: StatusReport = view("StatusReport", doc)  # type: ignore[assignment]
    gone = daemon_problem(report) if report.stopped_at is None else ""
    verdict, why = evaluate(report, wall_now=now, stale_after=report.stale_after, daemon=gone)
    return print_status(verdict, why, report, doc, "", as_json=as_json, now=now)
