"""`python -m bench.path_trust`: what the path rule costs per read (issue 22 items 4 and 5).

Every read and write in the state and runtime dirs walks the path from / again, one component at
a time (hydra_watchdog/trusted_path.py), where the watchdog opened the file by its path before.
This times the walk, and a read and a write of load.json both ways, in hot loops, in a state dir
under the temp dir (/tmp/hydra-path-trust-*/var/lib/hydra-watchdog), and prints CPU microseconds
per call. A cycle walks 4 times (pause.json, load.json twice, status.json), 5 when it saves
state.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from hydra_watchdog.load_record import LAUNCH_FILE, LoadLaunch, write_launch
from hydra_watchdog.regular_file import read_regular
from hydra_watchdog.statefile import write_atomic
from hydra_watchdog.trusted_path import open_trusted_dir, state_dir


def per_call_us(fn: Callable[[], object], runs: int) -> float:
    """CPU microseconds (user + system) per call: the machine's other work does not count."""
    fn()  # warm: first-call imports and dentry caches
    best = float("inf")
    for _ in range(5):  # the best of 5 rounds: the least disturbed by the machine's other work
        started = time.process_time()
        for _ in range(runs):
            fn()
        best = min(best, time.process_time() - started)
    return best / runs * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.path_trust", description=__doc__)
    parser.add_argument("--runs", type=int, default=20_000)
    args = parser.parse_args(argv)
    top = Path(tempfile.mkdtemp(prefix="hydra-path-trust-"))
    try:
        state = top / "var" / "lib" / "hydra-watchdog"
        os.close(open_trusted_dir(state, what="state dir", private=True, create_mode=0o700))
        launch = LoadLaunch("0" * 32, "m1", None, "no_model", "", "b", 0.0, 0.0, pid=1)
        write_launch(state, launch)
        record = state / LAUNCH_FILE

        def walked_read() -> None:
            with state_dir(state) as dir_fd:
                read_regular(LAUNCH_FILE, 65536, dir_fd=dir_fd)

        def walked_write() -> None:
            with state_dir(state) as dir_fd:
                write_atomic(record, b"{}", 0o600, dir_fd=dir_fd)

        rows = {
            "the walk alone (open_trusted_dir + close)": (lambda: _walk(state), args.runs),
            "read load.json by its path (before)": (lambda: read_regular(record, 65536), args.runs),
            "read load.json in the walked dir (now)": (walked_read, args.runs),
            "write it by its path (before, 2 fsyncs)": (
                lambda: write_atomic(record, b"{}", 0o600),
                args.runs // 20,
            ),
            "write it in the walked dir (now, 2 fsyncs)": (walked_write, args.runs // 20),
        }
        print(f"state dir {state}: {len(state.parts) - 1} components below /; best of 5 rounds")
        for label, (fn, runs) in rows.items():
            print(f"{label:<44} {per_call_us(fn, runs):9.1f} us  ({runs} calls a round)")
    finally:
        shutil.rmtree(top)
    return 0


def _walk(path: Path) -> None:
    os.close(open_trusted_dir(path, what="state dir", private=True))


if __name__ == "__main__":
    raise SystemExit(main())
