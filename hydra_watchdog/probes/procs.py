"""Who holds TabbyAPI's port and its VRAM, and which of them are orphans: read from /proc.

Cost matters (this runs every cycle): `psutil.net_connections()` walks every fd of every process
(~400 ms with 20k sockets). Instead the LISTEN sockets on the two ports are taken from
/proc/net/tcp{,6} (their inodes), and only candidate processes' fds are searched for those
inodes: the unit's cgroup, the processes whose command line matches the patterns, the GPU
memory holders. Only when an owner is still unknown, or the caller asks (`full=True`), is every
process's fd table searched.

Each process is read with the tolerance of a live system: any PID may exit, or be unreadable,
between two reads; such a process is skipped, never an exception.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hydra_watchdog.observation import (
    GpuReport,
    Listener,
    PortReport,
    ProcessInfo,
    ProcessRole,
    UnitStatus,
)

if TYPE_CHECKING:
    from hydra_watchdog.config import Config

_TCP_LISTEN = "0A"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def parse_listeners(text: str, ports: Iterable[int]) -> dict[int, int]:
    """/proc/net/tcp or tcp6 text → {socket inode: port} of the LISTEN sockets on `ports`."""
    wanted = set(ports)
    found: dict[int, int] = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != _TCP_LISTEN:
            continue
        try:
            port = int(fields[1].rpartition(":")[2], 16)
            inode = int(fields[9])
        except ValueError:
            continue
        if port in wanted and inode:
            found[inode] = port
    return found


_SOCK_DIAG_BY_FAMILY = 20
_NETLINK_SOCK_DIAG = 4
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCP_LISTEN_STATE = 10
_NLMSG_HDR = struct.Struct("=IHHII")
_DIAG_MSG_LEN = 72  # struct inet_diag_msg


def netlink_listeners(ports: Iterable[int]) -> dict[int, int] | None:
    """{socket inode: port} of the TCP LISTEN sockets on `ports`, from NETLINK_SOCK_DIAG (what
    `ss -lt` uses). Asked for LISTEN only, the kernel walks just its listening hash; reading
    /proc/net/tcp walks the whole established-socket hash table instead, which costs ~4 ms per
    read on a 2-core VM even with no sockets open, and grows with every connection. None when
    netlink is not available (e.g. RestrictAddressFamilies= without AF_NETLINK): then the
    caller reads /proc/net/tcp{,6}."""
    wanted = set(ports)
    found: dict[int, int] = {}
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as sock:
            sock.settimeout(1.0)
            for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
                # struct inet_diag_req_v2: family, protocol, ext, pad, states, an empty sockid
                req = struct.pack(
                    "=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 1 << _TCP_LISTEN_STATE
                ) + bytes(48)
                hdr = _NLMSG_HDR.pack(
                    _NLMSG_HDR.size + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP, seq, 0
                )
                sock.sendall(hdr + req)
                if not _read_diag_dump(sock, wanted, found):
                    return None
    except OSError:
        return None
    return found


def _read_diag_dump(sock: socket.socket, wanted: set[int], found: dict[int, int]) -> bool:
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
                state = data[body + 1]
                (port,) = struct.unpack_from(">H", data, body + 4)  # id.idiag_sport
                (inode,) = struct.unpack_from("=I", data, body + 68)  # idiag_inode
                if state == _TCP_LISTEN_STATE and port in wanted and inode:
                    found[inode] = port
            off += (length + 3) & ~3


def matches(cmdline: Sequence[str], patterns: Sequence[str]) -> bool:
    joined = " ".join(cmdline)
    return any(pattern in joined for pattern in patterns)


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


def read_cmdline(pid: int, proc_root: str = "/proc") -> tuple[str, ...] | None:
    """A process's argv as the scanner records it; the kill re-reads it the same way, so the
    two compare equal for the same process (None: gone, a kernel thread or a zombie)."""
    raw = _read_bytes(f"{proc_root}/{pid}/cmdline")
    if not raw:
        return None
    return tuple(raw.decode(errors="replace").rstrip("\0").split("\0"))


def in_unit(pid: int, unit: str, proc_root: str = "/proc") -> bool | None:
    """Whether the process now sits in `unit`'s cgroup (or below it), by /proc/PID/cgroup
    alone; None when that cannot be read."""
    text = _read_text(f"{proc_root}/{pid}/cgroup")
    if text is None:
        return None
    return any(unit in path.split("/") for path in cgroup_paths(text))


def in_cgroup(path: str, cgroup: str) -> bool:
    """path is cgroup or below it. The root ("/" or "") contains no unit: never a match."""
    top = cgroup.rstrip("/")
    return bool(top) and (path == top or path.startswith(top + "/"))


@dataclass(frozen=True)
class _Proc:
    pid: int
    start_time: float
    cmdline: tuple[str, ...]


class ProcScanner:
    """ProcessScanner over a /proc tree (`proc_root`) and a cgroup tree (`cgroup_root`)."""

    def __init__(
        self,
        port: int,
        cmdline_patterns: Sequence[str],
        proc_root: str = "/proc",
        cgroup_root: str = "/sys/fs/cgroup",
    ) -> None:
        self.port = port
        self.patterns = tuple(p for p in cmdline_patterns if p)
        self.proc_root = proc_root.rstrip("/") or "/"
        self.cgroup_root = cgroup_root
        self._btime: float | None = None
        self._own_service: str | None = None  # the watchdog's own .service cgroup ("" if none)

    @classmethod
    def from_config(cls, config: Config) -> ProcScanner:
        return cls(config.tabbyapi.port, config.tabbyapi.cmdline_patterns)

    # -- the scan ---------------------------------------------------------------------------

    def scan(
        self, unit: UnitStatus, gpus: GpuReport, *, full: bool
    ) -> tuple[PortReport, tuple[ProcessInfo, ...]]:
        ports = (self.port, self.port + 1)
        sockets = self._listening_sockets(ports)
        main_pid = unit.main_pid if unit.main_pid and unit.main_pid > 0 else None
        all_pids = self._pids()
        pattern_pids = {pid for pid in all_pids if self._matches(pid)}
        members = self._unit_members(unit.control_group)
        if members is None:  # no cgroup tree to read: ask every process where it lives
            members = {p for p in all_pids if self._in_unit_cgroup(p, unit.control_group)}
        gpu_bytes = self._gpu_holders(gpus)

        candidates = members | pattern_pids | set(gpu_bytes)
        if main_pid is not None:
            candidates.add(main_pid)
        owners = self._socket_owners(sorted(candidates), sockets)
        searched_all = full or any(inode not in owners for inode in sockets)
        if searched_all:
            rest = [pid for pid in all_pids if pid not in candidates]
            for inode, pids in self._socket_owners(rest, sockets).items():
                owners.setdefault(inode, set()).update(pids)

        found: set[Listener] = set()
        for inode, port in sockets.items():
            holders: set[int | None] = set(owners.get(inode, ())) or {None}  # None: unseen
            found.update(Listener(port=port, pid=pid) for pid in holders)
        listeners = sorted(found, key=lambda lst: (lst.port, lst.pid or 0))
        listens: dict[int, set[int]] = {}
        for lst in listeners:
            if lst.pid is not None:
                listens.setdefault(lst.pid, set()).add(lst.port)

        processes = []
        for pid in sorted(candidates | set(listens)):
            proc = self._read(pid)
            if proc is None:  # exited, a zombie, or unreadable: nothing to act on
                continue
            role = self._role(proc, main_pid, members, unit.control_group)
            # Listed for its command line alone, which no longer matches: the PID was reused,
            # or a forked child of a matching process has exec'd something else since.
            if role is ProcessRole.FOREIGN and pid not in listens and pid not in gpu_bytes:
                continue
            processes.append(
                ProcessInfo(
                    pid=pid,
                    start_time=proc.start_time,
                    cmdline=proc.cmdline,
                    role=role,
                    gpu_bytes=gpu_bytes.get(pid, 0),
                    listens_on=tuple(sorted(listens.get(pid, ()))),
                )
            )
        report = PortReport(port=self.port, listeners=tuple(listeners), full_scan=searched_all)
        return report, tuple(processes)

    def _role(
        self, proc: _Proc, main_pid: int | None, members: set[int], cgroup: str
    ) -> ProcessRole:
        if proc.pid == main_pid:
            return ProcessRole.MAIN
        if proc.pid in members or self._in_unit_cgroup(proc.pid, cgroup):
            return ProcessRole.UNIT
        # The watchdog itself is never an orphan, whatever the patterns say.
        if matches(proc.cmdline, self.patterns) and not self._is_self(proc.pid):
            return ProcessRole.ORPHAN
        return ProcessRole.FOREIGN

    def _is_self(self, pid: int) -> bool:
        """The watchdog, or a process in its own systemd service (its `ldd` of TabbyAPI's venv
        names the venv, so it matches the patterns: ours, never TabbyAPI's orphan). Outside a
        service (a shell, a test) only the watchdog's own PID is exempt."""
        if self.proc_root != "/proc":
            return False
        if pid == os.getpid():
            return True
        if self._own_service is None:
            mine = _read_text("/proc/self/cgroup") or ""
            services = [p for p in cgroup_paths(mine) if p.endswith(".service")]
            self._own_service = services[0] if services else ""
        own = self._own_service
        if not own:
            return False
        theirs = _read_text(f"/proc/{pid}/cgroup")
        return theirs is not None and any(in_cgroup(p, own) for p in cgroup_paths(theirs))

    # -- /proc readers ----------------------------------------------------------------------

    def _pids(self) -> list[int]:
        try:
            return [int(name) for name in os.listdir(self.proc_root) if name.isdigit()]
        except OSError:
            return []

    def _listening_sockets(self, ports: Sequence[int]) -> dict[int, int]:
        if self.proc_root == "/proc":  # netlink answers for this process's own namespace only
            found = netlink_listeners(ports)
            if found is not None:
                return found
        sockets: dict[int, int] = {}
        for name in ("tcp", "tcp6"):
            text = _read_text(f"{self.proc_root}/net/{name}")
            if text is not None:
                sockets.update(parse_listeners(text, ports))
        return sockets

    def _cmdline(self, pid: int) -> tuple[str, ...] | None:
        return read_cmdline(pid, self.proc_root)

    def _matches(self, pid: int) -> bool:
        cmdline = self._cmdline(pid)
        return cmdline is not None and matches(cmdline, self.patterns)

    def _unit_members(self, cgroup: str) -> set[int] | None:
        """PIDs in the unit's cgroup and its children: cgroup v2 (`/sys/fs/cgroup/<cg>`), or
        on hybrid hosts the name=systemd hierarchy (and the v2 one mounted at `unified`).
        None: no hierarchy has that cgroup (not mounted, or the unit has none)."""
        if not cgroup:
            return set()
        rel = cgroup.strip("/")
        if not rel:  # "/" would be the whole machine, never a unit
            return set()
        for hierarchy in ("", "systemd", "unified"):
            top = os.path.join(self.cgroup_root, hierarchy, rel)
            if os.path.isfile(os.path.join(top, "cgroup.procs")):
                return _cgroup_procs(top)
        return None

    def _in_unit_cgroup(self, pid: int, cgroup: str) -> bool:
        text = _read_text(f"{self.proc_root}/{pid}/cgroup")
        return text is not None and any(in_cgroup(p, cgroup) for p in cgroup_paths(text))

    def _gpu_holders(self, gpus: GpuReport) -> dict[int, int]:
        """{pid: bytes held on the configured GPUs} for holders that are still alive."""
        held: dict[int, int] = {}
        for device in gpus.devices:
            for gp in device.processes:
                if gp.pid > 0 and os.path.exists(f"{self.proc_root}/{gp.pid}"):
                    held[gp.pid] = held.get(gp.pid, 0) + (gp.used_bytes or 0)
        return held

    def _socket_owners(self, pids: Iterable[int], sockets: dict[int, int]) -> dict[int, set[int]]:
        """{socket inode: pids holding it} among `pids`."""
        owners: dict[int, set[int]] = {}
        if not sockets:
            return owners
        targets = {f"socket:[{inode}]": inode for inode in sockets}
        for pid in pids:
            fd_dir = f"{self.proc_root}/{pid}/fd"
            try:
                fds = os.listdir(fd_dir)
            except OSError:
                continue
            for fd in fds:
                try:
                    link = os.readlink(f"{fd_dir}/{fd}")
                except OSError:
                    continue
                inode = targets.get(link)
                if inode is not None:
                    owners.setdefault(inode, set()).add(pid)
        return owners

    def _read(self, pid: int) -> _Proc | None:
        cmdline = self._cmdline(pid)
        stat = _read_text(f"{self.proc_root}/{pid}/stat")
        btime = self._boot_time()
        if cmdline is None or stat is None or btime is None:
            return None
        # Fields after the ")" closing the command name: state is the 1st, starttime the 20th.
        fields = stat.rpartition(")")[2].split()
        if len(fields) < 20 or fields[0] in ("Z", "X"):
            return None
        # Exactly psutil's create_time(): an actuator re-reading it with psutil gets the same float.
        start_time = float(fields[19]) / _CLOCK_TICKS + btime
        return _Proc(pid=pid, start_time=start_time, cmdline=cmdline)

    def _boot_time(self) -> float | None:
        if self._btime is None:
            text = _read_text(f"{self.proc_root}/stat") or ""
            for line in text.splitlines():
                if line.startswith("btime"):
                    self._btime = float(line.split()[1])
        return self._btime


def _cgroup_procs(top: str) -> set[int]:
    pids: set[int] = set()
    for dirpath, _, files in os.walk(top):
        if "cgroup.procs" in files:
            text = _read_text(os.path.join(dirpath, "cgroup.procs")) or ""
            pids.update(int(x) for x in text.split() if x.isdigit())
    return pids


def _read_text(path: str) -> str | None:
    raw = _read_bytes(path)
    return None if raw is None else raw.decode(errors="replace")


def _read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None
