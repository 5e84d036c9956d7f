"""One frozen snapshot of the node per cycle: what the probes saw, never how they saw it.

Probes (hydra_watchdog/adapters/) build these; the pure policy reads them. Times are monotonic
seconds (time.monotonic()), sizes bytes, power watts. `None` means "not read" (not probed this
cycle, or the read failed: the matching error field says why) and is never a guess.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from hydra_watchdog.printable import printable

if TYPE_CHECKING:
    from hydra_watchdog.actions import ActionResult


class Outcome(StrEnum):
    """How an HTTP probe ended: the one error vocabulary of the TabbyAPI client."""

    OK = "ok"
    REFUSED = "refused"  # nothing listening (or connection reset before an answer)
    TIMEOUT = "timeout"  # the total deadline passed (hung, trickling, slow)
    HTTP_ERROR = "http_error"  # an HTTP status that is not the expected one
    BAD_BODY = "bad_body"  # malformed JSON, wrong content type or shape, protocol garbage
    UNAUTHORIZED = "unauthorized"  # 401/403: the admin key is missing or wrong
    WITHHELD = "withheld"  # not sent: the port's listener is not verified as TabbyAPI
    # The watchdog itself could not probe (out of descriptors, memory or threads): no evidence
    # about TabbyAPI either way, never counted as a failed probe.
    LOCAL_ERROR = "local_error"


_LOCAL_ERRNOS = {
    errno.EMFILE: "the watchdog is out of file descriptors (EMFILE)",
    errno.ENFILE: "the system is out of file descriptors (ENFILE)",
    errno.ENOMEM: "the watchdog is out of memory (ENOMEM)",
    errno.ENOBUFS: "the system is out of socket buffers (ENOBUFS)",
}


def local_failure(exc: BaseException) -> str:
    """Why `exc` is the watchdog's own resource failure, or "" when it is not one.

    HTTP libraries wrap the OSError (httpx.ConnectError from httpcore.ConnectError from
    OSError(EMFILE)), so the whole __cause__/__context__ chain is searched.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _LOCAL_ERRNOS:
            return _LOCAL_ERRNOS[current.errno]
        if isinstance(current, MemoryError):
            return "the watchdog is out of memory"
        current = current.__cause__ or current.__context__
    return ""


@dataclass(frozen=True)
class HttpResult:
    outcome: Outcome
    latency_s: float
    status: int | None = None
    detail: str = ""  # for humans; never contains a key


@dataclass(frozen=True)
class Health:
    """GET /health. `unhealthy_issues` non-empty only for TabbyAPI's sticky 503."""

    result: HttpResult
    healthy: bool
    unhealthy_issues: tuple[str, ...] = ()

    @property
    def sticky_unhealthy(self) -> bool:
        return self.result.status == 503 and self.result.outcome is Outcome.HTTP_ERROR


@dataclass(frozen=True)
class ModelStatus:
    """GET /v1/model. `loaded` is the model id; None with known=True means "no model loaded".

    fresh=False: not asked this cycle; the last answer, at most a minute old (observe.py asks
    less often while no model is loaded: each ask writes an ERROR line into TabbyAPI's log)."""

    result: HttpResult
    loaded: str | None
    known: bool
    fresh: bool = True


@dataclass(frozen=True)
class KeyView:
    """The admin key the client holds now, for the policy and messages; never the key itself."""

    source: str  # where it is read from, for messages ("the file /etc/x"); "": none configured
    stamp: str = ""  # what was read (the file's identity); another stamp is another key
    problem: str = ""  # why no key could be read ("" : read, or none configured)
    live: bool = True  # a change of the source is read without a restart (a credential: not)


@dataclass(frozen=True)
class Canary:
    """A 1-token POST /v1/completions with a deadline."""

    result: HttpResult


class NvmlErrorKind(StrEnum):
    NO_PERMISSION = "no_permission"
    NOT_SUPPORTED = "not_supported"
    GPU_LOST = "gpu_lost"
    DRIVER_NOT_LOADED = "driver_not_loaded"
    LIBRARY_NOT_FOUND = "library_not_found"
    FUNCTION_NOT_FOUND = "function_not_found"
    LIBRARY_MISMATCH = "library_mismatch"
    NOT_FOUND = "not_found"  # the configured index/UUID does not exist
    INVALID_ARGUMENT = "invalid_argument"
    TIMEOUT = "timeout"  # the call did not return within gpu.call_timeout
    OTHER = "other"


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_bytes: int | None


