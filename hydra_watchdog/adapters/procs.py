"""Who holds TabbyAPI's port and its VRAM, and which of them are orphans: read from /proc.

Cost matters (this runs every cycle): `psutil.net_connections()` walks every fd of every process
(~400 ms with 20k sockets). Instead the LISTEN sockets on the two ports are taken from
/proc/net/tcp{,6} (their inodes), and only candidate processes' fds are searched for those
inodes: the unit's cgroup, the processes whose command line mentions the install tree, the GPU
memory holders. When an owner is still unknown, the processes of the socket's uid (netlink gives
it) are searched next, then every process, each stopping at the first holder (the fewest-fd
processes first); `full=True` (the policy's PORT_SCAN, asked for when an owner was
unknown) is that same search: no process is read twice, and one holder names the owner.
psutil's per-process calls cost more still (hot loop, 114 processes, issue 25):
Process.net_connections() of 5 candidates 5.7 ms against 0.12 ms for their fd links,
Process.uids() of all 11.3 ms against 0.38 ms of stat(), num_fds() 7.4 ms against 0.46 ms.

Each process is read with the tolerance of a live system: any PID may exit, or be unreadable,
between two reads; such a process is skipped, never an exception.

The command line of every process on the host is read when its PID is first seen and again for
all of them every RESCAN_EVERY, not every cycle: ~25 us a process, 13 ms a cycle on a node
running 500 (issue 15; the benchmark's namespace holds a handful). A match only makes a process
a candidate, whose identity is then read afresh each cycle; an orphan that holds the port or GPU
memory is a candidate through those anyway. What the interval can delay is the notice for an
orphan that holds neither and took on TabbyAPI's program by exec after it was first seen, or
that got the PID of a process seen before between two cycles.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import psutil

from hydra_watchdog import seen_programs
from hydra_watchdog.adapters.identity import (
    ProcIdentity,
    all_pids,
    cgroup_paths,
    connect_targets,
    find_owners,
    in_cgroup,
    is_tabby_program,
    listen_sockets,
    netlink_sockets,
    own_pid_namespace,
    parse_proc_net,
    program,
    reaching,
    read_cmdline,
    read_identity,
    read_text,
    runs_program,
    same_program_file,
    socket_owners,
    tabby_uid,
    unit_cgroup_members,
    unit_programs,
    within,
)
from hydra_watchdog.observation import (
    GpuReport,
    Listener,
    PortReport,
    ProcessInfo,
    ProcessRole,
    UnitStatus,
)
from hydra_watchdog.said_once import SaidOnce, failure_key

if TYPE_CHECKING:
    from hydra_watchdog.config import Config

RESCAN_EVERY = 60.0  # seconds: every process's command line is read again at least this often

log = logging.getLogger(__name__)


def parse_listeners(text: str, ports: Iterable[int]) -> dict[int, int]:
    """/proc/net/tcp or tcp6 text → {socket inode: port} of the LISTEN sockets on `ports`."""
    return {s.inode: s.port for s in parse_proc_net(text, ports)}


def netlink_listeners(ports: Iterable[int]) -> dict[int, int] | None:
    """{socket inode: port} of the TCP LISTEN sockets on `ports` (identity.netlink_sockets)."""
    found = netlink_sockets(ports)
    return None if found is None else {s.inode: s.port for s in found}


def matches(cmdline: Sequence[str], patterns: Sequence[str]) -> bool:
    """A cheap pre-filter for candidates only: a mention proves nothing (see identity.py)."""
    joined = " ".join(cmdline)
    return any(pattern in joined for pattern in patterns)


def in_unit(pid: int, unit: str, proc_root: str = "/proc") -> bool | None:
    """Whether the process now sits in the system unit `unit`'s cgroup (or below it), by
    /proc/PID/cgroup alone; None when that cannot be read. A cgroup of that name inside a user's
    service manager (`.../user@UID.service/...`) is that user's own unit, never ours."""
    text = read_text(f"{proc_root}/{pid}/cgroup")
    if text is None:
        return None
    for path in cgroup_paths(text):
        parts = path.split("/")
        if unit in parts and not any(p.startswith("user@") for p in parts):
            return True
    return False


