"""Who is TabbyAPI: the identity rules behind every credential the watchdog sends and every
signal it sends.

Two questions, both answered from /proc and never from a command line alone (any local user can
put any text into an argv):

* Is the process behind TabbyAPI's listening socket TabbyAPI? (`ListenerGate`, asked just before
  every request that carries the admin key.) Under systemd: the socket's owner is the unit's
  MainPID or sits in the unit's cgroup, the full path systemd reports (a user's own
  `tabbyapi.service` lives under user@UID.service, never at that path). Without a unit to ask:
  the owner runs as TabbyAPI's uid, in our PID namespace, and its program (see "TabbyAPI's
  program" below) lies inside TabbyAPI's install tree, and the socket was created by that uid.
* Is this process outside the unit an orphan of TabbyAPI's? (It runs as TabbyAPI's uid, in our
  PID namespace, and runs TabbyAPI's own program: `runs_program` with `unit_programs`, or
  `is_tabby_program` without a unit; see adapters/procs.py.)

Paths are compared by component (`/opt/tabbyapi` holds `/opt/tabbyapi/main.py`, never
`/opt/tabbyapi-shared/x`). Start times are the kernel's clock ticks since boot
(/proc/PID/stat field 22): a wall-clock step cannot change them, so identity survives NTP.
"""

from __future__ import annotations

import os
import posixpath
import re
import socket
import struct
import threading
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from hydra_watchdog.config import Config, resolve_uid
from hydra_watchdog.observation import UnitStatus
from hydra_watchdog.printable import one_line


@dataclass(frozen=True)
class ProcIdentity:
    """What /proc says about one process, read once."""

    pid: int
    uid: int  # the real uid
    euid: int
    start_ticks: int  # clock ticks after boot: immune to wall-clock steps
    cmdline: tuple[str, ...]
    exe: str | None  # /proc/PID/exe, None when unreadable
    cwd: str | None
    pid_ns: str | None  # /proc/PID/ns/pid, e.g. "pid:[4026531836]"
    cgroups: tuple[str, ...]  # systemd's cgroup paths of /proc/PID/cgroup

    @property
    def command(self) -> str:
        return " ".join(self.cmdline)


_FIRST_READ = 4096
_NEXT_READS = 65536


