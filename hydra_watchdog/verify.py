"""`hydra-watchdog verify`: the runbook's post-rebuild verification, step by step.

Each check is OK, FAIL or SKIP, and says why. A check that did not run is never OK: it is SKIP
with the reason, and a SKIP that matters (the check applies here but could not run) makes the
verdict WARNING; a SKIP that does not (the ExLlamaV2 extension on a TabbyAPI that runs ExLlamaV3)
leaves it as it is. Any FAIL is CRITICAL (exit 2), a SKIP that matters WARNING (exit 1), and so
is WAIT: not there yet, with something under way that brings it (no model loaded while the
daemon loads the configured one, read from its status file).

The checks follow the backend the running TabbyAPI serves the model with (adapters/backend.py),
and /health counts only when the listener that answered is TabbyAPI's, verified as the admin key's
requests are (identity.ListenerGate): a squatter's 200 is a FAIL that names it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from hydra_watchdog.adapters.backend import Backend, detect
from hydra_watchdog.adapters.tabby import listener_gate
from hydra_watchdog.check import running_daemon
from hydra_watchdog.config import Config
from hydra_watchdog.interfaces import Adapters
from hydra_watchdog.observation import HostReport, ModelStatus, Outcome
from hydra_watchdog.printable import one_line, printable
from hydra_watchdog.report.screen import WIDTH, Style, emit, wants_colour, wrap
from hydra_watchdog.report.status import VERDICT_NAMES
from hydra_watchdog.states import Phase

OK, SKIP, FAIL = "OK", "SKIP", "FAIL"
WAIT = "WAIT"  # not there yet, and something under way brings it (the daemon's model load)


@dataclass(frozen=True)
class Check:
    name: str
    result: str  # OK, SKIP, WAIT or FAIL
    detail: str
    matters: bool = True  # for a SKIP: the check applies here but could not run


def verdict(checks: list[Check]) -> int:
    if any(c.result == FAIL for c in checks):
        return 2
    waits = any(c.result == WAIT for c in checks)
    return 1 if waits or any(c.result == SKIP and c.matters for c in checks) else 0


# The daemon's phases in which it loads nothing: a cause it must not fix, a pause, a human needed.
# In any other its no_model rule loads the configured model once it sees none loaded (a status
# written a cycle ago may still say starting, recovering, down or healthy).
_WILL_NOT_LOAD = frozenset({Phase.BLOCKED, Phase.PAUSED, Phase.ESCALATED})


def _no_model_loaded(cfg: Config) -> Check:
    """TabbyAPI has no model: CRITICAL only when nothing will load one (no daemon, a dry run,
    or a daemon blocked, paused or escalated). A daemon loading it, or that will, is WAIT."""
    name = cfg.model.name
    if not name:
        return Check("model loaded", SKIP, "none, and no model is configured (model.name)", False)
    daemon, absent = running_daemon(cfg, time.time())
    if daemon is None:
        return Check("model loaded", FAIL, f"none, and nothing will load {name}: {absent}")
    report = daemon.report
    who = f"hydra-watchdog (pid {report.pid})"
    if report.dry_run:
        said = f"none, and nothing will load {name}: {who} is a dry run"
        return Check("model loaded", FAIL, said)
    if report.phase == Phase.LOADING and report.load is not None:
        ld = report.load
        done = f", {ld.module}/{ld.modules} modules" if ld.modules else ""
        return Check("model loaded", WAIT, f"none yet: {who} is loading {ld.model}{done}")
    # the daemon's first finding says why (its cause), as `status` lists it first
    cause = one_line(report.findings[0].message, 160) if report.findings else ""
    if report.phase == Phase.NO_MODEL:
        why = f" ({cause})" if cause else ""
        return Check("model loaded", WAIT, f"none yet: {who} loads {name} when due{why}")
    if report.phase in _WILL_NOT_LOAD or report.paused.paused:
        why = f": {cause}" if cause else ""
        said = f"none, and nothing will load {name}: {who} is {report.phase}{why}"
        return Check("model loaded", FAIL, said)
    said = f"none yet: {who} is {report.phase}; it loads {name} once it sees none"
    return Check("model loaded", WAIT, said)


def _backend(backend: Backend) -> Check:
    if not backend.name:
        return Check("backend", SKIP, f"cannot tell: {backend.how}")
    return Check("backend", OK, f"{backend.name} ({backend.how})")


def _libraries(cfg: Config, backend: Backend, host: HostReport | None, serving: str = "") -> Check:
    """The ExLlamaV2 extension's libraries: the runbook's NixOS-rebuild failure. `serving`: the
    model TabbyAPI serves now; its running process keeps the libraries it mapped at its start,
    so what is missing fails a restart or a reload, not what runs."""
    if backend.name == "exllamav3":
        return Check(
            "libraries", SKIP, "not used: the exllamav3 backend has no such extension", False
        )
    fails = (
        f"a restart or reload would fail; the running process still serves {serving}"
        if serving
        else ""
    )
    if host is None or host.missing_libraries is None:
        why = host.libraries_detail if host is not None else "not checked"
        if not cfg.tabbyapi.venv:
            return Check("libraries", SKIP, "no tabbyapi.venv configured: set it to check them")
        if backend.name == "exllamav2" and "no ExLlamaV2 extension" in why:
            fails = fails or "exllamav2 cannot load a model from this venv"
            return Check("libraries", FAIL, f"{why}: {fails}")
        result = (
            FAIL if backend.name == "exllamav2" and not os.path.isdir(cfg.tabbyapi.venv) else SKIP
        )
        return Check("libraries", result, why or "not checked")
    if host.missing_libraries:
        missing = f"{', '.join(host.missing_libraries)} not found"
        return Check("libraries", FAIL, f"{missing}: {fails}" if fails else missing)
    return Check("libraries", OK, f"all found ({host.libraries_detail})")


def _model_dir(cfg: Config, backend: Backend, host: HostReport) -> Check:
    m = host.model
    if not cfg.model.name:
        return Check("model dir", SKIP, "no model configured (model.name)", False)
    if m is None:
        return Check("model dir", SKIP, "not checked")
    if not m.usable:
        return Check("model dir", FAIL, f"{m.path}: {m.detail or 'not usable'}")
    if backend.problem:
        return Check("model dir", FAIL, f"{m.path}: TabbyAPI cannot load it: {backend.problem}")
    return Check("model dir", OK, m.path)


def run_checks(cfg: Config, adapters: Adapters) -> list[Check]:
    unit = adapters.units.status()
    model_dir = os.path.join(cfg.model.models_dir, cfg.model.name)
    backend = detect(cfg.tabbyapi.cmdline_patterns, cfg.tabbyapi.venv, model_dir)
    # ldd in TabbyAPI's environment (its running process's, else its unit's); only where the
    # ExLlamaV2 extension is TabbyAPI's
    host = adapters.host.check(libraries=backend.name != "exllamav3", unit=unit)
    checks = [_backend(backend), _libraries(cfg, backend, host)]
    if host.models_dir_ok is None:
        checks.append(Check("models mount", SKIP, host.models_dir_detail or "not checked"))
    else:
        mount = host.models_dir_detail or cfg.model.models_dir
        checks.append(Check("models mount", OK if host.models_dir_ok else FAIL, mount))
    checks.append(_model_dir(cfg, backend, host))
    gate = listener_gate(cfg)
    gate.set_unit(unit)
    # Every request goes only to a listener verified against the unit, /health too (identity.py).
    adapters.tabby.note_unit(unit)
    health = adapters.tabby.health()
    listener = gate.check()
    h = health.result
    took = f"in {h.latency_s * 1000:.0f} ms"
    if health.healthy and listener.ok:
        checks.append(Check("health", OK, f"{h.status} {took} from TabbyAPI (pid {listener.pid})"))
    elif health.healthy:
        checks.append(Check("health", FAIL, f"{h.status} {took}, but {listener.detail}"))
    else:
        said = h.outcome.value + (f" {h.status}" if h.status else "")
        checks.append(
            Check("health", FAIL, f"{said} {took}" + (f": {h.detail}" if h.detail else ""))
        )
    if checks[-1].result != OK:
        checks.append(Check("model loaded", SKIP, "not asked: /health failed", False))
        checks.append(Check("1-token completion", SKIP, "not sent: /health failed", False))
        return checks
    model = adapters.tabby.model()
    # LOCAL_ERROR: this command holds no key (adapters/admin_key.py); its detail says how to pass
    # one. No verdict on TabbyAPI, nor on the daemon's key.
    keyless = model.result.outcome is Outcome.LOCAL_ERROR
    checks.append(_model_loaded(cfg, model))
    if keyless:
        checks.append(Check("1-token completion", SKIP, "not sent: no admin key for this command"))
        return checks
    if not model.loaded:
        checks.append(Check("1-token completion", SKIP, "not sent: no model loaded", False))
        return checks
    checks.append(_completion(cfg, adapters))
    if checks[-1].result == OK:  # it serves: a library FAIL says what a restart would meet
        libraries = _libraries(cfg, backend, host, serving=model.loaded)
        checks = [libraries if c.name == libraries.name else c for c in checks]
    return checks


def _model_loaded(cfg: Config, model: ModelStatus) -> Check:
    if model.loaded:
        return Check("model loaded", OK, model.loaded)
    if model.known:
        return _no_model_loaded(cfg)
    if model.result.outcome is Outcome.LOCAL_ERROR:  # no key for this command: see run_checks
        return Check("model loaded", SKIP, model.result.detail)
    return Check("model loaded", FAIL, f"{model.result.outcome.value}: {model.result.detail}")


def _completion(cfg: Config, adapters: Adapters) -> Check:
    r = adapters.tabby.canary(cfg.tabbyapi.canary_deadline).result
    ok = r.outcome is Outcome.OK
    said = f"{r.outcome.value} in {r.latency_s * 1000:.0f} ms" + ("" if ok else f": {r.detail}")
    return Check("1-token completion", OK if ok else FAIL, said)


def screen(checks: list[Check], style: Style) -> str:
    code = verdict(checks)
    name = VERDICT_NAMES[code]
    failed = sum(c.result == FAIL for c in checks)
    skipped = sum(c.result == SKIP for c in checks)
    passed = sum(c.result == OK for c in checks)
    said = f"{passed} of {len(checks)} checks passed"
    said += f", {failed} failed" if failed else ""
    said += f", {skipped} skipped" if skipped else ""
    waiting = sum(c.result == WAIT for c in checks)
    said += f", {waiting} not yet" if waiting else ""
    lines = [f"{style.paint(name, name)}: {said}"]
    tone = {OK: "good", FAIL: "FAIL", SKIP: "SKIP", WAIT: "warn"}
    for c in checks:
        head = style.paint(
            f"{c.result:<4}", tone[c.result] if c.result != SKIP or c.matters else "dim"
        )
        text = wrap(printable(f"{c.name}: {c.detail}"), WIDTH - 7)
        lines.append(f"  {head} {text[0]}")
        lines += [f"{'':7}{more}" for more in text[1:]]
    return "\n".join(lines) + "\n"


def run_verify(cfg: Config, adapters: Adapters) -> int:
    checks = run_checks(cfg, adapters)
    emit(screen(checks, Style(wants_colour())))
    return verdict(checks)