@dataclass(frozen=True)
class PowerInfo:
    usage_w: float | None = None
    limit_w: float | None = None
    enforced_w: float | None = None
    min_w: float | None = None
    max_w: float | None = None
    default_w: float | None = None


@dataclass(frozen=True)
class GpuSnapshot:
    index: int
    uuid: str
    name: str
    memory_total: int | None = None
    memory_used: int | None = None
    memory_free: int | None = None
    processes: tuple[GpuProcess, ...] = ()
    power: PowerInfo = field(default_factory=PowerInfo)
    temperature_c: int | None = None
    utilization_pct: int | None = None
    throttle_reasons: tuple[str, ...] = ()  # decoded clock-event reason names
    errors: tuple[tuple[str, NvmlErrorKind], ...] = ()  # (what was read, why it failed)


@dataclass(frozen=True)
class GpuReport:
    devices: tuple[GpuSnapshot, ...] = ()
    error: NvmlErrorKind | None = None  # the whole probe failed (init, library)
    detail: str = ""


class ProcessRole(StrEnum):
    MAIN = "main"  # the unit's MainPID
    UNIT = "unit"  # in the unit's current cgroup
    # TabbyAPI's program (from its install tree), TabbyAPI's uid, our PID namespace, outside
    # the unit's cgroup: adapters/identity.py
    ORPHAN = "orphan"
    FOREIGN = "foreign"  # anything else: reported, never signalled


@dataclass(frozen=True)
class ProcessInfo:
    """A process worth knowing about. (pid, start_ticks, cmdline, uid) is its identity: an
    actuator re-reads them before it signals, so a reused PID is never hit."""

    pid: int
    start_time: float  # seconds since the epoch, for display (a wall-clock step moves it)
    cmdline: tuple[str, ...]
    role: ProcessRole
    gpu_bytes: int = 0  # memory it holds on the configured GPUs
    listens_on: tuple[int, ...] = ()  # of the ports we watch (port, port+1)
    start_ticks: int = 0  # /proc/PID/stat starttime: clock ticks after boot, the identity
    uid: int | None = None  # its real uid
    # TabbyAPI's program from its install tree, run by a uid that is not TabbyAPI's
    # (tabbyapi.user, or the unit's User=): foreign, and most likely a user setting to fix
    wrong_user: bool = False

    @property
    def command(self) -> str:
        """The command line for people to read, control characters escaped (any process
        can put a newline and a forged log record in its argv); identity uses `cmdline`."""
        return printable(" ".join(self.cmdline))


@dataclass(frozen=True)
class Listener:
    port: int
    pid: int | None  # None: a LISTEN socket whose owner we could not see


@dataclass(frozen=True)
class PortReport:
    port: int  # the configured port; port + 1 is watched too (TabbyAPI moves there when busy)
    listeners: tuple[Listener, ...] = ()
    full_scan: bool = False  # owners were searched host-wide, not only among the unit's PIDs

    def owners(self, port: int) -> tuple[int | None, ...]:
        return tuple(lst.pid for lst in self.listeners if lst.port == port)


class ActiveState(StrEnum):
    """systemd's ActiveState values. UnitStatus keeps the string systemd sent (a state a newer
    systemd adds must not crash the probe); compare it with these."""

    ACTIVE = "active"
    RELOADING = "reloading"
    INACTIVE = "inactive"
    FAILED = "failed"
    ACTIVATING = "activating"
    DEACTIVATING = "deactivating"