def read_bytes(path: str, limit: int = 1 << 20) -> bytes | None:
    """Up to `limit` bytes of a (typically /proc) file; None when it cannot be read.

    Read with os.read until end of file: a buffered f.read(limit) allocates `limit` bytes up
    front, a fresh 1 MiB mapping per /proc file, and a cycle reads dozens of them (issue 15)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        parts: list[bytes] = []
        total, step = 0, _FIRST_READ  # most /proc files fit in one page
        while total < limit:
            chunk = os.read(fd, min(step, limit - total))
            if not chunk:
                break
            parts.append(chunk)
            total += len(chunk)
            step = _NEXT_READS
        return b"".join(parts)
    except OSError:
        return None
    finally:
        os.close(fd)


def read_text(path: str) -> str | None:
    raw = read_bytes(path)
    return None if raw is None else raw.decode(errors="replace")


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def cgroup_paths(text: str) -> tuple[str, ...]:
    """The paths of /proc/PID/cgroup that systemd tracks units by: the v2 line (`0::/x`) and, on
    hybrid hosts, the `name=systemd` line."""
    paths = []
    for line in text.splitlines():
        _, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if controllers in ("", "name=systemd"):
            paths.append(path)
    return tuple(paths)


def in_cgroup(path: str, cgroup: str) -> bool:
    """path is cgroup or below it. The root ("/" or "") contains no unit: never a match."""
    top = cgroup.rstrip("/")
    return bool(top) and (path == top or path.startswith(top + "/"))


def read_cmdline(pid: int, proc_root: str = "/proc") -> tuple[str, ...] | None:
    """A process's argv as the scanner records it; the kill re-reads it the same way, so the
    two compare equal for the same process (None: gone, a kernel thread or a zombie)."""
    raw = read_bytes(f"{proc_root}/{pid}/cmdline")
    if not raw:
        return None
    return tuple(raw.decode(errors="replace").rstrip("\0").split("\0"))


def stat_start_ticks(stat: str) -> tuple[str, int] | None:
    """(state, start ticks) from /proc/PID/stat text; None when malformed."""
    # Fields after the ")" closing the command name: state is the 1st, starttime the 20th.
    fields = stat.rpartition(")")[2].split()
    if len(fields) < 20 or not fields[19].isascii() or not fields[19].isdigit():
        return None
    return fields[0], int(fields[19])


def read_identity(pid: int, proc_root: str = "/proc") -> ProcIdentity | None:
    """None when the process is gone, a zombie, a kernel thread or unreadable.

    Read here, not with psutil: Process.oneshot() for the same answers, plus the start ticks,
    PID namespace and cgroups it has no call for, cost 1.5 ms against 0.6 ms for 5 processes
    (hot loop, issue 25), and the scan reads every candidate every cycle."""
    base = f"{proc_root}/{pid}"
    cmdline = read_cmdline(pid, proc_root)
    stat = read_text(f"{base}/stat")
    status = read_text(f"{base}/status")
    if cmdline is None or stat is None or status is None:
        return None
    parsed = stat_start_ticks(stat)
    if parsed is None or parsed[0] in ("Z", "X"):
        return None
    uids: list[int] = []
    for line in status.splitlines():
        if line.startswith("Uid:"):
            uids = [int(x) for x in line.split()[1:3] if x.isascii() and x.isdigit()]
    if len(uids) < 2:
        return None
    return ProcIdentity(
        pid=pid,
        uid=uids[0],
        euid=uids[1],
        start_ticks=parsed[1],
        cmdline=cmdline,
        exe=_readlink(f"{base}/exe"),
        cwd=_readlink(f"{base}/cwd"),
        pid_ns=_readlink(f"{base}/ns/pid"),
        cgroups=cgroup_paths(read_text(f"{base}/cgroup") or ""),
    )


def own_pid_namespace() -> str | None:
    return _readlink("/proc/self/ns/pid")


# --- the install tree -------------------------------------------------------------------------


def within(path: str, roots: Iterable[str]) -> bool:
    """`path` (absolute, normalised) is one of `roots` or below one, by whole components."""
    if not path.startswith("/"):
        return False
    norm = posixpath.normpath(path)
    for root in roots:
        top = posixpath.normpath(root)
        if top != "/" and (norm == top or norm.startswith(top + "/")):
            return True
    return False


# --- TabbyAPI's program ------------------------------------------------------------------------
#
# The program a process runs is its executable (/proc/PID/exe, which the kernel resolved), or,
# for an interpreter (Python, or a POSIX shell running a script), the script it runs: the first
# argument after the interpreter's options, resolved against the process's working directory
# when relative. Nothing else on a command line counts: argv[0] is any text its parent chose
# (`python3` run from /opt/tabbyapi is not /opt/tabbyapi/python3), and the arguments of a
# program that is no interpreter are its data (`sleep 25` from /opt/tabbyapi runs /usr/bin/sleep,
# not /opt/tabbyapi/25). An interpreter told to run no script file (`-c`, `-m`, `-` or stdin)
# runs no program here: it never matches, and neither does a script path holding `..` (which the
# kernel resolves through symlinks, not by text) or a relative one whose cwd cannot be read.
#
# A process is TabbyAPI's when its program is TabbyAPI's own program:
# * with a unit (`unit_programs`): the program the unit's ExecStart= runs (its executable, or the
#   script its interpreter runs, relative to WorkingDirectory=), and the program of any process
#   seen in the unit's cgroup (what a wrapper script such as start.sh exec'd or started; kept
#   across watchdog restarts, seen_programs.py); each
#   only while it lies inside the install tree (tabbyapi.cmdline_patterns), so a unit that runs
#   a generic tool (`/usr/bin/env`, `/bin/sleep`) makes no other use of that tool TabbyAPI's;
# * without a unit (`is_tabby_program`): a program inside the install tree.
# A process merely started from inside the tree (its cwd), or running another file of the tree
# (a `job.py` beside `main.py`), is not TabbyAPI's. Nor is one whose program, named alike, is
# another file in its own mount namespace (`same_program_file`).


@dataclass(frozen=True)
class _Options:
    """How an interpreter's command line names its script."""

    no_script: frozenset[str]  # option letters after which no script file runs
    with_value: frozenset[str]  # option letters whose value is the next argument (or attached)
    long_with_value: frozenset[str]  # --long options whose value is the next argument
    plus: bool  # shells also take options as `+o`


_PYTHON = _Options(frozenset("cm"), frozenset("WX"), frozenset({"--check-hash-based-pycs"}), False)
_SHELL = _Options(frozenset("cs"), frozenset("oO"), frozenset({"--rcfile", "--init-file"}), True)
_PYTHON_NAME = re.compile(r"python[0-9.]*[a-z]?", re.ASCII)  # python, python3.11, python3.13t
_SHELL_NAMES = frozenset({"sh", "bash", "dash"})


def _interpreter(path: str) -> _Options | None:
    name = posixpath.basename(path)
    if _PYTHON_NAME.fullmatch(name):
        return _PYTHON
    return _SHELL if name in _SHELL_NAMES else None


