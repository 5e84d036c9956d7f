"""TabbyAPI's admin key: where it is found, and read again whenever its file changes.

Where (`locate`), in this order:

1. `tabbyapi.admin_key_file`;
2. systemd's credential `admin_key` ($CREDENTIALS_DIRECTORY/admin_key): a copy systemd makes when
   the watchdog's unit starts, so a key put in place later would need a restart. Its source, the
   unit's `LoadCredential=admin_key:FILE` as systemd reports it, is read instead where it can be;
3. for a command run from a shell (`check`, `verify`: `discover`), the same source of the
   watchdog's unit (WATCHDOG_UNIT), when this user may read it (root, as the unit's key is).

Otherwise there is no key: the watchdog says so, and a command says exactly how to pass one.

`AdminKeySource` stats its file before every use (one system call) and reads it again when the
file's identity (device, inode, size, mtime, ctime) changed: a key put in place is used from the
next request on, with no SIGHUP and no restart. The key's `stamp` is that identity, never a
digest of the key: the policy remembers a rejected key by it.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from hydra_watchdog.adapters.identity import cgroup_paths, read_text
from hydra_watchdog.observation import KeyView
from hydra_watchdog.regular_file import UnusableFileError, read_regular

CREDENTIAL = "admin_key"
WATCHDOG_UNIT = "hydra-watchdog.service"
ADMIN_KEY_MAX_BYTES = 4096  # bytes: a key is a few dozen; a larger file is the wrong file
# Where systemd looks for a LoadCredential= source that is not an absolute path.
CREDSTORES = ("/etc/credstore", "/run/credstore", "/usr/lib/credstore")
_SHOW_TIMEOUT = 5.0
_SEEN_KEPT = 4  # keys held before, still scrubbed from what the server says


@dataclass(frozen=True)
class KeyLocation:
    """The file the key is read from ("" : none), how messages name it, whether a change of it
    is seen without a restart, and, with no file, how to pass a key."""

    path: str
    source: str
    live: bool = True
    hint: str = ""


@dataclass(frozen=True)
class CredentialLookup:
    """A unit's LoadCredential=admin_key source as systemd reports it ("" : none, detail why)."""

    unit: str
    source: str = ""
    detail: str = ""


Lookup = Callable[[str], CredentialLookup]


def parse_load_credentials(text: str, name: str = CREDENTIAL) -> str | None:
    """The source of credential `name` among LoadCredential= entries, one `ID:PATH` a line (as
    `systemctl show` prints them, `LoadCredential=` first, or as read over D-Bus); the ID itself
    for an entry without a path (systemd then searches its credential stores for it), None when
    there is no such entry."""
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        entry = value if sep and key.strip() == "LoadCredential" else line
        ident, _, path = entry.strip().partition(":")
        if ident == name:
            return path or ident
    return None


def load_credential_source(unit: str, *, root: str = "/") -> CredentialLookup:
    """Ask systemd for `unit`'s LoadCredential=admin_key source: over D-Bus (PID 1's private
    socket, as root), else `systemctl show` (systemd 252's prints no such property). An absolute
    path is the source; a bare name is looked up in the credential stores, as systemd does."""
    from hydra_watchdog.adapters.systemd import SystemctlUnit  # noqa: PLC0415 - when asked
    from hydra_watchdog.adapters.unit_bus import PRIVATE_SOCKET, UnitBus  # noqa: PLC0415

    if not os.path.isdir(os.path.join(root, "run/systemd/system")):
        return CredentialLookup(unit, detail="systemd is not the init system here")
    bus = UnitBus(unit, path=os.path.join(root, PRIVATE_SOCKET.lstrip("/")), timeout=_SHOW_TIMEOUT)
    try:
        props = bus.read(("LoadCredential",))
    finally:
        bus.close()
    if isinstance(props, dict):
        text = props.get("LoadCredential", "")
    else:
        shown, why = SystemctlUnit(unit, timeout=_SHOW_TIMEOUT, root=root, bus=False).show_text(
            "LoadCredential"
        )
        if why or "[unprintable]" in shown:
            why = why or "systemctl cannot print LoadCredential="
            return CredentialLookup(unit, detail=f"{unit} could not be asked ({props}; {why})")
        text = shown
    path = parse_load_credentials(text)
    if path is None:
        return CredentialLookup(unit, detail=f"{unit} has no LoadCredential={CREDENTIAL}")
    if path.startswith("/"):
        return CredentialLookup(unit, source=path)
    for store in CREDSTORES:
        if os.path.exists(os.path.join(root, store.lstrip("/"), path)):
            return CredentialLookup(unit, source=os.path.join(store, path))
    named = CREDENTIAL if path == CREDENTIAL else f"{CREDENTIAL}:{path}"
    stores = ", ".join(CREDSTORES)
    return CredentialLookup(
        unit, detail=f"{unit}'s LoadCredential={named} is in no credential store ({stores})"
    )


