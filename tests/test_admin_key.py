# ruff: noqa: F811  (pytest fixtures imported from tests/harness are redefined as arguments)
"""Where the admin key is found, and that it is read again when its file changes (issue 23
item 1, issue 24 item 2): real files, the real client against the TabbyAPI simulator; systemd's
answer about a unit's LoadCredential= is the one seam (the namespace test asks real systemd)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from hydra_watchdog.adapters.admin_key import (
    AdminKeySource,
    CredentialLookup,
    KeyLocation,
    Lookup,
    load_credential_source,
    locate,
    own_unit,
    parse_load_credentials,
)
from hydra_watchdog.adapters.tabby import TabbyClient
from hydra_watchdog.observation import Outcome
from tests.harness.tabby import ADMIN_KEY, API_KEY, TabbySims, tabby_sim, trusted_listener  # noqa: F401

SHOWN = (
    "LoadCredential=tls:/etc/ssl/key.pem\n"
    "LoadCredential=admin_key:/etc/hydra-watchdog/admin_key\n"
    "LoadCredentialEncrypted=\n"
)


def test_load_credential_lines_as_systemctl_show_prints_them() -> None:
    assert parse_load_credentials(SHOWN) == "/etc/hydra-watchdog/admin_key"
    # a bare name: looked up in the credential stores (D-Bus reports it as its own path)
    assert parse_load_credentials("LoadCredential=admin_key\n") == "admin_key"
    assert parse_load_credentials("other:other\nadmin_key:/etc/k") == "/etc/k"  # D-Bus's lines
    assert parse_load_credentials("LoadCredential=tls:/k\n") is None
    assert parse_load_credentials("") is None


def test_without_systemd_nothing_is_asked(tmp_path: Path) -> None:
    found = load_credential_source("hydra-watchdog.service", root=str(tmp_path))
    assert (found.source, found.detail) == ("", "systemd is not the init system here")


def _lookup(source: str = "", detail: str = "") -> Lookup:
    def lookup(unit: str) -> CredentialLookup:
        return CredentialLookup(unit, source=source, detail=detail)

    return lookup


def test_the_key_file_comes_first_then_the_credential(tmp_path: Path) -> None:
    assert locate("/etc/k", {}) == KeyLocation("/etc/k", "the file /etc/k")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "admin_key").write_text("from-systemd")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    copy = locate("", env)
    assert (copy.path, copy.live) == (str(creds / "admin_key"), False)
    assert copy.source == "the systemd credential 'admin_key'"


def test_the_daemon_reads_its_credentials_source_where_systemd_names_it(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "admin_key").write_text("copy")
    source = tmp_path / "admin_key"
    source.write_text("source")
    cgroup = tmp_path / "cgroup"
    cgroup.write_text("0::/system.slice/hydra-watchdog.service\n")
    env = {"CREDENTIALS_DIRECTORY": str(creds), "INVOCATION_ID": "x"}
    assert own_unit(env, str(cgroup)) == "hydra-watchdog.service"
    assert own_unit({}, str(cgroup)) == ""  # not a service: no unit to ask
    unit = "hydra-watchdog.service"
    live = locate("", env, lookup=_lookup(str(source)), unit=unit)
    assert (live.path, live.live) == (str(source), True)  # a key put there is read at once
    assert live.source == f"the file {source} (LoadCredential=admin_key of {unit})"
    unreadable = locate("", env, lookup=_lookup(str(tmp_path / "gone")), unit=unit)
    assert (unreadable.path, unreadable.live) == (str(creds / "admin_key"), False)


def test_a_command_finds_the_watchdog_units_credential_or_says_how_to_pass_it(
    tmp_path: Path,
) -> None:
    source = tmp_path / "admin_key"
    source.write_text(ADMIN_KEY + "\n")
    found = locate("", {}, lookup=_lookup(str(source)), discover=True)
    assert found.path == str(source) and found.live
    assert found.source == (
        f"the file {source} (LoadCredential=admin_key of hydra-watchdog.service)"
    )
    missing = locate("", {}, lookup=_lookup(str(tmp_path / "gone")), discover=True)
    assert missing.path == "" and "run this command as root (sudo)" in missing.hint
    assert f"LoadCredential=admin_key:{tmp_path / 'gone'}" in missing.hint
    none = locate("", {}, lookup=_lookup(detail="no systemd"), discover=True)
    assert none.path == "" and "set tabbyapi.admin_key_file" in none.hint
    assert "no systemd" in none.hint
    # The daemon (no `discover`) never takes another unit's credential.
    assert locate("", {}, lookup=_lookup(str(source))).path == ""


def test_the_key_is_read_again_when_its_file_changes(tmp_path: Path) -> None:
    key_file = tmp_path / "admin_key"
    key_file.write_text(API_KEY + "\n")
    keys = AdminKeySource(KeyLocation(str(key_file), f"the file {key_file}"))
    key, view = keys.current()
    assert key == API_KEY and view.stamp and view.problem == "" and view.live
    assert keys.current() == (key, view)  # unchanged: the same stamp, no read
    key_file.write_text(ADMIN_KEY + "\n")  # rewritten in place
    again, changed = keys.current()
    assert again == ADMIN_KEY and changed.stamp != view.stamp
    replaced = tmp_path / "new"
    replaced.write_text(ADMIN_KEY + "\n")
    os.replace(replaced, key_file)  # replaced (a new inode), the same content
    assert keys.current()[1].stamp != changed.stamp
    key_file.write_text("")
    empty, broken = keys.current()
    assert empty is None and broken.stamp == "" and broken.problem.endswith("is empty")
    assert set(keys.seen()) == {API_KEY, ADMIN_KEY}  # both scrubbed from what servers say


@pytest.mark.parametrize("command", [False, True])
def test_a_401_without_a_key_is_the_daemons_problem_but_only_a_commands_lack(
    tabby_sim: TabbySims, command: bool
) -> None:
    sim = tabby_sim.start()
    hint = "run this command as root (sudo)"
    keys = AdminKeySource(KeyLocation("", "", hint=hint))
    client = TabbyClient(
        sim.url,
        admin_key=None,
        health_timeout=2.0,
        gate=trusted_listener,
        keys=keys,
        command=command,
    )
    try:
        result = client.model().result
    finally:
        client.close()
    if command:  # no verdict on TabbyAPI, nor on the daemon's key: how to pass one
        assert result.outcome is Outcome.LOCAL_ERROR and hint in result.detail
    else:
        assert result.outcome is Outcome.UNAUTHORIZED and hint in result.detail


def test_the_daemon_keeps_its_credentials_copy_when_the_source_is_no_file(tmp_path: Path) -> None:
    """LoadCredential=admin_key:SOURCE may be an AF_UNIX socket or a directory (issue 23 review,
    M7): systemd read it into the copy; the watchdog reads the copy, never the socket."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "admin_key").write_text("copy")
    env = {"CREDENTIALS_DIRECTORY": str(creds), "INVOCATION_ID": "x"}
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(tmp_path / "key.sock"))
        for source in (tmp_path / "key.sock", creds):
            where = locate("", env, lookup=_lookup(str(source)), unit="hydra-watchdog.service")
            # before: the socket's path, whose read fails: no key, and a rejected-key CRIT
            assert (where.path, where.live) == (str(creds / "admin_key"), False), source
    finally:
        sock.close()
