"""`python -m hydra_watchdog.load_helper`: one model load, in a process that outlives the watchdog.

TabbyAPI's exl2 build cancels a load when its client disconnects, so a watchdog that is stopped
or restarted mid-load (`systemctl restart hydra-watchdog`, a NixOS switch) must not hold the
connection itself. The watchdog starts this helper instead (act/load_launch.py: a transient unit
under systemd, a detached process elsewhere); the helper sends the load with the same TabbyClient
(deadline transport, SSE bounds, the listener identity gate) and writes its progress and outcome
to `load-progress.json` in the state dir (load_record.py), where this watchdog or its successor
reads them.

The admin key arrives through an inherited descriptor (`--key-fd`) or systemd's credential
`admin_key` ($CREDENTIALS_DIRECTORY), never through argv or the environment. SIGTERM is a
deliberate cancel: the stream is closed cleanly and the outcome says "cancelled".
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from hydra_watchdog.adapters.admin_key import ADMIN_KEY_MAX_BYTES
from hydra_watchdog.adapters.systemd import SystemctlUnit
from hydra_watchdog.adapters.tabby import TabbyClient, read_admin_key
from hydra_watchdog.config import ConfigError, load_config
from hydra_watchdog.load_record import LoadReport, write_report

KEY_LIMIT = ADMIN_KEY_MAX_BYTES  # bytes read from the key descriptor


def read_key_fd(fd: int) -> tuple[str | None, str]:
    """(key, problem) from an inherited descriptor, read to its end and closed."""
    chunks: list[bytes] = []
    try:
        with os.fdopen(fd, "rb", closefd=True) as stream:
            while sum(map(len, chunks)) <= KEY_LIMIT and (chunk := stream.read(KEY_LIMIT)):
                chunks.append(chunk)
    except OSError as exc:
        return None, f"the admin key descriptor {fd} cannot be read ({exc.strerror or exc})"
    raw = b"".join(chunks)
    if len(raw) > KEY_LIMIT:
        return None, f"the admin key descriptor {fd} holds more than {KEY_LIMIT} bytes"
    key = raw.decode("utf-8", "replace").strip()
    if not key:
        return None, ""
    if any(ch.isspace() for ch in key):
        return None, f"the admin key descriptor {fd} holds more than one word"
    return key, ""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hydra_watchdog.load_helper")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--load-id", required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--key-fd", type=int, default=-1, help="read the admin key from this fd")
    parser.add_argument(
        "--key-credential",
        action="store_true",
        help="the key was handed as systemd's credential admin_key: its absence is an error",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    key = read_key_fd(args.key_fd) if args.key_fd >= 0 else read_admin_key("", os.environ)
    cancel = threading.Event()

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        cancel.set()  # the read loop polls it: the stream is closed, the outcome written

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a closing terminal is no cancel

    def report(
        module: int = 0,
        modules: int = 0,
        *,
        finished: bool = False,
        ok: bool = False,
        detail: str = "",
    ) -> None:
        record = LoadReport(args.load_id, args.model, module, modules, finished, ok, detail)
        try:
            write_report(args.state_dir, record)
        except OSError as exc:  # progress is best effort; the outcome is retried below
            print(f"load helper: cannot write the report: {exc}", file=sys.stderr)

    if args.key_credential and key[0] is None:
        # The watchdog asked systemd to hand the key over, and it did not arrive: a load sent
        # without it would come back 401 and read as a rejected key, which it is not.
        why = key[1] or "no admin_key in $CREDENTIALS_DIRECTORY"
        detail = f"load helper: the admin key credential did not arrive ({why}); nothing sent"
        report(finished=True, ok=False, detail=detail)
        return 1
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        report(finished=True, ok=False, detail=f"load helper: {exc}")
        return 78
    client = TabbyClient.from_config(cfg, admin_key=key)
    units = SystemctlUnit(cfg.tabbyapi.unit)
    client.note_unit(units.status())
    # Let go of PID 1's bus at once: a load lasts minutes, and PID 1 sends every unit change to
    # each connection on its private socket, which nobody here would read.
    units.close()
    report()

    def on_progress(done: int, total: int) -> None:
        report(module=done, modules=total)

    outcome = client.load_model(
        args.model, timeout=cfg.model.load_timeout, on_progress=on_progress, cancel=cancel
    )
    client.close()
    final = LoadReport(
        args.load_id,
        args.model,
        outcome.modules_done,
        outcome.modules_total,
        finished=True,
        ok=outcome.ok,
        detail=outcome.detail,
        kind=outcome.kind,
    )
    try:
        write_report(args.state_dir, final)
    except OSError as exc:
        print(f"load helper: cannot write the outcome: {exc}", file=sys.stderr)
        return 1
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