def own_unit(environ: Mapping[str, str], cgroup_file: str = "/proc/self/cgroup") -> str:
    """The systemd service this process runs as ("" : not one)."""
    if not environ.get("INVOCATION_ID"):
        return ""
    for path in cgroup_paths(read_text(cgroup_file) or ""):
        last = path.rstrip("/").rpartition("/")[2]
        if last.endswith(".service"):
            return last
    return ""


def locate(
    admin_key_file: str,
    environ: Mapping[str, str],
    *,
    lookup: Lookup | None = None,
    discover: bool = False,
    unit: str | None = None,
) -> KeyLocation:
    """Where the key is (see the module docstring). `lookup` asks systemd for a unit's
    LoadCredential= source (None: systemd is not asked); `discover`: a command from a shell,
    which looks for the watchdog unit's credential; `unit`: the service this process runs as
    (by default read from /proc/self/cgroup)."""
    if admin_key_file:
        return KeyLocation(admin_key_file, f"the file {admin_key_file}")
    creds = environ.get("CREDENTIALS_DIRECTORY", "")
    copy = os.path.join(creds, CREDENTIAL) if creds else ""
    if copy and os.path.isfile(copy):
        if unit is None:
            unit = own_unit(environ) if lookup is not None else ""
        found = lookup(unit) if lookup is not None and unit else None
        if found is not None and _readable_file(found.source):
            return KeyLocation(found.source, _credential_label(found))
        # (a socket or a directory source: only systemd reads it; its copy is the key)
        return KeyLocation(copy, f"the systemd credential '{CREDENTIAL}'", live=False)
    if discover and lookup is not None:
        found = lookup(WATCHDOG_UNIT)
        if found.source:
            where = f"LoadCredential={CREDENTIAL}:{found.source} of {found.unit}"
            if _readable_file(found.source):
                return KeyLocation(found.source, _credential_label(found))
            kind = _not_a_file(found.source)
            if kind:
                return KeyLocation(
                    "",
                    "",
                    hint=f"the watchdog's admin key is its {where}, {kind}, which only systemd "
                    "reads (at the unit's start): for this command, set tabbyapi.admin_key_file "
                    "to a file holding the key",
                )
            why = "which this user cannot read" if os.path.exists(found.source) else "missing"
            return KeyLocation(
                "",
                "",
                hint=f"the watchdog's admin key is its {where}, {why}: run this command as "
                "root (sudo), as systemd reads it for the daemon",
            )
        return KeyLocation("", "", hint=_how_to_pass(found.detail))
    return KeyLocation(
        "",
        "",
        hint="no admin key configured: set tabbyapi.admin_key_file, or give the watchdog's unit "
        f"LoadCredential={CREDENTIAL}:FILE",
    )


def _readable_file(path: str) -> bool:
    """A regular file (a link to one too) this user may read: the only source read as a key.
    A LoadCredential= source may also be a directory or an AF_UNIX socket (systemd.exec(5))."""
    return bool(path) and os.path.isfile(path) and os.access(path, os.R_OK)