def script_argument(args: Sequence[str], options: _Options) -> str | None:
    """The script an interpreter runs, as its arguments (argv[1:]) name it; None when it runs
    none (`-c`, `-m`, `-`: code from elsewhere)."""
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest = args[i + 1 : i + 2]
            return rest[0] or None if rest else None
        if arg == "-":
            return None  # stdin
        if arg.startswith("--"):
            if arg in options.long_with_value:
                i += 1
        elif arg.startswith("-") or (options.plus and arg.startswith("+")):
            letters = arg[1:]
            for at, letter in enumerate(letters):
                if letter in options.no_script:
                    return None
                if letter in options.with_value:
                    i += at == len(letters) - 1  # no value attached: it is the next argument
                    break
        else:
            return arg or None
        i += 1
    return None


def _resolved(script: str, cwd: str | None) -> str | None:
    """`script` as an absolute path, by text: None where only the file system could say."""
    if not script.startswith("/"):
        if cwd is None or not cwd.startswith("/") or cwd.endswith(" (deleted)"):
            return None
        script = posixpath.join(cwd, script)
    if ".." in script.split("/"):
        return None
    return posixpath.normpath(script)


def program(ident: ProcIdentity) -> str | None:
    """The program a process runs (see above); None when it runs none we can name."""
    if not ident.exe:
        return None
    exe = ident.exe.removesuffix(" (deleted)")
    options = _interpreter(exe)
    if options is None:
        return exe
    script = script_argument(ident.cmdline[1:], options)
    return None if script is None else _resolved(script, ident.cwd)


def is_tabby_program(ident: ProcIdentity, install_dirs: Sequence[str]) -> bool:
    """Without a unit: the process's program lies inside the install tree."""
    found = program(ident)
    return found is not None and within(found, install_dirs)


def exec_program(unit: UnitStatus) -> str | None:
    """The program the unit's ExecStart= runs: its executable, or for an interpreter the script
    it names, relative to WorkingDirectory= (a system service's default: /)."""
    path = unit.exec_path
    if not path.startswith("/"):
        return None
    options = _interpreter(path) or _interpreter(os.path.realpath(path))
    if options is None:
        return posixpath.normpath(path)
    script = script_argument(unit.exec_argv[1:], options)
    # "!/x": WorkingDirectory=-/x (may be missing); "~": the user's home, not resolved here.
    cwd = unit.working_directory.removeprefix("!") or "/"
    return None if script is None else _resolved(script, cwd)


def unit_programs(
    unit: UnitStatus, seen: Iterable[str], install_dirs: Sequence[str]
) -> frozenset[str]:
    """TabbyAPI's own programs: the one ExecStart= runs and those `seen` run in the unit's
    cgroup, each where it lies inside the install tree; each also as the file system resolves
    it (the form /proc gives an executable in), where that lies inside too."""
    forms: set[str] = set()
    for named in (exec_program(unit), *seen):
        if named is None or not within(named, install_dirs):
            continue
        forms.add(named)
        real = os.path.realpath(named)
        if within(real, install_dirs):
            forms.add(real)
    return frozenset(forms)


def runs_program(ident: ProcIdentity, programs: Collection[str]) -> bool:
    """The process runs one of `programs` (compared as named: a script path is never resolved
    through symlinks, which whoever owns them could point elsewhere meanwhile)."""
    found = program(ident)
    return found is not None and found in programs


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def same_program_file(ident: ProcIdentity, proc_root: str = "/proc") -> bool:
    """The process's program, as the process sees it (through its root, in its own mount
    namespace), is the file systemd sees at that path (PID 1's root): the same (st_dev, st_ino).
    A program path is text: a root process in another mount namespace (a service with
    RootDirectory=, a container sharing our PID namespace) may run its own /opt/tabbyapi/main.py,
    another file. The watchdog's own namespace is no reference (its unit's ProtectHome= hides
    what TabbyAPI's may see); where it may not read PID 1's root (not root), it is used instead.
    False when either side cannot be read: never TabbyAPI's on a guess."""
    found = program(ident)
    if found is None:
        return False
    theirs = _file_id(f"{proc_root}/{ident.pid}/root{found}")
    try:
        os.stat(f"{proc_root}/1/root/")
        systemds = _file_id(f"{proc_root}/1/root{found}")
    except PermissionError:
        systemds = _file_id(found)
    except OSError:
        return False
    return theirs is not None and theirs == systemds


def tabby_uid(unit: UnitStatus | None, configured_user: str) -> tuple[int | None, str]:
    """(uid TabbyAPI runs as, the name it came from): the unit's User= (empty: root) when there
    is a unit, else `tabbyapi.user`."""
    name = (unit.user or "root") if unit is not None and unit.exists else configured_user
    return resolve_uid(name), name


def describe(ident: ProcIdentity) -> str:
    return f"pid {ident.pid}, uid {ident.uid}, `{one_line(ident.command)}`"


# --- listening sockets --------------------------------------------------------------------------

