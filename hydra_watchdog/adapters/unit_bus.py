"""The unit's properties read from PID 1 over D-Bus, on systemd's private socket.

`systemctl show` costs a fork and exec and ~6 ms of CPU per cycle; the same properties over one
kept connection cost a fraction of a millisecond. /run/systemd/private is the socket systemctl
itself uses as root: PID 1 answers on it directly, with no bus daemon in between (so it works
while dbus-daemon is down, and there is no Hello to send). jeepney does the wire format and the
authentication; the socket and its deadline are ours, so every call is bounded.

Nothing here raises for an outside failure: `read()` returns the properties, or a sentence saying
why they could not be read, and the caller (SystemctlUnit) falls back to `systemctl show`.

PID 1 sends every signal to every connection on its private socket, unasked (no AddMatch, no
Subscribe: there is no bus daemon to filter). So a read need not ask for all fourteen properties
every cycle (issue 15: parsing their replies was most of the unit probe's CPU). It asks for
ActiveState and InvocationID (a new one at every start), and answers with its last full read when
both are as they were, no signal about the unit came in since that read (PropertiesChanged on its
object; JobNew, JobRemoved, UnitNew, UnitRemoved naming it; Reloading, as a daemon-reload can
change LoadState and User, which send no change signal), and that read is younger than
FULL_READ_EVERY. Signals arrive on the connection in the order PID 1 sent them, before the replies
to later calls: by the time the two replies are in, every signal sent before them has been seen.
PID 1 may hold a change signal back while its bus queues are busy and answer Gets meanwhile; a
change that moves neither of the two properties can then be seen a cycle or more late, at most
FULL_READ_EVERY. A new connection starts from a full read.
"""

from __future__ import annotations

import itertools
import socket
import struct
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from jeepney import DBusAddress, HeaderFields, Message, MessageType, new_method_call
from jeepney.io.blocking import prep_socket
from jeepney.low_level import Parser

from hydra_watchdog.printable import one_line

PRIVATE_SOCKET = "/run/systemd/private"
_SYSTEMD = "org.freedesktop.systemd1"
_MANAGER = DBusAddress("/org/freedesktop/systemd1", _SYSTEMD, f"{_SYSTEMD}.Manager")
_PROPERTIES = "org.freedesktop.DBus.Properties"
_UNIT_IF = f"{_SYSTEMD}.Unit"
_SERVICE_IF = f"{_SYSTEMD}.Service"

# Each property `SystemctlUnit` reads, with the interface that holds it (systemctl show merges the
# interfaces; Get needs the right one).
INTERFACE_OF: Mapping[str, str] = {
    "LoadState": _UNIT_IF,
    "ActiveState": _UNIT_IF,
    "SubState": _UNIT_IF,
    "InvocationID": _UNIT_IF,
    "ActiveEnterTimestampMonotonic": _UNIT_IF,
    "Job": _UNIT_IF,
    "Result": _SERVICE_IF,
    "NRestarts": _SERVICE_IF,
    "MainPID": _SERVICE_IF,
    "ControlGroup": _SERVICE_IF,
    "User": _SERVICE_IF,
    "ExecMainStatus": _SERVICE_IF,
    "ExecStart": _SERVICE_IF,
    "WorkingDirectory": _SERVICE_IF,
    "LoadCredential": _SERVICE_IF,  # read by `check` and `verify` (adapters/admin_key.py)
}
_PEER = "org.freedesktop.DBus.Peer"
# PID 1 (systemd 252, measured in the test namespace: 10 of 15 fresh connections) can leave the
# first call after authentication unread until more bytes arrive on the connection. So a wait
# is cut into slices, and each slice without an answer sends a Ping: its bytes wake the reader,
# and its reply (which no caller waits for) is skipped.
_NUDGE_AFTER = 0.1  # seconds
_READ_CHUNK = 65536
_SERIAL_AT = (
    8  # the serial's offset in a message header (after endian, type, flags, version, length)
)
_MAX_REPLY = 1 << 20  # PID 1 answers a Get in well under a KiB; more is not a reply to us
# Asked at every read: the state, and a restart even if two reads saw the same state.
LIVE = ("ActiveState", "InvocationID")
# A full read at least this often, signals or not (seconds): what a missed signal could cost.
FULL_READ_EVERY = 30.0
# The Manager's signals that name a unit (its name is in the body) and change what we read.
_UNIT_SIGNALS = frozenset({"JobNew", "JobRemoved", "UnitNew", "UnitRemoved"})


class BusError(Exception):
    """The bus could not be asked (connect, auth, I/O, deadline, an error reply)."""


