"""Events: what the daemon tells humans (journald, `events`, status). One kind, one MESSAGE_ID."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from hydra_watchdog.states import Phase, Rule, Severity


class EventKind(StrEnum):
    """Public names (HYDRA_EVENT); each has a stable MESSAGE_ID and a journal catalog entry."""

    STARTED = "watchdog_started"
    STOPPING = "watchdog_stopping"
    STATE_CHANGED = "state_changed"
    DIAGNOSIS = "diagnosis"  # a finding (cause) appeared
    ACTION = "action"  # an action ran and succeeded (or would have, in dry-run)
    ACTION_FAILED = "action_failed"
    ACTION_REFUSED = "action_refused"  # a safety check said no
    RESTART_LOOP = "restart_loop"
    ESCALATED = "escalated"
    RECOVERED = "recovered"
    LOAD_PROGRESS = "load_progress"
    LOAD_FAILED = "load_failed"  # each failed or cancelled load, with TabbyAPI's error
    MODEL_LOADED = "model_loaded"  # a load of ours ended with the model confirmed loaded
    ADMIN_KEY_REJECTED = "admin_key_rejected"  # TabbyAPI answered 401/403 to the admin key
    GENERATION_HANG = "generation_hang"  # completions stall or fail while /health is 200
    PAUSED = "paused"
    RESUMED = "resumed"
    CONFIG_RELOADED = "config_reloaded"
    CONFIG_REJECTED = "config_rejected"
    SYSTEM_SWITCHED = "system_switched"  # a nixos-rebuild switch, and what the checks found


@dataclass(frozen=True)
class Event:
    wall: float  # time.time(): events are read by humans and other processes
    kind: EventKind
    severity: Severity
    message: str
    state: Phase
    rule: Rule | None = None
    action: str = ""  # actions.action_name()
    reason: str = ""  # the evidence
    unit: str = ""  # set on records about TabbyAPI's unit (-> OBJECT_SYSTEMD_UNIT)
    fields: tuple[tuple[str, str], ...] = ()  # extra journald fields: GPU_INDEX, TARGET_PID, ...


def headline(event: Event) -> str:
    """An event as a reader sees it on a screen (the demo, the daemon's console): its kind, the
    [rule] that decided it, its message."""
    rule = f" [{event.rule.value}]" if event.rule else ""
    return f"{event.kind.value:<15}{rule} {event.message}"
