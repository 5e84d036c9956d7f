"""Compile the simulated libnvidia-ml.so.1 (nvml_sim.c, shipped next to this module) with gcc.

The SONAME matters: after `ctypes.CDLL("/abs/path/libnvidia-ml.so.1")`, pynvml's own
`CDLL("libnvidia-ml.so.1")` finds the already loaded library by that name, so no
LD_LIBRARY_PATH is needed. Builds are cached by a hash of the source and the flags, and
installed by rename, so concurrent builders into one directory are safe.

    python -m hydra_watchdog.sim.nvml_build DIR
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

LIBRARY_NAME = "libnvidia-ml.so.1"
SOURCE = Path(__file__).with_name("nvml_sim.c")
_FLAGS = (
    "-shared",
    "-fPIC",
    "-O2",
    "-Wall",
    "-Wextra",
    "-fvisibility=hidden",
    f"-Wl,-soname,{LIBRARY_NAME}",
)


class BuildError(RuntimeError):
    """The simulator could not be built; the message says what to do."""


def _digest(source: bytes) -> str:
    return hashlib.sha256(source + "\0".join(_FLAGS).encode()).hexdigest()


def build_nvml_sim(dest_dir: Path, *, compiler: str = "gcc") -> Path:
    """Return dest_dir/libnvidia-ml.so.1, compiling it only when the source changed."""
    try:
        source = SOURCE.read_bytes()
    except OSError as e:
        raise BuildError(f"cannot read the simulator source {SOURCE}: {e}") from e
    dest_dir.mkdir(parents=True, exist_ok=True)
    library = dest_dir / LIBRARY_NAME
    stamp = dest_dir / f".{LIBRARY_NAME}.sha256"
    digest = _digest(source)
    if library.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        return library

    gcc = shutil.which(compiler)
    if gcc is None:
        raise BuildError(
            f"{compiler!r} not found on PATH: the NVML simulator is C and needs a compiler "
            "(Debian/Ubuntu: apt-get install gcc; NixOS: add gcc to the environment)"
        )
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{LIBRARY_NAME}.")
    os.close(fd)
    try:
        done = subprocess.run(
            [gcc, *_FLAGS, "-o", tmp, str(SOURCE)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            raise BuildError(f"{gcc} failed to build {SOURCE} ({done.returncode}):\n{done.stderr}")
        os.chmod(tmp, 0o755)  # noqa: S103 - a shared library must be readable and loadable by all
        os.replace(tmp, library)
    except subprocess.TimeoutExpired as e:
        raise BuildError(f"{gcc} did not finish building {SOURCE} within {e.timeout} s") from e
    finally:
        Path(tmp).unlink(missing_ok=True)
    stamp.write_text(digest + "\n")
    return library


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hydra_watchdog.sim.nvml_build",
        description="Build the simulated libnvidia-ml.so.1 into DIR and print its path.",
    )
    parser.add_argument("dir", type=Path, help="where to put libnvidia-ml.so.1")
    args = parser.parse_args(argv)
    try:
        print(build_nvml_sim(args.dir))
    except (BuildError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