_SOCK_DIAG_BY_FAMILY = 20
_NETLINK_SOCK_DIAG = 4
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCP_LISTEN_STATE = 10
_TCP_LISTEN_HEX = "0A"
_NLMSG_HDR = struct.Struct("=IHHII")
_DIAG_MSG_LEN = 72  # struct inet_diag_msg


@dataclass(frozen=True)
class ListenSocket:
    inode: int
    port: int
    address: str  # as bound: "127.0.0.1", "0.0.0.0", "::1", "::"
    uid: int  # the socket's creator (its fsuid)
    cookie: int = 0  # sock_diag's 64-bit socket cookie, never reused (0: read from /proc/net)
    # IPV6_V6ONLY of an IPv6 socket, from sock_diag (INET_DIAG_SKV6ONLY); None: not known
    # (/proc/net has no such flag)
    v6only: bool | None = None

    def accepts(self, target: str) -> bool:
        """Whether a connection to `target` (an IP) can reach this socket: one bound to that
        address (a v4-mapped IPv6 one stands for its IPv4 address) or to its family's wildcard.
        An IPv6 wildcard takes IPv4 too unless IPV6_V6ONLY; where that is not known (read from
        /proc/net) it is counted as taking it: a listener is never left out on a guess."""
        bound = _unmapped(self.address)
        if bound == target:
            return True
        if self.address == "::":
            return ":" in target or self.v6only is not True
        return bound == "0.0.0.0" and ":" not in target  # noqa: S104 - a bound address, read


def connect_targets(host: str) -> tuple[str, ...]:
    """The addresses TabbyAPI's URL host stands for, never resolved (a name can be made to
    point elsewhere): an IP address is itself; `localhost` is 127.0.0.1, where TabbyAPI
    listens by default, and ::1 only where the verified TabbyAPI listens there and nothing
    at 127.0.0.1 (ListenerGate.check)."""
    host = host.strip("[]")
    return ("127.0.0.1", "::1") if host == "localhost" else (host,)


def reaching(sockets: Iterable[ListenSocket], target: str) -> tuple[ListenSocket, ...]:
    """Those of `sockets` that can take a connection to `target`: a socket bound to another
    address of the port, or an IPV6_V6ONLY wildcard for an IPv4 target, takes none."""
    return tuple(s for s in sockets if s.accepts(target))


def netlink_sockets(ports: Iterable[int]) -> list[ListenSocket] | None:
    """The TCP LISTEN sockets on `ports`, from NETLINK_SOCK_DIAG (what `ss -lt` uses). Asked for
    LISTEN only, the kernel walks just its listening hash; reading /proc/net/tcp walks the whole
    established-socket hash table instead, which costs ~4 ms per read on a 2-core VM and grows
    with every connection. None when netlink is not available (e.g. RestrictAddressFamilies=
    without AF_NETLINK): then the caller reads /proc/net/tcp{,6}."""
    wanted = set(ports)
    found: list[ListenSocket] = []
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as sock:
            sock.settimeout(1.0)
            for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
                sock.sendall(
                    _diag_request(family, 1 << _TCP_LISTEN_STATE, _NLM_F_REQUEST_DUMP, seq)
                )
                if not _read_diag_dump(sock, wanted, found):
                    return None
    except OSError:
        return None
    return found


def _diag_request(
    family: int, states: int, flags: int, seq: int, sockid: bytes = bytes(48)
) -> bytes:
    """A SOCK_DIAG_BY_FAMILY request for TCP: struct inet_diag_req_v2 (family, protocol, ext,
    pad, the states wanted, the socket id: empty for a dump) behind its netlink header."""
    req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, states) + sockid
    return _NLMSG_HDR.pack(_NLMSG_HDR.size + len(req), _SOCK_DIAG_BY_FAMILY, flags, seq, 0) + req


def _read_diag_dump(sock: socket.socket, wanted: set[int], found: list[ListenSocket]) -> bool:
    """Collect one dump's LISTEN sockets into `found`; False on an error reply or garbage."""
    while True:
        data = sock.recv(65536)
        if not data:
            return False
        off = 0
        while off + _NLMSG_HDR.size <= len(data):
            length, kind, _, _, _ = _NLMSG_HDR.unpack_from(data, off)
            if length < _NLMSG_HDR.size or off + length > len(data):
                return False
            if kind == _NLMSG_DONE:
                return True
            if kind == _NLMSG_ERROR:
                return False
            body = off + _NLMSG_HDR.size
            if kind == _SOCK_DIAG_BY_FAMILY and length >= _NLMSG_HDR.size + _DIAG_MSG_LEN:
                family, state = data[body], data[body + 1]
                (port,) = struct.unpack_from(">H", data, body + 4)  # id.idiag_sport
                raw = data[body + 8 : body + 8 + (4 if family == socket.AF_INET else 16)]
                uid, inode = struct.unpack_from("=II", data, body + 64)  # idiag_uid, idiag_inode
                low, high = struct.unpack_from("=II", data, body + 44)  # id.idiag_cookie[2]
                if state == _TCP_LISTEN_STATE and port in wanted and inode:
                    address = socket.inet_ntop(family, raw)
                    v6only = _v6only(data, body + _DIAG_MSG_LEN, off + length, family)
                    found.append(ListenSocket(inode, port, address, uid, low | high << 32, v6only))
            off += (length + 3) & ~3


