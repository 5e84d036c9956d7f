"""What the policy remembers between cycles, and its JSON form (persisted by the daemon).

All times are monotonic seconds, as `now` is passed to decide(). The state file stores the boot
id beside them: after a reboot the clock starts over, and `rebased()` drops what no longer holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from hydra_watchdog.jsonable import from_jsonable as from_jsonable  # noqa: PLC0414 - re-export
from hydra_watchdog.jsonable import to_jsonable as to_jsonable  # noqa: PLC0414 - re-export
from hydra_watchdog.observation import Probe
from hydra_watchdog.states import Phase, Rule, Severity

STATE_VERSION = 1


class RestartOrigin(StrEnum):
    WATCHDOG = "watchdog"  # a start/restart the watchdog issued
    SYSTEMD = "systemd"  # systemd's Restart=, counted through NRestarts


@dataclass(frozen=True)
class RestartRecord:
    at: float
    by: RestartOrigin


class CanaryVerdict(StrEnum):
    """What the last 1-token completion said. It stands until a newer canary replaces it: a
    hang seen once is not forgotten because the next cycle ran no canary."""

    NONE = ""  # no canary yet
    OK = "ok"
    STALLED = "stalled"  # missed its deadline while /health was 200
    FAILED = "failed"  # answered with an error (HTTP 500, an error body): no completions either
    UNVERIFIED = "unverified"  # TabbyAPI was restarted after a bad verdict: a canary must pass


@dataclass(frozen=True)
class PermanentFailure:
    """A load that retrying cannot fix, and what it depended on when it failed: it holds until
    one of them is seen to change (what cannot be read this cycle has not changed). A new
    TabbyAPI process ends them all (policy._count_restarts)."""

    model: str
    detail: str  # TabbyAPI's words
    config: str = ""  # the model config
    folder: float | None = None  # the model folder's mtime (None: not read then)


@dataclass(frozen=True)
class PowerHold:
    """A power limit not to be set again before `until`: refused by the driver (retried
    hourly), or a dry run's "would set" (said hourly)."""

    gpu_index: int
    watts: float
    until: float


@dataclass(frozen=True)
class SystemSwitch:
    """A `nixos-rebuild switch` seen: the system link moved from one target to another."""

    at: float
    from_target: str
    to_target: str
    from_generation: int | None = None
    to_generation: int | None = None


@dataclass(frozen=True)
class Finding:
    """A diagnosis: a cause the watchdog found; shown by `status`, logged once when it appears.

    `key` names the cause (its rule and subject: a GPU, a pid, a port...): while the key stays,
    the finding is the same one even if its message carries new numbers."""

    rule: Rule
    severity: Severity
    message: str
    subject: str = ""

    @property
    def key(self) -> tuple[Rule, str]:
        return self.rule, self.subject


