"""sd_notify: tell systemd we are ready, what we are doing, and that the loop is alive.

In-house rather than a dependency: the protocol is one datagram of `KEY=value` lines to the
socket named by `$NOTIFY_SOCKET`, declared stable by systemd (sd_notify(3) ships a self-contained
Python example). The `sdnotify` package (0.3.2, 2017; checked for issue 25) encodes Latin-1, so
a STATUS line naming a model outside it is dropped without a word (and one inside it reaches
systemd as invalid UTF-8); it reads no WATCHDOG_USEC or WATCHDOG_PID, returns nothing to tell a
failed send by, and reads os.environ only (the tests hand an environment).

Not under systemd (no `$NOTIFY_SOCKET`) every call is a silent no-op, so the daemon calls these
unconditionally. A send that fails (socket gone, systemd restarting) returns False and never raises:
a missed notification must not take the watchdog down with it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        # "@name" is the abstract namespace: the kernel spells it with a leading NUL byte.
        self._address = "\0" + raw[1:] if raw.startswith("@") else raw
        self._watchdog_usec = env.get("WATCHDOG_USEC", "")
        self._watchdog_pid = env.get("WATCHDOG_PID", "")

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=value` assignments in one datagram; True if it was sent."""
        if not self._address:
            return False
        payload = "\n".join(assignments).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall(payload)
        except OSError:
            return False
        return True

    def ready(self) -> bool:
        return self.notify("READY=1")

    def status(self, line: str) -> bool:
        # STATUS is one line for `systemctl status`; a newline would start a bogus assignment.
        one_line = " ".join(line.split())
        return self.notify(f"STATUS={one_line}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when systemd expects
        none from this process: no watchdog configured, or WATCHDOG_PID names another process."""
        if not self._address:
            return None
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2 / 1_000_000