_INET_DIAG_SKV6ONLY = 11  # a u8 attribute the kernel adds to every IPv6 LISTEN socket's answer
_RTA_HDR = struct.Struct("=HH")


def _v6only(data: bytes, start: int, end: int, family: int) -> bool | None:
    """IPV6_V6ONLY from the attributes after a socket's inet_diag_msg (data[start:end]): False
    for an IPv4 socket, None when an IPv6 socket's answer does not carry it."""
    if family != socket.AF_INET6:
        return False
    while start + _RTA_HDR.size <= end:
        length, kind = _RTA_HDR.unpack_from(data, start)
        if length < _RTA_HDR.size or start + length > end:
            return None
        if kind == _INET_DIAG_SKV6ONLY and length > _RTA_HDR.size:
            return data[start + _RTA_HDR.size] != 0
        start += (length + 3) & ~3
    return None


_NLM_F_REQUEST = 0x1
_TCP_ESTABLISHED = 1
_TCP_ESTABLISHED_HEX = "01"
_NO_COOKIE = 0xFFFFFFFF  # INET_DIAG_NOCOOKIE: look the socket up by its addresses alone
FAR_END_PAUSES = (0.0, 0.001, 0.005)  # seconds before each look for an ESTABLISHED far end


def far_end_uid(conn: socket.socket) -> int | None:
    """The uid of the socket at the far end of a local TCP connection we made: the socket the
    listener's queue holds for it, which the kernel clones from the listener, uid included.
    None while that end is not ESTABLISHED (a half-open one reports uid 0, whoever listens),
    or when it cannot be seen: the connection is gone, or neither sock_diag nor /proc/net
    shows it (then nothing may go over the connection)."""
    try:
        local, peer = conn.getsockname(), conn.getpeername()
    except OSError:
        return None
    for pause in FAR_END_PAUSES:
        time.sleep(pause)  # the kernel may still be completing the handshake on its side
        found = _far_end_netlink(conn.family, local, peer)
        if found is _UNSEEN:
            found = _far_end_proc_net(local, peer)
        if isinstance(found, int):
            return found
    return None


_UNSEEN = object()  # sock_diag could not be asked: read /proc/net instead


def _far_end_netlink(family: int, local: tuple[Any, ...], peer: tuple[Any, ...]) -> object:
    """The far end's uid by sock_diag's exact lookup (the socket's own view: its source is our
    peer); None when it is not an ESTABLISHED socket, _UNSEEN when netlink cannot be used."""
    src = socket.inet_pton(family, peer[0]).ljust(16, b"\0")
    dst = socket.inet_pton(family, local[0]).ljust(16, b"\0")
    sockid = struct.pack(">HH", peer[1], local[1]) + src + dst
    sockid += struct.pack("=III", 0, _NO_COOKIE, _NO_COOKIE)  # idiag_if, idiag_cookie
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(1.0)
            nl.sendall(_diag_request(family, 0xFFFFFFFF, _NLM_F_REQUEST, 1, sockid))
            data = nl.recv(65536)
    except OSError:
        return _UNSEEN
    if len(data) < _NLMSG_HDR.size:
        return None
    length, kind, _, _, _ = _NLMSG_HDR.unpack_from(data, 0)
    body = _NLMSG_HDR.size
    if kind != _SOCK_DIAG_BY_FAMILY or len(data) < body + _DIAG_MSG_LEN or length > len(data):
        return None  # NLMSG_ERROR: no such socket
    state = data[body + 1]
    ports = struct.unpack_from(">HH", data, body + 4)
    # (a dual-stack listener's end is an IPv6 socket with a v4-mapped address: not compared)
    if (state, ports) != (_TCP_ESTABLISHED, (peer[1], local[1])):
        return None
    (uid,) = struct.unpack_from("=I", data, body + 64)
    return int(uid)


