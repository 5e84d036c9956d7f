"""Real ELF files built by gcc for the library checks: an ExLlamaV2-like extension that links a
library found only through an RPATH or only through LD_LIBRARY_PATH."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

LIB = "libhydradep.so"
EXT = "exllamav2_ext.cpython-311-x86_64-linux-gnu.so"

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


def build_library(lib_dir: Path) -> Path:
    lib_dir.mkdir(parents=True, exist_ok=True)
    src = lib_dir / "dep.c"
    src.write_text("int hydra_dep(void) { return 42; }\n")
    out = lib_dir / LIB
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(out), str(src)], check=True)
    src.unlink()
    return out


def build_extension(venv: Path, lib_dir: Path, *, rpath: bool) -> Path:
    """venv/lib/python3.11/site-packages/exllamav2_ext*.so needing libhydradep.so; with `rpath`
    it finds it through its RUNPATH (a store path on NixOS), else only via LD_LIBRARY_PATH."""
    site = venv / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True, exist_ok=True)
    src = site / "ext.c"
    src.write_text("int hydra_dep(void);\nint ext(void) { return hydra_dep(); }\n")
    out = site / EXT
    argv = ["gcc", "-shared", "-fPIC", "-o", str(out), str(src), f"-L{lib_dir}", "-lhydradep"]
    if rpath:
        argv.append(f"-Wl,-rpath,{lib_dir}")
    subprocess.run(argv, check=True)
    src.unlink()
    return out
