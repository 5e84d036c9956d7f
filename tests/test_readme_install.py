"""The README's "Install on Debian 12" block, pasted as written into an interactive bash, as
root, on a fresh systemd (booted in a namespace on a copy-on-write copy of this machine's root,
with the harness's safety nets: tests/harness/systemd_fixtures.own_systemd), from a checkout of
the project, with no network: pip takes the packages from a local wheelhouse built here
beforehand.

The block is taken from README.md itself, so the README cannot drift from what works. It is fed
whole to `bash --norc -i` on stdin, as a paste reaches an operator's shell: there a failing line
does not end the shell, so the block itself must stop what follows a failure. EDITOR=true stands
in for the operator's edit (the example config is installed unedited).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.systemd_fixtures import own_systemd
from tests.harness.systemd_ns import REPO, SystemdNamespace

pytestmark = [pytest.mark.systemd]

README = REPO / "README.md"
HEADING = "## Install on Debian 12"
# Where the operator's checkout sits inside the namespace (any folder would do).
CHECKOUT = "/usr/local/src/hydra-watchdog"
WHEELHOUSE = REPO / ".whl"
KEY = "readme-test-admin-key"
KEY_FILE = "/etc/hydra-watchdog/admin_key"
# Debian's root shell environment; the namespace's own PID 1 runs with `env -i`.
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def readme_block() -> str:
    """The first ```bash block under the Debian heading, as the operator copies it."""
    text = README.read_text(encoding="utf-8")
    assert HEADING in text, f"README.md has no {HEADING!r} section"
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    assert "```bash\n" in section, f"no ```bash block under {HEADING!r}"
    return section.split("```bash\n", 1)[1].split("\n```", 1)[0] + "\n"


# --- the wheelhouse: everything `pip install .` needs, fetched here (CI has PyPI), never inside --


def _requirements() -> list[str]:
    """The project's dependencies and its build backend, as pyproject.toml lists them."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    return sorted([*meta["build-system"]["requires"], *meta["project"]["dependencies"]])


def build_wheelhouse() -> Path:
    """Wheels of the requirements and everything they pull in, in .whl/<digest>/ (kept between
    runs: a new requirement makes a new folder)."""
    wanted = _requirements()
    digest = hashlib.sha256("\n".join(wanted).encode()).hexdigest()[:16]
    folder = WHEELHOUSE / digest
    stamp = folder / ".complete"
    if stamp.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(folder), *wanted],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"could not build the wheelhouse (pip wheel {wanted}):\n{proc.stderr}")
    stamp.write_text("\n".join(wanted) + "\n", encoding="utf-8")
    return folder


# --- the namespace -------------------------------------------------------------------------------


# What the block installs or writes, none of which may exist after a refused run.
WRITTEN = (
    KEY_FILE,
    "/opt/hydra-watchdog",
    "/usr/local/bin/hydra-watchdog",
    "/etc/systemd/system/hydra-watchdog.service",
    "/etc/hydra-watchdog",
)


@dataclass(frozen=True)
class Runs:
    ns: SystemdNamespace
    unset: subprocess.CompletedProcess[str]  # the block with TABBY_ADMIN_KEY unset
    empty: subprocess.CompletedProcess[str]  # the block with TABBY_ADMIN_KEY=""
    written_after_refusals: list[str]  # of WRITTEN, what existed after those two
    state_after_refusals: str  # the unit's ActiveState then
    ok: subprocess.CompletedProcess[str]  # the block with the key set


def copy_checkout(ns: SystemdNamespace) -> None:
    """The project's files as a clone has them (tracked, and new files not ignored), copied to
    CHECKOUT inside the namespace: what the block's `.` and relative paths read."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    files = "".join(f"{name}\n" for name in listed.splitlines() if (REPO / name).is_file())
    copy = 'mkdir -p "$2" && tar -C "$1" -cf - -T - | tar -C "$2" -xf -'
    ns.run(
        ["sh", "-c", copy, "sh", str(REPO), CHECKOUT],
        input=files,
        check=True,
    )


def run_block(
    ns: SystemdNamespace, script: str, wheels: Path, key: str | None
) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": ROOT_PATH,
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "EDITOR": "true",
        # No network in here: pip sees the wheelhouse and nothing else (not this host's config).
        "PIP_CONFIG_FILE": "/dev/null",
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(wheels),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "DEBIAN_FRONTEND": "noninteractive",
    }
    if key is not None:
        env["TABBY_ADMIN_KEY"] = key
    # An interactive shell reading the paste from stdin: no -e, no rc file; it exits at the end
    # of the input with the status of the block's last command. (nsenter's --wd opens its folder
    # before it enters the mount namespace, so env changes into the checkout instead.)
    argv = ["env", "-C", CHECKOUT, "bash", "--norc", "-i"]
    return ns.run(argv, input=script, env=env, timeout=900)


@pytest.fixture(scope="module")
def runs(host_tmp_marker: Path) -> Iterator[Runs]:
    # A systemd of its own: the block installs units, /opt and /usr/local/bin into its overlay,
    # which the session's shared namespace must not see.
    with own_systemd(host_tmp_marker) as ns:
        wheels = build_wheelhouse()
        copy_checkout(ns)
        block = readme_block()
        unset = run_block(ns, block, wheels, None)
        empty = run_block(ns, block, wheels, "")
        written = [path for path in WRITTEN if ns.run(["test", "-e", path]).returncode == 0]
        state_after = ns.show("hydra-watchdog.service", "ActiveState").get("ActiveState", "")
        ok = run_block(ns, block, wheels, KEY)
        yield Runs(ns, unset, empty, written, state_after, ok)


def transcript(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


# --- the tests -------------------------------------------------------------------------------


def test_the_block_runs_as_written_and_the_unit_is_active(runs: Runs) -> None:
    assert runs.ok.returncode == 0, transcript(runs.ok)
    shown = runs.ns.show("hydra-watchdog.service", "ActiveState", "SubState", "ExecMainPID")
    log = runs.ns.journalctl("-u", "hydra-watchdog.service", "-o", "cat").stdout
    assert shown["ActiveState"] == "active", f"{shown}\n{log}"
    assert shown["SubState"] == "running", shown
    enabled = runs.ns.systemctl("is-enabled", "hydra-watchdog.service").stdout.strip()
    assert enabled == "enabled"
    # The unit runs the venv's program, the one the block installed.
    exe = runs.ns.run(["readlink", f"/proc/{shown['ExecMainPID']}/exe"]).stdout.strip()
    cmdline = runs.ns.run(["cat", f"/proc/{shown['ExecMainPID']}/cmdline"]).stdout
    assert exe.startswith("/usr/bin/python3"), exe
    assert "/opt/hydra-watchdog/bin/hydra-watchdog\0run\0" in cmdline, cmdline


def _status(runs: Runs, *prefix: str) -> tuple[int, dict[str, object]]:
    """`status --json`'s exit code and document, after the plain `status` an operator types: the
    same verdict, and no note on stderr (a config it cannot read, as in a 0700
    /etc/hydra-watchdog, is "(config not read: ...; using defaults)" there)."""
    plain = runs.ns.run([*prefix, "hydra-watchdog", "status"], env={"PATH": ROOT_PATH})
    assert plain.stderr == "", transcript(plain)
    proc = runs.ns.run([*prefix, "hydra-watchdog", "status", "--json"], env={"PATH": ROOT_PATH})
    assert proc.stdout.startswith("{"), transcript(proc)
    assert proc.returncode == plain.returncode, transcript(plain) + transcript(proc)
    return proc.returncode, json.loads(proc.stdout)


@pytest.mark.parametrize(
    "who",
    [(), ("setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups")],
    ids=["root", "uid 65534"],
)
def test_status_is_fresh_for_root_and_for_an_unprivileged_user(
    runs: Runs, who: tuple[str, ...]
) -> None:
    assert runs.ok.returncode == 0, transcript(runs.ok)
    code, doc = _status(runs, *who)
    # 3 is UNKNOWN: no status, a stale one, a stopped daemon or a config it could not read.
    assert code in (0, 1, 2), doc
    assert doc["exit_code"] == code
    report = doc["report"]
    assert isinstance(report, dict), doc
    heartbeat = report["heartbeat"]
    assert isinstance(heartbeat, float), report
    assert abs(time.time() - heartbeat) < 60, report


def test_files_have_the_modes_the_readme_promises(runs: Runs) -> None:
    assert runs.ok.returncode == 0, transcript(runs.ok)
    paths = ("/etc/hydra-watchdog", "/etc/hydra-watchdog/config.toml", KEY_FILE)
    stat = runs.ns.run(["stat", "-c", "%n %a %U", *paths]).stdout.split("\n")
    assert stat[:3] == [
        "/etc/hydra-watchdog 755 root",
        "/etc/hydra-watchdog/config.toml 644 root",
        f"{KEY_FILE} 600 root",
    ]
    key = runs.ns.run(["cat", KEY_FILE]).stdout
    assert key.strip() == KEY
    config = runs.ns.run(["cat", "/etc/hydra-watchdog/config.toml"]).stdout
    assert config == (REPO / "config.example.toml").read_text(encoding="utf-8")


# bash's own words for `${TABBY_ADMIN_KEY:?...}` failing (the pasted lines, echoed by the
# interactive shell, hold `TABBY_ADMIN_KEY:?` instead).
REFUSED = "TABBY_ADMIN_KEY: is unset or empty"


@pytest.mark.parametrize("case", ["unset", "empty"])
def test_a_missing_key_stops_the_pasted_block_before_anything_is_written(
    runs: Runs, case: str
) -> None:
    """Pasted whole with the key unset, then empty: the block stops at its first step. Nothing
    is installed or written, and no unit starts (with no key file, LoadCredential= fails it)."""
    run = runs.unset if case == "unset" else runs.empty
    assert run.returncode != 0, transcript(run)
    assert REFUSED in run.stderr, transcript(run)
    assert runs.written_after_refusals == [], "written without a key"
    assert runs.state_after_refusals == "inactive"


def test_the_block_is_one_subshell_that_checks_the_key_first() -> None:
    """What makes a paste safe, as an operator reads it: one `( set -e` ... `)` around every
    step, the key checked before any of them."""
    lines = readme_block().splitlines()
    assert lines[0] == "( set -e" and lines[-1] == ")", lines
    assert lines[1].startswith(': "${TABBY_ADMIN_KEY:?'), lines[1]
    assert sum("TABBY_ADMIN_KEY" in line for line in lines) == 2  # checked, then written
