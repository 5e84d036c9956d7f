"""A leftover process for the orphan fault classes: `python -m bench.zombie ...`.

Run as TabbyAPI's own program with --zombie (bench/node.py zombie_argv) it is an orphan of
TabbyAPI; run with `-m` from the repo, it is a foreign process that nobody may kill, whatever
its arguments mention. --hold-port waits until the
port is free and then listens without ever accepting: connections hang, like a wedged TabbyAPI
worker that kept the socket. --vram-gib registers GPU memory with the NVML simulator.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.zombie")
    parser.add_argument("--models-dir", default="", help="only here to look like TabbyAPI")
    parser.add_argument("--hold-port", type=int, default=0)
    parser.add_argument("--vram-gib", type=float, default=0.0)
    parser.add_argument("--nvml-state", type=Path)
    parser.add_argument("--ready-file", type=Path)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.vram_gib and args.nvml_state is not None:
        from hydra_watchdog.sim import nvml_state

        nvml_state.set_process(args.nvml_state, 0, os.getpid(), int(args.vram_gib * (1 << 30)))
    if args.ready_file is not None:
        args.ready_file.write_text("ready\n")
    held: socket.socket | None = None
    while args.hold_port and held is None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", args.hold_port))
            sock.listen(64)
            held = sock
        except OSError:
            sock.close()
            time.sleep(0.002)  # grab the port the moment the crashed owner lets go
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