def _far_end_proc_net(local: tuple[Any, ...], peer: tuple[Any, ...]) -> int | None:
    """The far end's uid from /proc/net/tcp{,6} (where netlink is not allowed); both files, as
    a dual-stack listener's end is listed in tcp6 with v4-mapped addresses."""
    want = (_unmapped(peer[0]), peer[1], _unmapped(local[0]), local[1])
    for name in ("tcp", "tcp6"):
        for line in (read_text(f"/proc/net/{name}") or "").splitlines()[1:]:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _TCP_ESTABLISHED_HEX:
                continue
            try:
                (la, _, lp), (ra, _, rp) = fields[1].rpartition(":"), fields[2].rpartition(":")
                ends = (
                    _unmapped(_proc_net_address(la)),
                    int(lp, 16),
                    _unmapped(_proc_net_address(ra)),
                    int(rp, 16),
                )
                if ends == want:
                    return int(fields[7])
            except ValueError:
                continue
    return None


def _unmapped(address: str) -> str:
    """An IPv4-mapped IPv6 address as the IPv4 address it stands for."""
    return address.removeprefix("::ffff:")


def parse_proc_net(text: str, ports: Iterable[int]) -> list[ListenSocket]:
    """/proc/net/tcp or tcp6 text → the LISTEN sockets on `ports`."""
    wanted = set(ports)
    found: list[ListenSocket] = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != _TCP_LISTEN_HEX:
            continue
        try:
            addr_hex, _, port_hex = fields[1].rpartition(":")
            port, uid, inode = int(port_hex, 16), int(fields[7]), int(fields[9])
            address = _proc_net_address(addr_hex)
        except ValueError:
            continue
        if port in wanted and inode:
            found.append(ListenSocket(inode, port, address, uid))
    return found


def _proc_net_address(hex_text: str) -> str:
    raw = bytes.fromhex(hex_text)
    # The kernel prints each 32-bit word in host byte order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if len(words) not in (4, 16):
        raise ValueError(hex_text)
    return socket.inet_ntop(socket.AF_INET6 if len(words) == 16 else socket.AF_INET, words)


def listen_sockets(ports: Sequence[int], proc_root: str = "/proc") -> list[ListenSocket]:
    if proc_root == "/proc":  # netlink answers for this process's own namespace only
        found = netlink_sockets(ports)
        if found is not None:
            return found
    sockets: list[ListenSocket] = []
    for name in ("tcp", "tcp6"):
        text = read_text(f"{proc_root}/net/{name}")
        if text is not None:
            sockets.extend(parse_proc_net(text, ports))
    return sockets


def all_pids(proc_root: str = "/proc") -> list[int]:
    try:
        return [int(name) for name in os.listdir(proc_root) if name.isdigit()]
    except OSError:
        return []


def socket_owners(
    pids: Iterable[int], inodes: Iterable[int], proc_root: str = "/proc", *, first: bool = False
) -> dict[int, set[int]]:
    """{socket inode: pids holding it} among `pids`; with first=True, stop once every inode has
    one holder."""
    owners: dict[int, set[int]] = {}
    targets = {f"socket:[{inode}]": inode for inode in inodes}
    if not targets:
        return owners
    for pid in pids:
        fd_dir = f"{proc_root}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            link = _readlink(f"{fd_dir}/{fd}")
            inode = targets.get(link) if link is not None else None
            if inode is not None:
                owners.setdefault(inode, set()).add(pid)
        if first and len(owners) == len(targets):
            break
    return owners


def pids_of_uid(pids: Iterable[int], uid: int, proc_root: str = "/proc") -> list[int]:
    """The processes whose /proc entry belongs to `uid` (their effective uid; a non-dumpable
    process shows root): a cheap first place to look for the holder of a socket `uid` made."""
    found = []
    for pid in pids:
        try:
            if os.stat(f"{proc_root}/{pid}").st_uid == uid:
                found.append(pid)
        except OSError:
            continue
    return found


def fewest_fds_first(pids: Iterable[int], proc_root: str = "/proc") -> list[int]:
    """`pids` ordered by how many fds each holds (the size Linux >= 6.2 reports for
    /proc/PID/fd; 0 before, which keeps the order): a search that stops at the first holder
    reads the small processes before the one holding 10,000 connections."""

    def count(pid: int) -> int:
        try:
            return os.stat(f"{proc_root}/{pid}/fd").st_size
        except OSError:
            return 0

    return sorted(pids, key=count)


