"""Runs inside the namespace: `python -m bench.inside OUT.json [--trials N] [--quick] ...`.

Builds the node, runs the recovery trials and the overhead measurements, and writes everything
as JSON to OUT.json (the host side turns it into RESULTS.md and recovery.png).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _out(line: str) -> None:
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    from bench import node as nd
    from bench.recovery import FAULTS, run_recovery

    parser = argparse.ArgumentParser(prog="python -m bench.inside")
    parser.add_argument("out", type=Path)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--supervisors", default=",".join(nd.SUPERVISORS))
    parser.add_argument("--skip", default="", help="comma list: recovery, overhead")
    parser.add_argument("--only", choices=("status",))
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    if args.only:
        skip |= {"recovery", "overhead"}
    started = time.monotonic()
    node = nd.build_node(Path(__file__).resolve().parents[1])
    result: dict[str, object] = {"compression": nd.COMPRESSION, "trials": args.trials}
    if "recovery" not in skip:
        _out(f"== recovery: {args.trials} trial(s) per fault class and supervisor")
        result["recovery"] = run_recovery(
            node,
            args.trials,
            _out,
            faults=tuple(f for f in args.faults.split(",") if f),
            supervisors=tuple(s for s in args.supervisors.split(",") if s),
        )
    if "overhead" not in skip:
        from bench.overhead import run_overhead

        _out("== overhead and latency")
        result["overhead"] = run_overhead(node, _out, quick=args.quick)
    if args.only == "status":
        from bench.overhead import run_status_only

        _out("== status latency only")
        result["overhead"] = run_status_only(node, _out, quick=args.quick)
    result["inside_s"] = time.monotonic() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