def _inside_unit(ident: ProcIdentity, main_pid: int | None, members: set[int], cgroup: str) -> bool:
    """The unit's MainPID or a process in its cgroup, by the cgroup tree or /proc/PID/cgroup."""
    return (
        ident.pid == main_pid
        or ident.pid in members
        or any(in_cgroup(p, cgroup) for p in ident.cgroups)
    )


class ProcScanner:
    """ProcessScanner over a /proc tree (`proc_root`) and a cgroup tree (`cgroup_root`).

    Roles (identity.py has the rules): MAIN and UNIT come from systemd (MainPID, the unit's
    cgroup). An ORPHAN runs TabbyAPI's own program (the one the unit's ExecStart= runs, or one
    seen in its cgroup; without a unit, a program of the install tree: `install_dirs`, the
    config's cmdline_patterns), the very file systemd sees there (identity.same_program_file),
    as TabbyAPI's uid, in our PID namespace, outside the unit.
    Everything else is FOREIGN: reported, never signalled.

    A listener holds the port only when it can take a connection to TabbyAPI's address (the
    URL's `host`; 127.0.0.1 for `localhost`), as the credential gate counts them
    (identity.reaching): a socket bound to another address of the port, or an IPV6_V6ONLY
    wildcard beside an IPv4 URL, is in nobody's way."""

    def __init__(
        self,
        port: int,
        install_dirs: Sequence[str],
        *,
        user: str = "root",
        host: str = "127.0.0.1",
        proc_root: str = "/proc",
        cgroup_root: str = "/sys/fs/cgroup",
        clock: Callable[[], float] = time.monotonic,
        state_dir: str | None = None,
    ) -> None:
        """`state_dir`: where the programs seen in the unit's cgroup are kept across restarts
        (seen_programs.py); None keeps them in memory only."""
        self.port = port
        self.install_dirs = tuple(p for p in install_dirs if p)
        self.user = user
        self.address = connect_targets(host)[0]
        self.proc_root = proc_root.rstrip("/") or "/"
        self.cgroup_root = cgroup_root
        self._clock = clock
        self._mentions: dict[int, bool] = {}  # pid -> its command line named an install tree
        self._rescan_at: float | None = None  # when every command line is read again
        self._clock_ticks = os.sysconf("SC_CLK_TCK")
        self._btime: float | None = None
        self._own_service: str | None = None  # the watchdog's own .service cgroup ("" if none)
        self._own_ns = own_pid_namespace() if self.proc_root == "/proc" else None
        # program -> the unit's InvocationID when last seen in its cgroup, oldest first
        self._seen_programs: dict[str, str] = {}
        self._state_dir = state_dir
        self._restored = state_dir is None  # read back from the state dir (once it could be)
        self._keeping = SaidOnce()  # the file's read or write failing, said once
        self._unkept = False  # the set changed since it was last written

    @classmethod
    def from_config(cls, config: Config) -> ProcScanner:
        t = config.tabbyapi
        return cls(
            t.port,
            t.cmdline_patterns,
            user=t.user,
            host=t.host,
            state_dir=config.watchdog.state_dir,
        )

    # -- the scan ---------------------------------------------------------------------------

    def close(self) -> None:
        """Nothing held between scans."""

    def scan(
        self, unit: UnitStatus, gpus: GpuReport, *, full: bool
    ) -> tuple[PortReport, tuple[ProcessInfo, ...]]:
        ports = (self.port, self.port + 1)
        sockets = reaching(listen_sockets(ports, self.proc_root), self.address)
        main_pid = unit.main_pid if unit.main_pid and unit.main_pid > 0 else None
        pids = all_pids(self.proc_root)
        pattern_pids = self._mentioning(pids)
        members = unit_cgroup_members(unit.control_group, self.cgroup_root)
        if members is None:  # no cgroup tree to read: ask every process where it lives
            members = {p for p in pids if self._in_unit_cgroup(p, unit.control_group)}
        gpu_bytes = self._gpu_holders(gpus)

        candidates = members | pattern_pids | set(gpu_bytes)
        if main_pid is not None:
            candidates.add(main_pid)
        inodes = {s.inode for s in sockets}
        owners = socket_owners(sorted(candidates), inodes, self.proc_root)
        unowned = any(inode not in owners for inode in inodes)
        searched_all = full or unowned
        if unowned:
            # uid first, first holder: the policy asks for this search to name an unknown owner
            owners = find_owners(sockets, sorted(candidates), self.proc_root)

        found: set[Listener] = set()
        for sock in sockets:
            holders: set[int | None] = set(owners.get(sock.inode, ())) or {None}  # None: unseen
            found.update(Listener(port=sock.port, pid=pid) for pid in holders)
        listeners = sorted(found, key=lambda lst: (lst.port, lst.pid or 0))
        listens: dict[int, set[int]] = {}
        for lst in listeners:
            if lst.pid is not None:
                listens.setdefault(lst.pid, set()).add(lst.port)

        uid, _ = tabby_uid(unit, self.user)
        # exited, zombies and the unreadable are left out: nothing to act on
        read = (read_identity(p, self.proc_root) for p in sorted(candidates | set(listens)))
        idents = [ident for ident in read if ident is not None]
        inside = [i for i in idents if _inside_unit(i, main_pid, members, unit.control_group)]
        programs = self._tabby_programs(unit, inside)
        inside_pids = {i.pid for i in inside}
        processes = []
        for ident in idents:
            pid = ident.pid
            role = self._role(ident, main_pid, pid in inside_pids, uid, programs)
            # Listed for its command line alone, and not TabbyAPI's: a mention, a reused PID,
            # or a forked child of a matching process that has exec'd something else since.
            if role is ProcessRole.FOREIGN and pid not in listens and pid not in gpu_bytes:
                continue
            processes.append(
                ProcessInfo(
                    pid=pid,
                    start_time=self._wall_start(ident.start_ticks),
                    cmdline=ident.cmdline,
                    role=role,
                    gpu_bytes=gpu_bytes.get(pid, 0),
                    listens_on=tuple(sorted(listens.get(pid, ()))),
                    start_ticks=ident.start_ticks,
                    uid=ident.uid,
                    wrong_user=role is ProcessRole.FOREIGN
                    and ident.uid != uid
                    and is_tabby_program(ident, self.install_dirs),
                )
            )
        report = PortReport(port=self.port, listeners=tuple(listeners), full_scan=searched_all)
        return report, tuple(processes)

    def _tabby_programs(
        self, unit: UnitStatus, inside: Sequence[ProcIdentity]
    ) -> frozenset[str] | None:
        """TabbyAPI's own programs (identity.unit_programs): ExecStart's, and those seen run in
        the unit's cgroup, remembered (the latest seen_programs.MAX_SEEN) for when the unit is
        down, as it is when an orphan is most likely, and kept in the state dir for a watchdog
        restarted meanwhile. None without a unit: the install tree decides."""
        if not unit.exists:
            return None
        self._restore(unit.name)
        before = dict(self._seen_programs)
        for ident in inside:
            found = program(ident)
            if found is not None and within(found, self.install_dirs):
                self._seen_programs.pop(found, None)
                self._seen_programs[found] = unit.invocation_id  # the latest last
        while len(self._seen_programs) > seen_programs.MAX_SEEN:
            del self._seen_programs[next(iter(self._seen_programs))]
        if self._seen_programs != before:  # a new program, or a new invocation
            self._unkept = True
        if self._unkept and self._restored and self._state_dir is not None:
            self._keep(self._state_dir, unit.name)
        return unit_programs(unit, self._seen_programs, self.install_dirs)

    def _restore(self, unit: str) -> None:
        """The programs a watchdog before this one saw, older than any seen since; tried each
        cycle until the state dir can be read (never written over before that)."""
        if self._restored or self._state_dir is None:
            return
        try:
            restored = seen_programs.restore(self._state_dir, unit)
        except OSError as exc:  # UnsafeDirectoryError names the component
            if self._keeping.failed(failure_key(exc)):
                log.warning("the programs seen in %s not read: %s", unit, exc)
            return
        self._keeping.worked()
        if restored.note:
            log.warning("%s: %s", seen_programs.SEEN_FILE, restored.note)
        seen_now = self._seen_programs
        self._seen_programs = {s.program: s.invocation for s in restored.seen}
        for name, invocation in seen_now.items():
            self._seen_programs.pop(name, None)
            self._seen_programs[name] = invocation
        self._restored = True

    def _keep(self, state_dir: str, unit: str) -> None:
        seen = tuple(seen_programs.Seen(p, i) for p, i in self._seen_programs.items())
        try:
            seen_programs.keep(state_dir, unit, seen)
        except OSError as exc:  # a full disk: the set stays in memory, tried again next cycle
            if self._keeping.failed(failure_key(exc)):
                log.warning("the programs seen in %s not kept: %s", unit, exc)
            return
        self._unkept = False
        self._keeping.worked()

    def _role(
        self,
        ident: ProcIdentity,
        main_pid: int | None,
        in_unit: bool,
        uid: int | None,
        programs: frozenset[str] | None,
    ) -> ProcessRole:
        if ident.pid == main_pid:
            return ProcessRole.MAIN
        if in_unit:
            return ProcessRole.UNIT
        if (
            uid is not None
            and ident.uid == uid
            and (self._own_ns is None or ident.pid_ns == self._own_ns)
            and (
                is_tabby_program(ident, self.install_dirs)
                if programs is None
                else runs_program(ident, programs)
            )
            and (self.proc_root != "/proc" or same_program_file(ident))
            and not self._is_self(ident)
        ):
            return ProcessRole.ORPHAN
        return ProcessRole.FOREIGN

    def _is_self(self, ident: ProcIdentity) -> bool:
        """The watchdog, or a process in its own systemd service (its `ldd` of TabbyAPI's venv
        runs a program from the install tree: ours, never TabbyAPI's orphan). Outside a
        service (a shell, a test) only the watchdog's own PID is exempt."""
        if self.proc_root != "/proc":
            return False
        if ident.pid == os.getpid():
            return True
        if self._own_service is None:
            mine = read_text("/proc/self/cgroup") or ""
            services = [p for p in cgroup_paths(mine) if p.endswith(".service")]
            self._own_service = services[0] if services else ""
        own = self._own_service
        return bool(own) and any(in_cgroup(p, own) for p in ident.cgroups)

    # -- /proc readers ----------------------------------------------------------------------

    def _mentioning(self, pids: Sequence[int]) -> set[int]:
        """The processes whose command line names an install tree: read for the processes not
        seen before, and for all of them every RESCAN_EVERY (see the module docstring)."""
        now = self._clock()
        if self._rescan_at is None or now >= self._rescan_at:
            self._mentions = {}
            self._rescan_at = now + RESCAN_EVERY
        known = self._mentions
        self._mentions = {p: known[p] if p in known else self._matches(p) for p in pids}
        return {p for p, named in self._mentions.items() if named}

    def _matches(self, pid: int) -> bool:
        cmdline = read_cmdline(pid, self.proc_root)
        return cmdline is not None and matches(cmdline, self.install_dirs)

    def _in_unit_cgroup(self, pid: int, cgroup: str) -> bool:
        text = read_text(f"{self.proc_root}/{pid}/cgroup")
        return text is not None and any(in_cgroup(p, cgroup) for p in cgroup_paths(text))

    def _gpu_holders(self, gpus: GpuReport) -> dict[int, int]:
        """{pid: bytes held on the configured GPUs} for holders that are still alive."""
        held: dict[int, int] = {}
        for device in gpus.devices:
            for gp in device.processes:
                if gp.pid > 0 and os.path.exists(f"{self.proc_root}/{gp.pid}"):
                    held[gp.pid] = held.get(gp.pid, 0) + (gp.used_bytes or 0)
        return held

    def _wall_start(self, ticks: int) -> float:
        """For display only (identity compares ticks): psutil's create_time() formula."""
        if self._btime is None:
            self._btime = psutil.boot_time()
        return ticks / self._clock_ticks + self._btime