def find_owners(
    sockets: Sequence[ListenSocket],
    candidates: Iterable[int],
    proc_root: str = "/proc",
    *,
    everyone: bool = False,
) -> dict[int, set[int]]:
    """Holders of `sockets`: every holder among `candidates`; for an inode still unowned, the
    processes of the socket's uid (netlink gives it), then every other process, each stopping
    at the first holder and reading the processes with fewest fds first. `everyone` searches
    every process for every holder instead (slow: every fd of the host is read)."""
    candidates = list(candidates)
    inodes = {s.inode for s in sockets}
    owners = socket_owners(candidates, inodes, proc_root)
    missing = [s for s in sockets if s.inode not in owners]
    if not missing and not everyone:
        return owners
    pids = all_pids(proc_root)
    seen = set(candidates)
    if not everyone:
        for uid in sorted({s.uid for s in missing}):
            mine = [p for p in pids_of_uid(pids, uid, proc_root) if p not in seen]
            want = {s.inode for s in missing if s.uid == uid}
            mine = fewest_fds_first(mine, proc_root)
            for inode, holders in socket_owners(mine, want, proc_root, first=True).items():
                owners.setdefault(inode, set()).update(holders)
            seen.update(mine)
        missing = [s for s in sockets if s.inode not in owners]
        if not missing:
            return owners
        rest = fewest_fds_first((p for p in pids if p not in seen), proc_root)
        want = {s.inode for s in missing}
        for inode, holders in socket_owners(rest, want, proc_root, first=True).items():
            owners.setdefault(inode, set()).update(holders)
        return owners
    rest = [p for p in pids if p not in seen]
    for inode, holders in socket_owners(rest, inodes, proc_root).items():
        owners.setdefault(inode, set()).update(holders)
    return owners


# --- the gate for credentials -------------------------------------------------------------------


@dataclass(frozen=True)
class ListenerCheck:
    """The verdict on the listener behind TabbyAPI's URL, taken before a request to it.

    ok: send, to `address` (the IP verified; a name like `localhost` is never resolved again).
    refused: nothing listens there (`address`: where a connection would be refused).
    `detail` says what was found; the caller says what it did about it (withheld, not sent).
    """

    ok: bool
    detail: str
    address: str = ""
    refused: bool = False
    pid: int | None = None  # ok: the verified listener's process
    sockets: tuple[ListenSocket, ...] = ()  # ok: the listening sockets verified


def unit_cgroup_members(cgroup: str, cgroup_root: str = "/sys/fs/cgroup") -> set[int] | None:
    """PIDs in the unit's cgroup and below: cgroup v2, or on hybrid hosts the name=systemd
    hierarchy (and the v2 one mounted at `unified`). None: no hierarchy has that cgroup."""
    rel = cgroup.strip("/")
    if not rel:  # "" or "/": no unit, or the whole machine
        return set()
    for hierarchy in ("", "systemd", "unified"):
        top = os.path.join(cgroup_root, hierarchy, rel)
        if os.path.isfile(os.path.join(top, "cgroup.procs")):
            pids: set[int] = set()
            for dirpath, _, files in os.walk(top):
                if "cgroup.procs" in files:
                    text = read_text(os.path.join(dirpath, "cgroup.procs")) or ""
                    pids.update(int(x) for x in text.split() if x.isdigit())
            return pids
    return None


def live_start_ticks(pid: int, proc_root: str = "/proc") -> int | None:
    """The start ticks of `pid` while it is a live process; None when it is gone, a zombie or
    unreadable. Equal ticks say it is still the same process, not a later one with its number."""
    parsed = stat_start_ticks(read_text(f"{proc_root}/{pid}/stat") or "")
    if parsed is None or parsed[0] in ("Z", "X"):
        return None
    return parsed[1]


@dataclass(frozen=True)
class _Vouched:
    """A listener verified as TabbyAPI, and everything that verdict rested on.

    The verdict is reused, without reading every holder's identity from /proc again (most of
    a cycle's check), only while all of that is unchanged: the same unit status, the same
    listening sockets (sock_diag's cookie, which the kernel never reuses, with inode, address
    and uid, read again for every request) and each socket's verified holder still the same
    process (pid and start time). A squatter can change none of them unseen: its own socket
    is a new one, and a listener can only move to another process by its holder's own doing
    (fork or SCM_RIGHTS), as a process can only exec another program by its own doing. Where
    sock_diag is unavailable (/proc/net: no cookie), a new socket must also reuse the
    vouched one's inode number and uid, while its holder lives, to pass."""

    unit: UnitStatus | None
    target: str
    sockets: tuple[ListenSocket, ...]
    holders: tuple[tuple[int, int], ...]
    check: ListenerCheck

    def still_holds(
        self,
        unit: UnitStatus | None,
        target: str,
        sockets: tuple[ListenSocket, ...],
        proc_root: str,
    ) -> bool:
        return (
            unit == self.unit
            and target == self.target
            and sockets == self.sockets
            and all(live_start_ticks(pid, proc_root) == t for pid, t in self.holders)
        )


