"""The status report: its records and its JSON form, the status file `hydra-watchdog status` reads.

The daemon builds one StatusReport per cycle (report/status_build.py) and writes it as JSON into
its runtime dir (report/status_file.py), where `status` reads it as any user. The JSON form is
documented field by field in docs/status-schema.md and versioned by `schema`: a reader ignores
fields it does not know and defaults fields it misses, so adding a field keeps the version;
renaming or changing the meaning of one bumps it. All times are wall-clock seconds since the
epoch: other processes and humans read them.

The records are declared once, as annotated classes, and `Record` makes the annotations the check
every report passes, whether the daemon built it or `status` read it from a file: every number
finite and within 2**63, every string valid UTF-8, every nested value of its declared kind. So a
report that exists renders without an exception, and a file that is garbage (NaN, huge numbers,
deep nesting, bad UTF-8) is a ValueError saying what is wrong, never a traceback.

Why not dataclasses: `status` runs every few seconds from monitoring and imports this module
each time. Importing dataclasses (which imports inspect) and creating a dozen frozen dataclasses
cost it more than everything else it does (measured: `python -c pass` 18 ms, plus 17 ms for
them). The phase is a plain string and the verdict the Nagios exit code, for the same reason
(states.py's enums cost 3 ms more); status_build.py fills them from states.Phase.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator, Mapping

from hydra_watchdog.printable import cut

SCHEMA_VERSION = 1
_MAX_INT = 2**63  # bytes, pids, counts; beyond it a number is garbage (and overflows a float)
VERDICT_NAMES = ("OK", "WARNING", "CRITICAL", "UNKNOWN")  # states.Verdict, by exit code
# states.Phase's values (a test keeps them equal), for the same reason
PHASES = frozenset(
    {"unknown", "starting", "healthy", "degraded", "no_model", "loading", "down", "recovering"}
    | {"backoff", "escalated", "blocked", "paused"}
)

Check = Callable[[object, str], object]


def _number(value: object, where: str, *, integer: bool) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where} is not a number")
    if isinstance(value, float) and (not math.isfinite(value) or integer):
        raise ValueError(
            f"{where} = {value!r} is not a usable {'integer' if integer else 'number'}"
        )
    if abs(value) > _MAX_INT:
        raise ValueError(f"{where} = {cut(str(value), 40)} is not a usable number")
    return int(value) if integer else float(value)


def _text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where} is not text")
    try:
        value.encode("utf-8")  # a lone surrogate (from a \\ud800 escape) is not text
    except UnicodeEncodeError:
        raise ValueError(f"{where} is not valid UTF-8 text") from None
    return str(value)  # a StrEnum member becomes its plain value


def _flag(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where} is not true or false")
    return value


_PLAIN: dict[str, Check] = {
    "str": _text,
    "bool": _flag,
    "int": lambda v, where: _number(v, where, integer=True),
    "float": lambda v, where: _number(v, where, integer=False),
}


def _kind(annotation: str, names: Mapping[str, object]) -> Check:
    """The check of one annotation: a plain type, a Record, `X | None` or `tuple[X, ...]`."""
    text = annotation.strip()
    if text.endswith("| None"):
        inner = _kind(text[: -len("| None")], names)
        return lambda v, where: None if v is None else inner(v, where)
    if text.startswith("tuple[") and text.endswith(", ...]"):
        item = _kind(text[len("tuple[") : -len(", ...]")], names)

        def items(v: object, where: str) -> tuple[object, ...]:
            if not isinstance(v, list | tuple):
                raise ValueError(f"{where} is not a list")
            return tuple(item(x, f"{where}[{i}]") for i, x in enumerate(v))

        return items
    if text in _PLAIN:
        return _PLAIN[text]
    record = names.get(text)  # the records this module defined above
    if isinstance(record, type) and issubclass(record, Record):
        return record.check
    raise TypeError(f"a status record cannot hold a {text!r}")  # a schema bug: fails at import


class Record:
    """A frozen record whose fields are its class annotations, in order, with their defaults.

    Built with keywords (each value checked, unknown names refused); a nested record may also be
    given as its JSON object (unknown keys ignored, missing ones defaulted)."""

    _fields: tuple[tuple[str, Check, object], ...] = ()

    def __init_subclass__(cls) -> None:
        names = vars(sys.modules[cls.__module__])
        cls._fields = tuple(
            (name, _kind(annotation, names), getattr(cls, name))
            # not inspect.get_annotations: importing inspect costs `status` more than it all
            for name, annotation in cls.__dict__.get("__annotations__", {}).items()  # noqa: RUF063
        )

    def __init__(self, **values: object) -> None:
        unknown = set(values) - set(self.field_names())
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {', '.join(sorted(unknown))}")
        self._set(values, "")

    def _set(self, values: Mapping[str, object], where: str) -> None:
        for name, check, default in self._fields:
            here = f"{where}.{name}" if where else name
            value = check(values[name], here) if name in values else default
            object.__setattr__(self, name, value)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(name for name, _, _ in cls._fields)

    @classmethod
    def check(cls, value: object, where: str) -> Record:
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where} is not an object")
        record: Record = cls.__new__(cls)
        record._set(value, where)
        return record

    def values(self) -> Iterator[tuple[str, object]]:
        return ((name, getattr(self, name)) for name, _, _ in self._fields)

    def to_jsonable(self) -> dict[str, object]:
        return {name: _jsonable(value) for name, value in self.values()}

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record) or type(other) is not type(self):
            return NotImplemented
        return tuple(self.values()) == tuple(other.values())

    def __hash__(self) -> int:
        return hash(tuple(self.values()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.values())})"


def _jsonable(value: object) -> object:
    if isinstance(value, Record):
        return value.to_jsonable()
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


class HealthInfo(Record):
    outcome: str = ""  # observation.Outcome value: ok, refused, timeout, http_error, ...
    healthy: bool = False
    status: int | None = None
    latency_s: float = 0.0
    detail: str = ""


class ModelInfo(Record):
    wanted: str = ""  # the model the watchdog keeps loaded now (the fallback while in use)
    loaded: str | None = None
    known: bool = False  # False: /v1/model was not read (then `loaded` means nothing)
    fallback: str = ""
    fallback_in_use: bool = False
    vram_needed_bytes: int | None = None  # summed over the GPUs
    vram_needed_source: str = ""  # "config", "estimate" or "" (unknown)


class LoadInfo(Record):
    model: str = ""
    started_at: float | None = None
    deadline_at: float | None = None
    module: int = 0
    modules: int = 0


class GpuInfo(Record):
    index: int = 0
    uuid: str = ""
    name: str = ""
    vram_used_bytes: int | None = None
    vram_free_bytes: int | None = None
    vram_total_bytes: int | None = None
    power_limit_w: float | None = None  # the limit in force now
    power_target_w: float | None = None  # the configured limit (None: left alone)
    power_usage_w: float | None = None
    temperature_c: int | None = None
    errors: tuple[str, ...] = ()  # "what: why" for each read that failed


class UnitInfo(Record):
    name: str = ""
    available: bool = False
    active_state: str = ""
    sub_state: str = ""
    result: str = ""
    n_restarts: int | None = None
    main_pid: int | None = None
    detail: str = ""


class ListenerInfo(Record):
    port: int = 0
    pid: int | None = None
    role: str = ""  # observation.ProcessRole value when the owner is known
    command: str = ""


class ProcessEntry(Record):
    pid: int = 0
    role: str = ""  # orphan or foreign
    command: str = ""
    gpu_bytes: int = 0


class ActionEntry(Record):
    at: float = 0.0
    event: str = ""  # action, action_failed or action_refused
    action: str = ""
    message: str = ""
    rule: str = ""
    reason: str = ""
    # How an action that runs on after its event (a model load) ended, from its end event: ok,
    # failed or cancelled; "" while it runs, when its end is not known, or for other actions.
    outcome: str = ""
    ended_at: float | None = None
    duration_s: float | None = None  # how long it ran, as the end event says


class BackoffInfo(Record):
    step: int = 0
    next_attempt_at: float | None = None
    loop_since: float | None = None
    escalated: bool = False
    restarts_in_window: int = 0
    restarts_by_watchdog: int = 0
    restarts_by_systemd: int = 0
    window_s: float = 0.0


class PauseInfo(Record):
    paused: bool = False
    reason: str = ""
    until: float | None = None


class FindingEntry(Record):
    rule: str = ""
    severity: str = ""
    message: str = ""


class StatusReport(Record):
    schema: int = SCHEMA_VERSION
    generated_at: float = 0.0
    pid: int = 0
    pid_start: int | None = None  # the daemon's start time (/proc/PID/stat, ticks since boot)
    heartbeat: float | None = None  # wall time of the last completed cycle's observation
    stopped_at: float | None = None  # set by a clean stop: the daemon is gone on purpose
    phase: str = "unknown"  # a states.Phase value
    since: float | None = None
    verdict: int = 3  # states.Verdict: the Nagios exit code (0..3, checked by from_json)
    summary: str = ""
    dry_run: bool = False
    health: HealthInfo | None = None
    model: ModelInfo = ModelInfo()
    load: LoadInfo | None = None
    gpus: tuple[GpuInfo, ...] = ()
    gpu_error: str = ""
    unit: UnitInfo | None = None
    listeners: tuple[ListenerInfo, ...] = ()
    processes: tuple[ProcessEntry, ...] = ()
    actions: tuple[ActionEntry, ...] = ()
    actions_not_shown: int = 0  # earlier actions of the kept events, cut from `actions`
    backoff: BackoffInfo = BackoffInfo()
    paused: PauseInfo = PauseInfo()
    findings: tuple[FindingEntry, ...] = ()
    # What `status` needs of the daemon's config, so that it need not parse the config to find
    # the report (report/status_file.py): trusted only for the very config file the daemon read.
    version: str = ""  # the daemon's hydra-watchdog version
    config_sha256: str = ""  # of the config file's bytes; "" when not loaded from a file
    config_file: str = ""  # that file's identity (config.file_identity); "" as above
    runtime_dir: str = ""  # watchdog.runtime_dir
    stale_after: float = 0.0  # see status_build.stale_after(); 0: not published


def replace(report: StatusReport, **changes: object) -> StatusReport:
    """`report` with `changes` (checked as any field is)."""
    return StatusReport(**{**dict(report.values()), **changes})


# --- JSON ---------------------------------------------------------------------------------------


def to_json(report: StatusReport) -> str:
    # Compact: json's C encoder serves only indent=None; the status file is rewritten every
    # cycle, and `status --json` prints it indented for people anyway.
    return json.dumps(report.to_jsonable(), separators=(",", ":")) + "\n"


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not a number a status can hold")


def from_json(text: str | bytes) -> StatusReport:
    """Parse a status file; ValueError saying what is wrong with it (never another exception)."""
    try:
        raw = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError("the status file is not valid JSON (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"the status file is not valid JSON ({cut(str(exc), 200)})") from None
    if not isinstance(raw, dict):
        raise ValueError("the status file does not hold a JSON object")
    schema = raw.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool):
        raise ValueError(
            "the status file has no integer 'schema' field: not a hydra-watchdog status"
        )
    if schema > SCHEMA_VERSION:
        raise ValueError(
            f"the status file uses schema {cut(str(schema), 40)}; this hydra-watchdog reads schema "
            f"{SCHEMA_VERSION}: upgrade the CLI to match the daemon"
        )
    if schema < 1:
        raise ValueError(f"the status file has an invalid schema {cut(str(schema), 40)}")
    try:
        report = StatusReport(**{k: raw[k] for k in StatusReport.field_names() if k in raw})
        if report.verdict not in range(len(VERDICT_NAMES)):
            raise ValueError(f"verdict = {report.verdict} is not a Nagios exit code")
        if report.phase not in PHASES:
            raise ValueError(f"phase = {cut(report.phase, 40)!r} is not a phase")
    except (ValueError, TypeError, RecursionError) as exc:
        why = cut(str(exc), 200)
        raise ValueError(f"the status file does not match schema {SCHEMA_VERSION}: {why}") from None
    return report