@dataclass(frozen=True)
class UnitStatus:
    """`systemctl show` of the TabbyAPI unit. available=False: no systemd to ask (detail says)."""

    name: str
    available: bool
    load_state: str = ""  # "loaded", "not-found", ...
    active_state: str = ""  # active, activating, deactivating, inactive, failed, reloading
    sub_state: str = ""
    result: str = ""  # success, exit-code, signal, core-dump, oom-kill, timeout, start-limit-hit
    n_restarts: int | None = None
    main_pid: int | None = None
    control_group: str = ""
    user: str = ""  # User= ("" : root)
    invocation_id: str = ""
    exec_main_status: int | None = None
    active_enter_mono: float | None = None  # seconds, CLOCK_MONOTONIC like `now`
    job_id: int | None = None  # a job systemd has queued or runs for the unit (None: none)
    # ExecStart= as systemd resolved it: the executable's path and the argv it gets; and
    # WorkingDirectory= ("" : unset; "!/x" : may be missing; "~" : the user's home). What TabbyAPI's
    # own program is (adapters/identity.py); () and "" where not read.
    exec_path: str = ""
    exec_argv: tuple[str, ...] = ()
    working_directory: str = ""
    detail: str = ""
    # How it was read: "D-Bus", or "systemctl" (with why D-Bus was not used, when it failed).
    read_via: str = ""

    @property
    def exists(self) -> bool:
        return self.available and self.load_state not in ("", "not-found")


@dataclass(frozen=True)
class ModelDir:
    name: str
    path: str
    exists: bool
    has_config: bool = False
    weight_files: int = 0  # *.safetensors
    size_bytes: int = 0
    detail: str = ""
    mtime: float | None = (
        None  # the folder's: a changed folder may make a failed load worth retrying
    )

    @property
    def usable(self) -> bool:
        return self.exists and self.has_config and self.weight_files > 0


@dataclass(frozen=True)
class HostReport:
    models_dir_ok: bool | None  # None: not checked (the check did not answer in time)
    models_dir_detail: str = ""  # why not ok: "missing", "not a mount point", "not readable"
    model: ModelDir | None = None
    fallback: ModelDir | None = None
    missing_libraries: tuple[str, ...] | None = None  # None: not checked this cycle
    libraries_detail: str = ""  # why the check could not run (no venv, no extension, ldd hung)
    libraries_checked: bool = False  # the check ran this cycle (its answer may be "unknown")
    journal_excerpt: tuple[str, ...] | None = None  # None: not read this cycle


@dataclass(frozen=True)
class SystemLink:
    """The NixOS system link (nixos.current_system) as read this cycle."""

    path: str
    target: str | None  # None: no such link (not NixOS) or unreadable (detail says)
    generation: int | None = None  # N of the system-N-link pointing at target
    detail: str = ""

    @property
    def label(self) -> str:
        where = self.target or "nothing"
        return where if self.generation is None else f"generation {self.generation} ({where})"


@dataclass(frozen=True)
class PauseRequest:
    reason: str
    until: float | None  # monotonic; None: until `resume`
    # No operator's pause but the watchdog's: the pause state could not be read or trusted (an
    # operator's pause may stand there), so it observes only until it can read it again.
    unreadable: bool = False

    def active(self, now: float) -> bool:
        return self.until is None or self.until > now


@dataclass(frozen=True)
class LoadProgress:
    """A model load in flight, as the load actuator reports it."""

    model: str
    started_at: float
    module: int = 0
    modules: int = 0


class Probe(StrEnum):
    """Expensive probes the policy asks for; the daemon runs them only when asked."""

    CANARY = "canary"
    PORT_SCAN = "port_scan"  # host-wide owner search for the port listeners
    LIBRARIES = "libraries"  # ldd on the ExLlamaV2 extension
    JOURNAL = "journal"  # the unit's last journal lines
    MODEL = "model"  # GET /v1/model now, not the answer of up to a minute ago (observe.py)


@dataclass(frozen=True)
class Observation:
    at: float
    health: Health  # the cycle's verdict (observe.judge_probes): the first /health probe's, or
    # the healthy answer of one of its confirming probes
    unit: UnitStatus
    host: HostReport
    model: ModelStatus | None = None
    canary: Canary | None = None
    gpus: GpuReport = field(default_factory=GpuReport)
    port: PortReport | None = None
    processes: tuple[ProcessInfo, ...] = ()
    load: LoadProgress | None = None
    results: tuple[ActionResult, ...] = ()  # actions finished since the previous cycle
    pause: PauseRequest | None = None
    system: SystemLink | None = None  # None: not watched (nixos.current_system empty)
    # Confirming /health probes sent in this cycle while the first went unanswered, that failed
    # as well: each counts as one more consecutive failed probe (failures_before_down).
    confirmations_failed: int = 0
    admin_key: KeyView | None = None  # None: not reported (an adapter that holds no key)

    def process(self, pid: int) -> ProcessInfo | None:
        return next((p for p in self.processes if p.pid == pid), None)