def as_show_value(value: Any) -> str:
    """A property's D-Bus value as `systemctl show` prints it: an id128 (ay) as 32 hex digits
    (empty when unset), a job (uo: its id and object path) as its id (empty for 0: none),
    numbers in decimal, strings as they are, one command (ExecStart's a(sasbttttuii)) as
    `{ path=P ; argv[]=A0 A1 ; ignore_errors=no ; ... }` up to the fields we read (several: empty,
    as parse_show reads several lines), pairs of strings (LoadCredential's a(ss)) one
    "first:second" a line, as newer systemctl prints them (252 prints "[unprintable]")."""
    if isinstance(value, list) and value and all(_is_pair(v) for v in value):
        return "\n".join(f"{first}:{second}" for first, second in value)
    if isinstance(value, list):
        if len(value) != 1 or not _is_command(value[0]):
            return ""
        path, argv, ignore = value[0][:3]
        ignore_errors = as_show_value(ignore)
        return f"{{ path={path} ; argv[]={' '.join(argv)} ; ignore_errors={ignore_errors} }}"
    if isinstance(value, tuple):
        return as_show_value(value[0]) if value and value[0] else ""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


class UnitBus:
    """Reads one unit's properties over a connection kept between calls; a failed call drops
    the connection (the next call reconnects)."""

    def __init__(
        self,
        unit: str,
        *,
        path: str = PRIVATE_SOCKET,
        timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.unit = unit
        self.path = path
        self.timeout = timeout
        self._clock = clock
        self._sock: socket.socket | None = None
        self._parser = Parser()
        self._serials: Iterator[int] = itertools.count(1)
        self._object: str | None = None
        self._gets: dict[tuple[str, ...], list[bytes]] = {}  # serialised once per object path
        self._last: tuple[tuple[str, ...], dict[str, str], float] | None = None  # full read
        self._moved = False  # a signal about the unit came in since the last full read

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._object = None
        self._gets = {}
        self._parser = Parser()
        self._last = None  # signals sent while there was no connection were never seen

    def read(self, names: Sequence[str]) -> dict[str, str] | str:
        """The properties as `systemctl show` would print them, or why they could not be read.
        A property PID 1 does not know (an older systemd) is left out, as systemctl leaves it.
        The last full read answers when nothing moved since (see the module docstring)."""
        names = tuple(names)
        deadline = time.monotonic() + self.timeout
        try:
            sock = self._connect(deadline)
            obj = self._object or self._load_unit(sock, deadline)
            self._object = obj
            unchanged = self._unchanged(sock, obj, names, deadline)
            if unchanged is not None:
                return unchanged
            self._moved = False  # a signal during this read sets it again: read again next time
            replies = self._exchange(sock, self._get_calls(obj, names), deadline)
        except BusError as exc:
            self.close()
            # An error may quote what the peer sent: one bounded, printable line.
            return f"D-Bus {self.path}: {one_line(str(exc), 160)}"
        out = _values(names, replies)
        self._last = (names, out, self._clock())
        return dict(out)

    def _unchanged(
        self, sock: socket.socket, obj: str, names: tuple[str, ...], deadline: float
    ) -> dict[str, str] | None:
        """The last full read, when it is still what PID 1 would say; None: read in full."""
        last = self._last
        if last is None or last[0] != names or self._clock() - last[2] >= FULL_READ_EVERY:
            return None
        live = _values(LIVE, self._exchange(sock, self._get_calls(obj, LIVE), deadline))
        if self._moved or any(live.get(n) != last[1].get(n) for n in LIVE):
            return None
        return dict(last[1])

    def _saw(self, msg: Message) -> None:
        """A message that answers none of our calls: a signal about the unit marks the last
        full read as out of date."""
        if msg.header.message_type is not MessageType.signal:
            return
        fields = msg.header.fields
        member = fields.get(HeaderFields.member)
        if (
            fields.get(HeaderFields.path) == self._object
            or member == "Reloading"
            or (member in _UNIT_SIGNALS and self.unit in msg.body)
        ):
            self._moved = True

    def _connect(self, deadline: float) -> socket.socket:
        if self._sock is not None:
            return self._sock
        try:
            sock: socket.socket = prep_socket(self.path, enable_fds=False, timeout=_left(deadline))
        except OSError as exc:  # TimeoutError is an OSError
            raise BusError(f"cannot connect: {exc or type(exc).__name__}") from exc
        except Exception as exc:  # jeepney's AuthenticationError and kin
            raise BusError(f"authentication failed: {exc}") from exc
        self._sock = sock
        return sock

    def _get_calls(self, obj: str, names: tuple[str, ...]) -> list[bytes]:
        """The Get calls, serialised once (with serial 0): building messages is most of jeepney's
        cost per read, and only the serial changes between reads."""
        calls = self._gets.get(names)
        if calls is None:
            address = DBusAddress(obj, _SYSTEMD, _PROPERTIES)
            calls = [
                new_method_call(address, "Get", "ss", (INTERFACE_OF[n], n)).serialise(serial=0)
                for n in names
            ]
            self._gets[names] = calls
        return calls

    def _load_unit(self, sock: socket.socket, deadline: float) -> str:
        """The unit's object path, from PID 1 (not computed here: systemd's escaping is its
        own). LoadUnit also loads a unit that is not in memory, as `systemctl show` does."""
        call = new_method_call(_MANAGER, "LoadUnit", "s", (self.unit,)).serialise(serial=0)
        (reply,) = self._exchange(sock, [call], deadline)
        if reply.header.message_type is MessageType.error:
            raise BusError(f"LoadUnit({self.unit}) refused: {_error_text(reply)}")
        path = reply.body[0]
        if not isinstance(path, str) or not path.startswith("/"):
            raise BusError(f"LoadUnit({self.unit}) answered {path!r}, not an object path")
        return path

    def _exchange(
        self, sock: socket.socket, calls: Sequence[bytes], deadline: float
    ) -> list[Message]:
        """Send every call (serialised, little-endian) at once with fresh serials, then collect
        the reply to each, in the calls' order. Messages that answer none of them (a signal)
        are skipped."""
        serials = [next(self._serials) for _ in calls]
        pending = dict.fromkeys(serials)
        wire = bytearray()
        for call, serial in zip(calls, serials, strict=True):
            start = len(wire)
            wire += call
            struct.pack_into("<I", wire, start + _SERIAL_AT, serial)
        try:
            sock.settimeout(_left(deadline))
            sock.sendall(wire)
            got = 0
            while any(v is None for v in pending.values()):
                msg = self._next_message()
                if msg is None:
                    data = self._recv_nudging(sock, deadline)
                    if not data:
                        raise BusError("PID 1 closed the connection")
                    got += len(data)
                    if got > _MAX_REPLY:
                        raise BusError(f"over {_MAX_REPLY} bytes in answer to {len(calls)} calls")
                    self._parser.add_data(data)
                    continue
                serial = msg.header.fields.get(HeaderFields.reply_serial)
                if serial in pending:
                    pending[serial] = msg
                else:
                    self._saw(msg)
        except TimeoutError as exc:
            raise BusError(f"no answer within {self.timeout:g} s") from exc
        except OSError as exc:
            raise BusError(f"I/O failed: {exc}") from exc
        return [m for m in pending.values() if m is not None]

    def _next_message(self) -> Message | None:
        try:
            return self._parser.get_next_message()
        except Exception as exc:  # jeepney's parser on bytes that are not D-Bus: any error
            raise BusError(f"unreadable answer: {type(exc).__name__}: {exc}") from exc

    def _recv_nudging(self, sock: socket.socket, deadline: float) -> bytes:
        """The next bytes from PID 1, pinging it after each quiet slice (see _NUDGE_AFTER)."""
        while True:
            sock.settimeout(min(_NUDGE_AFTER, _left(deadline)))
            try:
                return sock.recv(_READ_CHUNK)
            except TimeoutError:
                _left(deadline)  # the deadline itself: raises
                ping = new_method_call(DBusAddress("/", _SYSTEMD, _PEER), "Ping")
                sock.sendall(ping.serialise(serial=next(self._serials)))


def _values(names: Sequence[str], replies: Sequence[Message]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, reply in zip(names, replies, strict=True):
        body = reply.body
        # A Get answers one variant, (signature, value); an error or anything else leaves the
        # property out, as systemctl leaves out one it cannot read.
        if reply.header.message_type is MessageType.error or not _is_variant(body):
            continue
        out[name] = as_show_value(body[0][1])
    return out


def _is_pair(entry: Any) -> bool:
    return isinstance(entry, tuple) and len(entry) == 2 and all(isinstance(x, str) for x in entry)


def _is_command(entry: Any) -> bool:
    return (
        isinstance(entry, tuple)
        and len(entry) >= 3
        and isinstance(entry[0], str)
        and isinstance(entry[1], list)
        and all(isinstance(arg, str) for arg in entry[1])
    )


def _is_variant(body: Any) -> bool:
    return (
        isinstance(body, tuple)
        and len(body) == 1
        and isinstance(body[0], tuple)
        and len(body[0]) == 2
    )


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError  # typed as BusError by the caller
    return left


def _error_text(reply: Message) -> str:
    name = reply.header.fields.get(HeaderFields.error_name, "error")
    text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
    return f"{name}: {text}" if text else str(name)