@dataclass(frozen=True)
class PolicyState:
    phase: Phase = Phase.UNKNOWN
    phase_since: float = 0.0
    # health streaks
    failures: int = 0  # consecutive probes that failed (refused/timeout/bad status)
    last_failure: str = ""
    slow_streak: int = 0
    last_canary_at: float | None = None
    canary_verdict: CanaryVerdict = CanaryVerdict.NONE
    canary_detail: str = ""
    canary_wait: str = ""  # what an UNVERIFIED verdict follows: "the load of M", "a restart"...
    observed_at: float | None = None  # the previous observation's time
    trouble_since: float | None = None  # the first unhealthy observation (or failing canary)
    cause: str = ""  # what the last decision rests on (a finding, or its action's evidence)
    # restarts and the loop
    restarts: tuple[RestartRecord, ...] = ()  # those that ran, inside restart_loop.window
    start_attempts: tuple[float, ...] = ()  # the watchdog's (re)starts issued: its budget
    nrestarts_seen: int | None = None  # last NRestarts, to count systemd's restarts by delta
    nrestarts_at: float | None = None  # when it was read (the unit may vanish in between)
    loop_invocation: str = ""  # TabbyAPI's process when the loop stopped it
    # TabbyAPI's process last seen (situation.process_replaced): systemd's InvocationID, and
    # "pid@start ticks" of its main process or, with no unit to ask, of its listener
    invocation_id: str = ""
    tabby_process: str = ""
    recovery_started: float | None = None  # a start/restart was issued; grace counts from here
    healthy_since: float | None = None
    backoff_step: int = 0  # 0: not in a loop; n: the n-th back-off wait
    backoff_until: float | None = None  # next start attempt not before this
    loop_since: float | None = None
    escalated: bool = False
    # model loads
    load_in_flight: str = ""  # model of the load issued and not yet finished
    load_started: float | None = None
    load_failures: int = 0
    next_load_at: float | None = None
    using_fallback: bool = False
    last_load_error: str = ""
    # loads that retrying cannot fix (HTTP 4xx, "no longer supported"...): not retried until
    # what they depend on changes (config, model folder, TabbyAPI's process)
    permanent: tuple[PermanentFailure, ...] = ()
    main_retry_at: float | None = None  # on the fallback: when to try the main model again
    # TabbyAPI answered a load with 401/403: the stamp of the admin key it refused (KeyView) and
    # its words. No load goes out while the key held has that stamp (admin_key_rejected).
    key_refused: str | None = None
    key_refused_detail: str = ""
    fallback_blocker: str = ""  # why the fallback: permanent, escalated, failures, unusable, vram
    # ExLlamaV2 libraries the last check found missing: remembered until a fresh check says fixed
    missing_libraries: tuple[str, ...] = ()
    libraries_checked_at: float | None = None
    library_misses: int = 0  # cycles of this outage that asked for the check and got none
    journal: tuple[str, ...] = ()  # this outage's last journal lines read (not read each cycle)
    unkillable: tuple[int, ...] = ()  # orphans that survived SIGKILL (start ticks ignored: pid)
    # power limits that failed (no permission, invalid...): reported once, retried only after
    # POWER_RETRY_AFTER, never every cycle
    power_denied: tuple[PowerHold, ...] = ()
    # a dry run's "would set" power limits: said again after POWER_RETRY_AFTER, not every cycle
    power_held: tuple[PowerHold, ...] = ()
    fallback_route_checked: bool = False
    fallback_route_ok: bool | None = None  # the last check's verdict (None: none this outage)
    fallback_route_detail: str = ""
    # NixOS rebuilds (rebuild.py): the system link last seen, the last switch, and the
    # libraries the running TabbyAPI's extension misses since (a restart would fail)
    system_target: str = ""
    system_generation: int | None = None
    last_switch: SystemSwitch | None = None
    will_fail: tuple[str, ...] = ()
    findings: tuple[Finding, ...] = ()
    # This outage's tabbyapi_down findings (their last policy.DOWN_TOLD_KEPT words): one that
    # went (the unit came up for a moment) and comes back in the same words is not news
    # (narrate). Cleared when the phase is HEALTHY again.
    down_told: tuple[Finding, ...] = ()
    wants: frozenset[Probe] = frozenset()  # expensive probes for the next cycle

    def permanent_failure(self, model: str) -> PermanentFailure | None:
        return next((p for p in self.permanent if p.model == model), None)

    def restarts_in_window(self, now: float, window: float, by: RestartOrigin | None = None) -> int:
        """Restarts less than `window` ago (as the window is trimmed)."""
        return sum(1 for r in self.restarts if now - r.at < window and (by is None or r.by == by))

    def rebased(self) -> PolicyState:
        """After a reboot: monotonic stamps are meaningless. Keep the back-off step (a loop
        that survived a reboot is still a loop), restart the wait from zero, forget the rest."""
        return PolicyState(
            backoff_step=self.backoff_step,
            load_failures=self.load_failures,
            using_fallback=self.using_fallback,
            escalated=self.escalated,
            # not a clock: booting into another generation is a switch seen at the first cycle
            system_target=self.system_target,
            system_generation=self.system_generation,
            backoff_until=0.0 if self.backoff_step else None,
            loop_since=0.0 if self.backoff_step else None,
        )


# --- JSON ---------------------------------------------------------------------------------------
# The generic codec lives in jsonable.py (light: `status` reads its file with it); re-exported.
