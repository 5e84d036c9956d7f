"""NixOS rebuilds in the policy's memory: the switches seen, and what they broke.

Pure, like the policy that calls `track` once per cycle (before restarts are counted, so the
unit's previous invocation is still known):

* a new target of the system link is a `SystemSwitch` (old -> new, with generations);
* a library check that finds missing libraries while TabbyAPI's process runs and has served
  means that process has its libraries mapped from before the switch, but the next start will
  not: `will_fail` holds them until a check finds none, or the process is gone or replaced;
* the first failed probe of an outage is remembered, to say how long after a switch it came.
"""

from __future__ import annotations

from dataclasses import replace

from hydra_watchdog.durations import format_duration
from hydra_watchdog.observation import Observation, Outcome
from hydra_watchdog.policy_state import CanaryVerdict, PolicyState, SystemSwitch
from hydra_watchdog.situation import process_replaced, tabby_runs


def track(s: PolicyState, obs: Observation, now: float) -> PolicyState:
    s = _track_system(s, obs, now)
    s = _track_libraries(s, obs)
    if obs.health.healthy:
        # Completions that fail are trouble too, though /health says 200 (policy._track_health).
        failing = s.canary_verdict in (CanaryVerdict.STALLED, CanaryVerdict.FAILED)
        return replace(s, trouble_since=None) if s.trouble_since is not None and not failing else s
    if obs.health.result.outcome is not Outcome.LOCAL_ERROR and s.trouble_since is None:
        return replace(s, trouble_since=now)
    return s


def _track_system(s: PolicyState, obs: Observation, now: float) -> PolicyState:
    link = obs.system
    if link is None or link.target is None or link.target == s.system_target:
        return s
    if not s.system_target:  # the first target ever seen: the baseline, not a switch
        return replace(s, system_target=link.target, system_generation=link.generation)
    switch = SystemSwitch(now, s.system_target, link.target, s.system_generation, link.generation)
    return replace(
        s, system_target=link.target, system_generation=link.generation, last_switch=switch
    )


def _track_libraries(s: PolicyState, obs: Observation) -> PolicyState:
    replaced = process_replaced(s, obs)
    if not tabby_runs(obs) or replaced:
        # Gone: a start is a real start, and the blocking check (missing_libraries) decides.
        # Replaced: the new process started with today's libraries, so they resolve.
        return replace(s, will_fail=()) if s.will_fail else s
    missing = obs.host.missing_libraries
    if missing is None or missing == s.will_fail:
        return s
    # Only a process that has served (its extension is loaded) keeps the old libraries: one
    # that never answered, e.g. crash-looping on them, is the plain missing_libraries case.
    served = obs.health.result.outcome in (Outcome.OK, Outcome.HTTP_ERROR)
    if missing and not (served or s.will_fail):
        return s
    return replace(s, will_fail=missing)


def switch_label(switch: SystemSwitch) -> str:
    def name(target: str, generation: int | None) -> str:
        return target if generation is None else f"generation {generation}"

    return (
        f"{name(switch.from_target, switch.from_generation)} -> "
        f"{name(switch.to_target, switch.to_generation)}"
    )


def switch_before_trouble(s: PolicyState, within: float) -> tuple[SystemSwitch, float] | None:
    """The last switch and how long before the current outage's first failure it happened,
    when that is at most `within` (escalate_after): the runbook's "review recent changes"."""
    switch, first = s.last_switch, s.trouble_since
    if switch is None or first is None:
        return None
    before = first - switch.at
    if 0 <= before <= within:
        return switch, before
    return None


def ago(seconds: float) -> str:
    return format_duration(round(seconds, 1) if seconds < 60 else round(seconds))


def checks_after_switch(s: PolicyState, obs: Observation) -> str:
    """What the checks run at the switch found, for the `system_switched` event."""
    host, libs = obs.host, obs.host.missing_libraries
    if libs is None:
        lib_text = f"libraries unknown ({host.libraries_detail or 'not checked'})"
    elif libs:
        lib_text = f"libraries MISSING: {', '.join(libs)}"
        lib_text += " (restart_will_fail)" if s.will_fail else ""
    else:
        lib_text = "libraries all found"
    mount = "models dir ok" if host.models_dir_ok else f"models dir: {host.models_dir_detail}"
    if host.model is not None and not host.model.usable:
        mount += f"; model folder {host.model.path} unusable"
    health = obs.health
    health_text = "health ok" if health.healthy else f"health {health.result.outcome.value}"
    model = obs.model
    if model is None or not model.known:
        model_text = "model unknown"
    else:
        model_text = f"model {model.loaded}" if model.loaded else "no model loaded"
    return "; ".join((lib_text, mount, health_text, model_text))
