"""An unprivileged local user (uid/gid 65534, no groups) who binds TabbyAPI's port and writes
down every request that reaches it: what a squatter on the node would collect.

    with Squatter.start("127.0.0.1", port) as squatter:
        ...                          # the watchdog talks to the port
    assert "Authorization" not in squatter.transcript()

Runs the system's /usr/bin/python3 through `setpriv`, so it is a real process of another user,
in this PID namespace, holding a real socket.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"

# Answers every request with a body that looks healthy to every probe (health, model, canary),
# so only the gate stands between the key and this process.
SQUATTER = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(family)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if family == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
s.bind((host, port))
s.listen(16)
print("ready", flush=True)
body = b'{"status":"healthy","issues":[],"id":"m1","choices":[{"index":0,"text":"x"}]}'
while True:
    c, _ = s.accept()
    c.settimeout(2)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = c.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    print("REQUEST " + data.decode(errors="replace").replace("\r\n", " | "), flush=True)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
    c.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    c.close()
"""


# Takes the port as soon as it is free (a restart frees it: the real TabbyAPI keeps it closed for
# minutes while it loads its startup model), keeps the first connection it gets and lets go of
# the port at once (or after HOLD seconds without one), so that TabbyAPI can take it back (it
# sets SO_REUSEADDR, as uvicorn does). Every request on the kept connection gets TabbyAPI's
# sticky 503: read as TabbyAPI's, it would have the watchdog restart a TabbyAPI that is fine,
# again and again. Prints ready (bound), connection, released, REQUEST ..., closed.
#   python3 keeper.py HOST PORT [HOLD]
KEEPER = r"""
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
hold = float(sys.argv[3]) if len(sys.argv) > 3 else None
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
while True:
    try:
        s.bind((host, port))
        break
    except OSError:
        time.sleep(0.002)
s.listen(16)
print("ready", flush=True)
s.settimeout(hold)
try:
    c, _ = s.accept()
    print("connection", flush=True)
except TimeoutError:
    c = None
s.close()
print("released", flush=True)
body = b'{"status":"unhealthy","issues":[{"description":"CUDA error: illegal memory access"}]}'
data = b""
while c is not None:
    chunk = c.recv(65536)
    if not chunk:
        break
    data += chunk
    while b"\r\n\r\n" in data:
        head, _, data = data.partition(b"\r\n\r\n")
        print("REQUEST " + head.decode(errors="replace").replace("\r\n", " | "), flush=True)
        c.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
print("closed", flush=True)
time.sleep(3600)
"""


def as_nobody(argv: list[str]) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


@contextlib.contextmanager
def public_dir() -> Iterator[Path]:
    """A folder every user can read (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="hydra-adversary-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Squatter:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @classmethod
    @contextlib.contextmanager
    def start(
        cls,
        host: str,
        port: int,
        *,
        script: Path | None = None,
        source: str = SQUATTER,
        args: tuple[str, ...] = (),
        user: bool = True,
    ) -> Iterator[Squatter]:
        """Listen on host:port as nobody (`user=False`: as root), running `script` if given
        (a file holding SQUATTER: its path then names the program), else `python3 -c source`
        (SQUATTER, or KEEPER with `args` (HOLD,))."""
        program = [SYSTEM_PYTHON, str(script)] if script else [SYSTEM_PYTHON, "-c", source]
        argv = [*program, host, str(port), *args]
        proc = subprocess.Popen(
            as_nobody(argv) if user else argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        if first != "ready":
            proc.kill()
            raise AssertionError(f"the squatter did not start: {first} {proc.stdout.read()}")
        squatter = cls(proc)
        try:
            yield squatter
        finally:
            squatter.stop()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.append(line.rstrip("\n"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(10)

    def requests(self) -> list[str]:
        return [line for line in self._lines if line.startswith("REQUEST ")]

    def transcript(self) -> str:
        return "\n".join(self._lines)


def plant(script: str, *args: str) -> None:
    """Run a shell script as nobody (what the adversary can do to the file system), `args` as
    "$1"...; AssertionError with its output when it fails."""
    done = subprocess.run(
        as_nobody(["/bin/sh", "-c", script, "sh", *args]),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
    )
    if done.returncode != 0:
        raise AssertionError(f"the adversary's script failed: {done.stderr or done.stdout}")
