"""`make bench`, `python -m bench [--quick] [--trials N]` (or BENCH_TRIALS=N): see __init__.py.

Boots systemd in a throw-away namespace (the overlay recipe of tests/harness/systemd_ns.py: the
host's /tmp is never touched), runs `python -m bench.inside` in it with live output, then writes
bench/RESULTS.md and bench/recovery.png. Needs root; without it, says why and exits 0 (a skip).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
IN_NS_RESULT = "/srv/hydra-bench-result.json"


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO))  # tests.harness is not installed; the checkout has it
    from tests.harness.systemd_ns import SystemdNamespace, unavailable_reason

    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 trial each, short overhead runs")
    parser.add_argument("--trials", type=int, default=int(os.environ.get("BENCH_TRIALS", "0")))
    parser.add_argument("--faults", default="", help="comma list of fault classes (default all)")
    parser.add_argument("--supervisors", default="", help="comma list (default all three)")
    parser.add_argument("--skip", default="", help="comma list: recovery, overhead")
    parser.add_argument(
        "--only",
        choices=("status",),
        help="status: only the status command's latency (its daemons running), nothing else",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        help="where RESULTS.md and results.json go (default bench/; with --only, a temp dir: a "
        "partial run never replaces the committed results)",
    )
    parser.add_argument(
        "--from-json", type=Path, help="only render RESULTS.md/recovery.png from a results.json"
    )
    args = parser.parse_args(argv)
    from bench.node import SUPERVISORS
    from bench.recovery import FAULTS

    # Fail before booting anything, not after the first trials ran.
    for flag, known in (("faults", FAULTS), ("supervisors", SUPERVISORS)):
        unknown = [n for n in getattr(args, flag).split(",") if n and n not in known]
        if unknown:
            parser.error(
                f"--{flag}: unknown {', '.join(map(repr, unknown))}; known: {', '.join(known)}"
            )
    if args.out_dir is None:
        args.out_dir = Path(tempfile.mkdtemp(prefix="hydra-bench-")) if args.only else HERE
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        return _render(
            saved["data"], args.out_dir, saved["command"], saved["started"], saved["finished"]
        )
    trials = args.trials or (1 if args.quick else 5)
    reason = unavailable_reason()
    if reason is not None:
        print(f"bench skipped: cannot boot systemd in a namespace here: {reason}")
        return 0
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    started = time.time()
    inner = [sys.executable, "-m", "bench.inside", IN_NS_RESULT, "--trials", str(trials)]
    for flag in ("faults", "supervisors", "skip", "only"):
        if getattr(args, flag):
            inner += [f"--{flag}", getattr(args, flag)]
    if args.quick:
        inner.append("--quick")
    print(f"booting systemd in a namespace; then {' '.join(inner[1:])}", flush=True)
    with SystemdNamespace() as ns:
        proc = subprocess.run([*ns.nsenter, f"--wd={REPO}", *inner], check=False)
        if proc.returncode != 0:
            print(f"bench: the in-namespace run failed ({proc.returncode})", file=sys.stderr)
            return 1
        data = json.loads(Path(ns.root + IN_NS_RESULT).read_text())
    # The raw figures first: a report that fails to render can be redone with --from-json.
    raw = args.out_dir / "results.json"
    finished = time.time()
    from bench.report import machine

    # The machine and the commit measured, kept with the figures: --from-json renders them later,
    # from another commit, and must still name the code that ran.
    data["machine"] = machine()
    saved = {"command": command, "started": started, "finished": finished, "data": data}
    raw.write_text(json.dumps(saved, indent=1))
    return _render(data, args.out_dir, command, started, finished)


def _render(
    data: dict[str, Any], out_dir: Path, command: str, started: float, finished: float
) -> int:
    from bench.report import write_report

    md, png = write_report(data, out_dir, command=command, started=started, finished=finished)
    print(f"\nwrote {md} and {png}\n")
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
