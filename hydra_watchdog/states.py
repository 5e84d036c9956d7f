"""The watchdog's phases, the runbook rules that move between them, and their severities.

No dependencies, like supervisor's states.py: everything else imports these names.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class Verdict(IntEnum):
    """Nagios plugin exit codes, used by `status`, `check` and `verify`."""

    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3


class Phase(StrEnum):
    UNKNOWN = "unknown"  # no observation yet
    STARTING = "starting"  # unit (re)started, inside startup_grace: refused is expected
    HEALTHY = "healthy"  # /health 200, the wanted model loaded
    DEGRADED = "degraded"  # healthy but slow: diagnose, never restart for that alone
    NO_MODEL = "no_model"  # healthy, no model loaded: a load is due (or refused, with reason)
    LOADING = "loading"  # a model load is in flight
    DOWN = "down"  # unreachable or sticky-unhealthy: remediation under way
    RECOVERING = "recovering"  # remediation issued; waiting out startup_grace, then verify
    BACKOFF = "backoff"  # restart loop: unit stopped, one start per back-off step
    ESCALATED = "escalated"  # in a loop longer than escalate_after: a human is needed
    BLOCKED = "blocked"  # a cause the watchdog must not fix (foreign holder, no mount, no library)
    PAUSED = "paused"  # maintenance mode: observe only

    @property
    def verdict(self) -> Verdict:
        return _VERDICTS[self]


_VERDICTS = {
    Phase.UNKNOWN: Verdict.UNKNOWN,
    Phase.STARTING: Verdict.WARNING,
    Phase.HEALTHY: Verdict.OK,
    Phase.DEGRADED: Verdict.WARNING,
    Phase.NO_MODEL: Verdict.WARNING,
    Phase.LOADING: Verdict.WARNING,
    Phase.DOWN: Verdict.CRITICAL,
    Phase.RECOVERING: Verdict.WARNING,
    Phase.BACKOFF: Verdict.CRITICAL,
    Phase.ESCALATED: Verdict.CRITICAL,
    Phase.BLOCKED: Verdict.CRITICAL,
    Phase.PAUSED: Verdict.WARNING,
}


class Rule(StrEnum):
    """Which runbook rule fired. Values are public: journald HYDRA_RULE, metrics, status JSON."""

    DOWN = "tabbyapi_down"  # RUNBOOK: TabbyAPIDown
    STARTING = "tabbyapi_starting"  # refused inside startup_grace while the unit is active
    STICKY_UNHEALTHY = "sticky_unhealthy"  # /health 503 never clears: restart
    GENERATION_HANG = "generation_hang"  # /health 200, completions stall or fail (the canary)
    # a restart or a load: no 1-token completion has passed since, so not yet called healthy
    CANARY_PENDING = "canary_pending"
    NO_MODEL = "no_model"  # RUNBOOK: TabbyAPINoModel
    VRAM_CHECK = "vram_check"  # RUNBOOK: Before Loading Large Models
    LOAD_FAILED = "load_failed"
    FALLBACK_MODEL = "fallback_model"  # RUNBOOK: Escalation 3, load a smaller model
    RESTART_LOOP = "restart_loop"  # RUNBOOK: TabbyAPIRestartLoop
    BACKOFF_ATTEMPT = "backoff_attempt"
    BACKOFF_RESET = "backoff_reset"
    SLOW_HEALTH = "slow_health"  # RUNBOOK: TabbyAPISlowHealthCheck
    POWER_LIMIT = "power_limit"  # RUNBOOK: Set power limits before heavy load
    PORT_CONFLICT = "port_conflict"  # RUNBOOK: Port conflict with zombie process
    ORPHAN_CLEANUP = "orphan_cleanup"  # RUNBOOK: Clear orphan processes
    FULL_RECOVERY = "full_recovery"  # RUNBOOK: Full Service Recovery
    MISSING_LIBRARIES = "missing_libraries"  # RUNBOOK: Library path issues after NixOS rebuild
    # this outage's library check: awaited before any (re)start, or it could not run
    LIBRARY_CHECK = "library_check"
    # the running TabbyAPI keeps its old libraries, but its extension now misses some: a restart
    # would fail (after a NixOS rebuild); only a real outage is acted on
    RESTART_WILL_FAIL = "restart_will_fail"
    SYSTEM_SWITCHED = "system_switched"  # RUNBOOK: review recent changes (a nixos-rebuild switch)
    MODELS_MOUNT = "models_mount"  # RUNBOOK: Check /mnt/models mount is working
    FOREIGN_HOLDER = "foreign_holder"  # a non-TabbyAPI process in the way: report, never kill
    ADMIN_KEY_REJECTED = "admin_key_rejected"  # TabbyAPI answers 401/403: loads are impossible
    UNKILLABLE_ORPHAN = "unkillable_orphan"  # an orphan survived SIGKILL: restarts cannot help
    KEY_WITHHELD = "key_withheld"  # the port's listener is not verified as TabbyAPI: no key sent
    ESCALATION = "escalation"  # RUNBOOK: Escalation (unresolved for escalate_after)
    FALLBACK_ROUTE = "fallback_route"  # RUNBOOK: LiteLLM Fallback Verification
    PAUSED = "paused"  # maintenance mode
    RECOVERED = "recovered"
    WATCHDOG_IMPAIRED = "watchdog_impaired"  # its own fds/memory/threads ran out: no evidence
    SYSTEMD_UNAVAILABLE = "systemd_unavailable"  # PID 1 cannot be asked: no unit commands


class Severity(StrEnum):
    """journald PRIORITY names; `priority` gives the syslog number."""

    DEBUG = "debug"
    INFO = "info"
    NOTICE = "notice"
    WARNING = "warning"
    ERR = "err"
    CRIT = "crit"

    @property
    def priority(self) -> int:
        return {"debug": 7, "info": 6, "notice": 5, "warning": 4, "err": 3, "crit": 2}[self.value]