def _not_a_file(path: str) -> str:
    """What stands at `path` when it is there and no regular file ("" : a file, or nothing)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return ""
    if stat.S_ISREG(mode):
        return ""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISSOCK(mode):
        return "an AF_UNIX socket"
    return f"not a regular file (mode {stat.filemode(mode)})"


def _credential_label(found: CredentialLookup) -> str:
    return f"the file {found.source} (LoadCredential={CREDENTIAL} of {found.unit})"


def _how_to_pass(why: str) -> str:
    return (
        f"no admin key for this command ({why}): set tabbyapi.admin_key_file, or run it as "
        f"root beside {WATCHDOG_UNIT} with LoadCredential={CREDENTIAL}:FILE"
    )


def read_key_file(path: str) -> tuple[str | None, str, os.stat_result | None]:
    """(key, problem, the file's stat): problem says which file could not be used and why,
    never what it holds. A symlink is followed (secret managers link their files in place)."""
    try:
        raw, st = read_regular(path, ADMIN_KEY_MAX_BYTES, follow=True)
    except (OSError, UnusableFileError) as exc:
        why = (
            (exc.strerror or str(exc))
            if isinstance(exc, OSError)
            else str(exc) or type(exc).__name__
        )
        return None, f"the admin key file {path} cannot be read ({why})", None
    try:
        key = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, f"the admin key file {path} is not UTF-8 text", st
    if not key:
        return None, f"the admin key file {path} is empty", st
    if any(ch.isspace() for ch in key):
        why = "holds more than one word; expected the key only"
        return None, f"the admin key file {path} {why}", st
    return key, "", st


def _identity(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


class AdminKeySource:
    """The key at a KeyLocation, read again whenever its file changes; or a fixed key (the load
    helper's, handed over once). Safe to share between threads."""

    def __init__(self, location: KeyLocation, *, fixed: tuple[str | None, str] | None = None):
        self.location = location
        self._lock = threading.Lock()
        self._seen: list[str] = []
        self._ident: str | None = None
        self._key: str | None = None
        self._view = KeyView(location.source, live=location.live)
        if fixed is not None:
            key, problem = fixed
            self._ident = "fixed"
            self._key = key or None
            self._view = KeyView(location.source, "fixed" if key else "", problem, live=False)
            self._remember(key)

    @classmethod
    def fixed(cls, key: str | None, problem: str = "", source: str = "") -> AdminKeySource:
        return cls(KeyLocation("", source, live=False), fixed=(key, problem))

    def current(self) -> tuple[str | None, KeyView]:
        """The key and its view now: the file is read again when it changed since last time."""
        path = self.location.path
        if self._ident == "fixed" or not path:
            return self._key, self._view
        try:
            ident = _identity(os.stat(path))
        except OSError as exc:
            ident = f"error:{exc.errno}"
        with self._lock:
            if ident == self._ident:
                return self._key, self._view
            key, problem, st = read_key_file(path)
            self._ident = ident if st is None else _identity(st)
            self._key = key
            stamp = self._ident if key else ""
            self._view = KeyView(self.location.source, stamp, problem, self.location.live)
            self._remember(key)
            return key, self._view

    def seen(self) -> tuple[str, ...]:
        """The keys held so far (the last few), longest first: all are scrubbed from details."""
        with self._lock:
            return tuple(sorted(self._seen, key=len, reverse=True))

    def _remember(self, key: str | None) -> None:
        if key and key not in self._seen:
            self._seen.append(key)
            del self._seen[:-_SEEN_KEPT]


def read_admin_key(path: str, environ: Mapping[str, str]) -> tuple[str | None, str]:
    """(key, problem) once, from `path` or the credential copy (systemd is not asked)."""
    where = locate(path, environ)
    if not where.path:
        return None, ""
    key, problem, _ = read_key_file(where.path)
    return key, problem


def key_for_process(
    admin_key_file: str, environ: Mapping[str, str], *, discover: bool = False
) -> AdminKeySource:
    """The key for this process: the daemon's (its own unit's credential source where systemd
    can say) or, with `discover`, a command's from a shell (the watchdog unit's)."""
    where = locate(admin_key_file, environ, lookup=load_credential_source, discover=discover)
    return AdminKeySource(where)
