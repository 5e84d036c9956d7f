"""Host facts TabbyAPI depends on: the models folder, the model folders, the venv's libraries.

The models folder is a mount on hydra-ai. When the mount is missing, what remains is normally the
empty directory it was mounted on; so by default "ok" means: exists, readable, and a mount point
or at least not empty ("empty where models should be" is the missing-mount signal). With
`require_mount=True` only a mount point will do (for nodes where the folder is always a mount).

The library check is the runbook's NixOS-rebuild failure: after a rebuild the ExLlamaV2
extension in TabbyAPI's venv links against store paths that are gone, and `ldd` says "not found".
"""

from __future__ import annotations

import fnmatch
import glob
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hydra_watchdog.adapters.loader_env import TabbyEnvironment, describe_env
from hydra_watchdog.observation import HostReport, ModelDir, UnitStatus

if TYPE_CHECKING:
    from hydra_watchdog.config import Config


# The compiled extension of ExLlamaV2: prebuilt wheels ship `exllamav2_ext*.so` at the top of
# site-packages; some builds put it (or more) inside the package, which is searched without
# following symlinked folders (a `loop -> ..` made glob's `**` recurse until it hung) and within
# bounds far above the package's real size (a few hundred entries, four levels deep).
_SITE_PACKAGES = "lib/python3*/site-packages"
_TOP_EXTENSION = "exllamav2_ext*.so"
_PACKAGE = "exllamav2"
_MAX_ENTRIES = 50_000  # directory entries looked at inside the package
_MAX_DEPTH = 16  # folder levels below the package


def parse_ldd(text: str) -> tuple[str, ...]:
    """Library names `ldd` reports as "not found", in order, without repeats."""
    missing: list[str] = []
    for line in text.splitlines():
        name, sep, rest = line.strip().partition("=>")
        if sep and rest.strip() == "not found" and name.strip() not in missing:
            missing.append(name.strip())
    return tuple(missing)


def check_models_dir(path: str, *, require_mount: bool) -> tuple[bool, str]:
    """(ok, detail): detail says what is wrong, or how it was found good."""
    if not os.path.exists(path):
        return False, f"{path} missing"
    if not os.path.isdir(path):
        return False, f"{path} is not a directory"
    try:
        entries = os.listdir(path)
    except OSError as exc:
        return False, f"{path} not readable: {exc.strerror or exc}"
    mounted = os.path.ismount(path)
    if mounted:
        return True, f"{path} is a mount point"
    if require_mount:
        return False, f"{path} is not a mount point (is the models mount missing?)"
    if not entries:
        return False, f"{path} is empty and not a mount point (is the models mount missing?)"
    return True, f"{path} is not a mount point but holds {len(entries)} entries"


def inspect_model(models_dir: str, name: str) -> ModelDir:
    """The model folder `models_dir/name`: config.json, *.safetensors, total size in bytes."""
    path = os.path.join(models_dir, name)
    if not name or "/" in name or name in (".", ".."):
        return ModelDir(name=name, path=path, exists=False, detail=f"invalid model name {name!r}")
    if not os.path.isdir(path):
        return ModelDir(name=name, path=path, exists=False, detail=f"{path} missing")
    try:
        entries = os.listdir(path)
    except OSError as exc:
        return ModelDir(
            name=name, path=path, exists=True, detail=f"{path} not readable: {exc.strerror}"
        )
    has_config = os.path.isfile(os.path.join(path, "config.json"))
    weights = sum(1 for e in entries if e.endswith(".safetensors"))
    try:
        mtime: float | None = os.stat(path).st_mtime
    except OSError:
        mtime = None
    problems = []
    if not has_config:
        problems.append("no config.json")
    if not weights:
        problems.append("no *.safetensors")
    return ModelDir(
        name=name,
        path=path,
        exists=True,
        has_config=has_config,
        weight_files=weights,
        size_bytes=_tree_size(path),
        detail=", ".join(problems),
        mtime=mtime,
    )


def _tree_size(path: str) -> int:
    """Bytes of the files under path; symlinked files count (HF caches link blobs)."""
    total = 0
    for dirpath, _, files in os.walk(path, onerror=lambda _exc: None):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


def find_extensions(venv: str) -> tuple[tuple[str, ...], str]:
    """(the ExLlamaV2 extension files in the venv, sorted; why the search stopped short or "")."""
    found: set[str] = set()
    seen = 0
    for sp in sorted(glob.glob(os.path.join(venv, _SITE_PACKAGES))):
        try:
            with os.scandir(sp) as entries:
                top = [e.path for e in entries if fnmatch.fnmatchcase(e.name, _TOP_EXTENSION)]
        except OSError:
            continue
        found.update(top)
        package = os.path.join(sp, _PACKAGE)
        base_depth = package.count(os.sep)
        for dirpath, dirnames, filenames in os.walk(package, followlinks=False):
            seen += len(dirnames) + len(filenames)
            if seen > _MAX_ENTRIES:
                return tuple(sorted(found)), f"stopped looking after {_MAX_ENTRIES} entries"
            found.update(os.path.join(dirpath, f) for f in filenames if f.endswith(".so"))
            if dirpath.count(os.sep) - base_depth >= _MAX_DEPTH:
                dirnames.clear()  # deeper than any real package: not searched
    return tuple(sorted(found)), ""


