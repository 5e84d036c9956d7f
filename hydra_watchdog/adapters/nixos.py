"""The NixOS system link: which system generation is current, read cheaply every cycle.

`nixos-rebuild switch` points /run/current-system at a new store path; the generation links
/nix/var/nix/profiles/system-N-link point at the same store paths, so N names the switch. The
readlink is one syscall per cycle; the generation is looked up only when the target changed.
"""

from __future__ import annotations

import os
import re

from hydra_watchdog.observation import SystemLink

_GENERATION = re.compile(r"^system-(\d+)-link$")
_MAX_LINKS = 10_000  # generation links looked at; a real profile keeps tens to hundreds


def read_target(path: str) -> tuple[str | None, str]:
    """(the link's target, "") or (None, why not): no such path is "not NixOS", not an error."""
    try:
        return os.readlink(path), ""
    except FileNotFoundError:
        return None, f"{path} does not exist (not a NixOS system)"
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror or exc}"


def generation_of(target: str, profiles_dir: str) -> int | None:
    """N of the system-N-link in `profiles_dir` that points at `target` (the newest if several)."""
    try:
        names = os.listdir(profiles_dir)[:_MAX_LINKS]
    except OSError:
        return None
    found = None
    for name in names:
        m = _GENERATION.match(name)
        if m is None:
            continue
        try:
            points = os.readlink(os.path.join(profiles_dir, name))
        except OSError:
            continue
        if os.path.normpath(points) == os.path.normpath(target):
            n = int(m.group(1))
            found = n if found is None else max(found, n)
    return found


class SystemWatch:
    """Reads the system link each cycle; `changed` says there is a target and it differs from
    the last read of this watch (the first read counts: a fresh watchdog checks once)."""

    def __init__(self, current_system: str, profiles_dir: str) -> None:
        self.current_system = current_system
        self.profiles_dir = profiles_dir
        self._last: SystemLink | None = None

    def read(self) -> tuple[SystemLink | None, bool]:
        if not self.current_system:
            return None, False
        target, why = read_target(self.current_system)
        last = self._last
        if last is not None and last.target == target:
            return last, False
        generation = generation_of(target, self.profiles_dir) if target else None
        link = SystemLink(self.current_system, target, generation, why)
        self._last = link
        return link, target is not None  # no link at all (not NixOS) is nothing to check