class ListenerGate:
    """Answers "may the admin key go to whoever listens on TabbyAPI's port now?".

    The observer hands it each cycle's unit status (`set_unit`) before any request with a key is
    made; until then nothing is verified and nothing is sent."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        install_dirs: Sequence[str],
        user: str,
        proc_root: str = "/proc",
        cgroup_root: str = "/sys/fs/cgroup",
    ) -> None:
        self.targets = connect_targets(host)
        self.port = port
        self.install_dirs = tuple(install_dirs)
        self.user = user
        self.proc_root = proc_root
        self.cgroup_root = cgroup_root
        self._unit: UnitStatus | None = None
        self._vouched: _Vouched | None = None  # the last verdict that let a request go
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg: Config) -> ListenerGate:
        """The gate for the listener behind tabbyapi.url."""
        t = cfg.tabbyapi
        return cls(t.host, t.port, install_dirs=t.cmdline_patterns, user=t.user)

    def set_unit(self, unit: UnitStatus) -> None:
        with self._lock:
            self._unit = unit

    def check(self) -> ListenerCheck:
        """The verdict on the listeners that can take a connection to the URL's address: one
        bound elsewhere on the port (another address, an IPV6_V6ONLY wildcard for IPv4) is
        nobody a request could reach. For `localhost`, ::1 is judged only while nothing
        listens at 127.0.0.1, and taken only for the verified TabbyAPI: another user's socket
        there is a bystander, never the reason TabbyAPI is withheld or called down."""
        with self._lock:
            unit, vouched = self._unit, self._vouched
        sockets = listen_sockets((self.port,), self.proc_root)
        first, *others = self.targets
        taking = reaching(sockets, first)
        if taking:
            return self._judge(first, taking, unit, vouched)
        for other in others:
            taking = reaching(sockets, other)
            check = self._judge(other, taking, unit, vouched) if taking else None
            if check is not None and check.ok:
                return check
        nobody = f"nothing listens on port {self.port}"
        return ListenerCheck(False, nobody, address=first, refused=True)

    def _judge(
        self,
        target: str,
        taking: tuple[ListenSocket, ...],
        unit: UnitStatus | None,
        vouched: _Vouched | None,
    ) -> ListenerCheck:
        """The verdict on `taking`, the listeners of `target`: the vouched one while it still
        holds, else verified afresh (and vouched for when it passes)."""
        if vouched is not None and vouched.still_holds(unit, target, taking, self.proc_root):
            return vouched.check
        check, holders = self._verify(target, taking, unit)
        fresh = _Vouched(unit, target, taking, holders, check)
        with self._lock:
            self._vouched = fresh if check.ok and unit is not None else None
        return check

    def _verify(
        self, target: str, reaching: Sequence[ListenSocket], unit: UnitStatus | None
    ) -> tuple[ListenerCheck, tuple[tuple[int, int], ...]]:
        """The verdict, and (pid, start ticks) of each socket's holder it rests on."""
        if unit is None:
            return ListenerCheck(False, "TabbyAPI's unit not read yet"), ()
        by_unit = unit.available and unit.exists
        members: set[int] = set()
        if by_unit:
            members = unit_cgroup_members(unit.control_group, self.cgroup_root) or set()
        candidates = sorted(members | ({unit.main_pid} if unit.main_pid else set()))
        owners = find_owners(reaching, candidates, self.proc_root)
        uid, uid_name = tabby_uid(unit, self.user)
        ns = own_pid_namespace() if self.proc_root == "/proc" else None
        verified: int | None = None
        holders_seen: list[tuple[int, int]] = []
        for sock in reaching:
            holders = sorted(owners.get(sock.inode, ()))
            if not holders:
                return ListenerCheck(
                    False,
                    f"port {sock.port} ({sock.address}) is held by a process of uid {sock.uid} "
                    "that cannot be seen: not TabbyAPI",
                ), ()
            pid = holders[0]
            verified = pid
            ident = read_identity(pid, self.proc_root)
            if ident is None:
                why = f"port {sock.port}: pid {pid} vanished; not verified as TabbyAPI"
                return ListenerCheck(False, why), ()
            holders_seen.append((pid, ident.start_ticks))
            if by_unit:
                # The unit's cgroup, which only systemd puts processes in. MainPID alone only
                # where the unit names no cgroup: a PID number can be had again by anyone, and
                # a unit status read minutes ago (a load's helper) may still name it.
                ok = any(in_cgroup(p, unit.control_group) for p in ident.cgroups) or (
                    pid == unit.main_pid and not unit.control_group
                )
                why = f"not in {unit.name}"
            else:
                ok = (
                    uid is not None
                    and ident.uid == uid
                    and sock.uid == uid
                    and (ns is None or ident.pid_ns == ns)
                    and is_tabby_program(ident, self.install_dirs)
                )
                why = f"not {uid_name}'s TabbyAPI from {', '.join(self.install_dirs)}"
            if not ok:
                return ListenerCheck(
                    False, f"port {sock.port} held by {describe(ident)} ({why}): not TabbyAPI"
                ), ()
        verdict = ListenerCheck(
            True,
            f"port {self.port}: TabbyAPI verified",
            address=target,
            pid=verified,
            sockets=tuple(reaching),
        )
        return verdict, tuple(holders_seen)