@dataclass(frozen=True)
class LibraryCheck:
    missing: tuple[str, ...] | None  # None: could not check
    detail: str


_DEFAULT_PATH = "/run/current-system/sw/bin:/usr/bin:/bin"


def ldd_environment(loader: Mapping[str, str]) -> dict[str, str]:
    """ldd's whole environment: our PATH (to find ldd and its loader) and TabbyAPI's loader
    variables, nothing else: in particular not our own LD_LIBRARY_PATH (set for NVML)."""
    return {"PATH": os.environ.get("PATH") or _DEFAULT_PATH, **loader}


def check_libraries(
    venv: str, *, timeout: float, env: Mapping[str, str] | None = None
) -> LibraryCheck:
    """`ldd` on every ExLlamaV2 extension in the venv; every "not found" library. `env`: the
    loader variables TabbyAPI has (None: ldd inherits the watchdog's environment)."""
    if not venv:
        return LibraryCheck(None, "no venv configured")
    if not os.path.isdir(venv):
        return LibraryCheck(None, f"venv {venv} missing: cannot check its libraries")
    extensions, cut_short = find_extensions(venv)
    if not extensions:
        why = f"no ExLlamaV2 extension (exllamav2_ext*.so) under {venv}"
        return LibraryCheck(None, f"{why} ({cut_short})" if cut_short else why)
    missing: list[str] = []
    problems: list[str] = []
    for ext in extensions:
        try:
            proc = subprocess.run(
                ["ldd", ext],
                capture_output=True,
                text=True,
                errors="replace",
                timeout=timeout,
                check=False,
                stdin=subprocess.DEVNULL,
                env=None if env is None else ldd_environment(env),
            )
        except FileNotFoundError:
            return LibraryCheck(None, "ldd not found (Debian package libc-bin)")
        except subprocess.TimeoutExpired:
            problems.append(f"ldd {ext} did not return within {timeout:g} s")
            continue
        except OSError as exc:
            problems.append(f"cannot run ldd on {ext}: {exc}")
            continue
        found = parse_ldd(proc.stdout)
        if not found and proc.returncode != 0:
            problems.append(f"ldd {ext} failed: {proc.stderr.strip() or proc.returncode}")
        missing.extend(lib for lib in found if lib not in missing)
    notes = [f"{cut_short} under {venv}"] if cut_short else []
    if problems and not missing and len(problems) == len(extensions):
        return LibraryCheck(None, "; ".join([*problems, *notes]))
    checked = f"checked {len(extensions)} extension(s)"
    return LibraryCheck(tuple(missing), "; ".join([checked, *problems, *notes]))


class HostProbe:
    """HostChecker for the models folder, the model and fallback folders, and the venv."""

    def __init__(
        self,
        models_dir: str,
        model_name: str,
        fallback_name: str = "",
        venv: str = "",
        *,
        require_mount: bool = False,
        ldd_timeout: float = 10.0,
        environment: TabbyEnvironment | None = None,
    ) -> None:
        self.models_dir = models_dir
        self.model_name = model_name
        self.fallback_name = fallback_name
        self.venv = venv
        self.require_mount = require_mount
        self.ldd_timeout = ldd_timeout
        self.environment = environment

    @classmethod
    def from_config(cls, config: Config, environment: TabbyEnvironment | None = None) -> HostProbe:
        return cls(
            config.model.models_dir,
            config.model.name,
            config.model.fallback,
            config.tabbyapi.venv,
            environment=environment,
        )

    def libraries(self, unit: UnitStatus | None) -> LibraryCheck:
        """The library check in TabbyAPI's environment; "unknown" (None) when that cannot be
        established: an unknown never blocks a restart."""
        if self.environment is None:
            return check_libraries(self.venv, timeout=self.ldd_timeout)
        if not self.venv:
            return LibraryCheck(None, "no venv configured")
        found = self.environment.lookup(unit)
        if found.env is None:
            return LibraryCheck(None, f"unknown: TabbyAPI's environment: {found.detail}")
        loader = found.env.as_dict()
        check = check_libraries(self.venv, timeout=self.ldd_timeout, env=loader)
        seen = f"as TabbyAPI sees them ({describe_env(loader)}, from {found.env.source})"
        return LibraryCheck(check.missing, f"{check.detail}; {seen}")

    def close(self) -> None:
        """Nothing held between checks."""

    def check(self, *, libraries: bool, unit: UnitStatus | None = None) -> HostReport:
        ok, detail = check_models_dir(self.models_dir, require_mount=self.require_mount)
        model = inspect_model(self.models_dir, self.model_name) if self.model_name else None
        fallback = (
            inspect_model(self.models_dir, self.fallback_name) if self.fallback_name else None
        )
        libs = self.libraries(unit) if libraries else None
        return HostReport(
            models_dir_ok=ok,
            models_dir_detail=detail,
            model=model,
            fallback=fallback,
            missing_libraries=libs.missing if libs else None,
            libraries_detail=libs.detail if libs else "",
            libraries_checked=libraries,
        )
