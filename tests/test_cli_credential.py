"""`verify` and `check` from a root shell find the admin key the way the watchdog's unit gets it
(issue 24 item 2): the README's setup keeps the key a systemd credential
(`LoadCredential=admin_key:/etc/hydra-watchdog/admin_key`) with `admin_key_file` empty, and
these commands used to get a 401 and say CRITICAL while the daemon was healthy.

Real systemd (PID 1 of a namespace): TabbyAPI's simulator runs as tabbyapi.service, the watchdog's
unit is installed (systemctl show reports its LoadCredential=), and the commands run as root in
there, as an operator would run them."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.systemd_ns import SystemdNamespace
from tests.harness.tabby import ADMIN_KEY, API_KEY

pytest_plugins = ["tests.harness.systemd_fixtures"]
pytestmark = [pytest.mark.systemd]

REPO = Path(__file__).resolve().parents[1]
BASE = "/opt/hw-credential"  # inside the namespace's overlay: gone with it
PORT = 5123  # the namespace has a network of its own
KEY_FILE = "/etc/hydra-watchdog/admin_key"
CONFIG = "/etc/hydra-watchdog/config.toml"
UNITS = ("tabbyapi.service", "hydra-watchdog.service")


@pytest.fixture(params=[f"admin_key:{KEY_FILE}", "admin_key"], ids=["path", "credstore"])
def node(
    systemd_ns: SystemdNamespace, request: pytest.FixtureRequest
) -> Iterator[SystemdNamespace]:
    """The README's unit takes the key from a path; a bare name is looked up in systemd's
    credential stores (/etc/credstore/admin_key)."""
    credential: str = request.param
    yield from _laid_out(systemd_ns, credential)


def _laid_out(ns: SystemdNamespace, credential: str) -> Iterator[SystemdNamespace]:
    """TabbyAPI's simulator running as tabbyapi.service, the watchdog's unit installed with
    LoadCredential=`credential` (never started), the key in the file it names."""
    key_file = KEY_FILE if ":" in credential else "/etc/credstore/admin_key"
    laid = ns.python(
        "from hydra_watchdog.sim.install import lay_out\n"
        f"print(' '.join(lay_out('{BASE}/tabbyapi', {sys.executable!r}, flavor='modern')))"
    )
    assert laid.returncode == 0, laid.stderr
    ns.write_file(f"{BASE}/models/m1/config.json", '{"model_type": "llama"}\n')
    ns.write_file(f"{BASE}/models/m1/model.safetensors", "weights\n")
    ns.write_file(f"{BASE}/api_tokens.yml", f"api_key: {API_KEY}\nadmin_key: {ADMIN_KEY}\n", 0o600)
    ns.write_file(key_file, ADMIN_KEY + "\n", 0o600)
    ns.write_file(
        CONFIG,
        "[watchdog]\n"
        f'state_dir = "{BASE}/state"\n'
        f'runtime_dir = "{BASE}/run"\n'
        "[tabbyapi]\n"
        f'url = "http://127.0.0.1:{PORT}"\n'
        'venv = ""\n'
        f'cmdline_patterns = ["{BASE}/tabbyapi"]\n'
        "[model]\n"
        'name = "m1"\n'
        f'models_dir = "{BASE}/models"\n'
        "vram_required_gib = 1.0\n"
        "[gpu]\n"
        f'nvml_library = "{BASE}/no-libnvidia-ml.so.1"\n'
        "[metrics]\n"
        'listen = ""\n',
    )
    ns.install_unit(
        "tabbyapi.service",
        "[Service]\n"
        f"ExecStart={laid.stdout.strip()} --port {PORT} --models-dir {BASE}/models "
        f"--tokens {BASE}/api_tokens.yml --flavor modern --startup-model m1\n",
    )
    # The README's unit, as far as the key goes: the CLI asks systemd for its LoadCredential=.
    ns.install_unit(
        "hydra-watchdog.service",
        f"[Service]\nExecStart=/bin/sleep infinity\nLoadCredential={credential}\n",
    )
    assert ns.systemctl("start", "tabbyapi.service").returncode == 0
    ns.wait_for(lambda: _listening(ns), what="the simulator to listen")
    yield ns
    for unit in UNITS:
        ns.reset_unit(unit, remove=True)
    ns.run(["rm", "-rf", BASE, "/etc/hydra-watchdog", "/etc/credstore"])


def _listening(ns: SystemdNamespace) -> bool:
    probe = f"import socket; socket.create_connection(('127.0.0.1', {PORT}), 1).close()"
    return ns.run([sys.executable, "-c", probe]).returncode == 0


def _cli(ns: SystemdNamespace, *args: str) -> tuple[int, str]:
    done = ns.run(
        [sys.executable, "-m", "hydra_watchdog", *args, "--config", CONFIG],
        cwd=str(REPO),
        timeout=120,
    )
    return done.returncode, done.stdout + done.stderr


def test_verify_and_check_as_root_use_the_watchdog_units_credential(
    node: SystemdNamespace,
) -> None:
    # systemctl 252 prints LoadCredential= as "[unprintable]": the commands ask PID 1 over D-Bus.
    code, out = _cli(node, "verify")
    assert "OK   model loaded: m1" in out and "OK   1-token completion" in out, out
    assert code == 0, out
    code, out = _cli(node, "check", "--json")
    doc = json.loads(out)
    assert doc["phase"] == "healthy", out
    assert not [f for f in doc["findings"] if f["rule"] == "admin_key_rejected"], out
    assert code == 0 and ADMIN_KEY not in out


def test_without_a_key_to_read_the_commands_say_how_to_pass_it_never_critical(
    node: SystemdNamespace,
) -> None:
    node.run(["rm", "-f", KEY_FILE, "/etc/credstore/admin_key"])  # nothing to read
    code, out = _cli(node, "verify")
    assert "CRITICAL" not in out and "FAIL" not in out, out
    assert "SKIP model loaded:" in out and "SKIP 1-token completion:" in out, out
    said = " ".join(out.split())  # the screen wraps at 100 columns
    assert "..." not in said, out  # how to pass the key is said whole
    assert "LoadCredential=admin_key" in said, out
    # what to do: the path is named (root reads it; gone here), or no store holds the name
    assert "run this command as root (sudo)" in said or "in no credential store" in said, out
    assert code == 1, out  # WARNING: checks that apply here could not run
    code, out = _cli(node, "check", "--json")
    doc = json.loads(out)
    assert not [f for f in doc["findings"] if f["rule"] == "admin_key_rejected"], out
    assert doc["verdict"] != "CRITICAL" and code != 2, out


# --- issue 23 review M7: a source that is no regular file ---------------------------------------


SOCKET = "/run/hw-credential/admin_key.sock"
_BIND = (
    "import os, socket, sys\n"
    "os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True)\n"
    "socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).bind(sys.argv[1])\n"
)


@pytest.mark.parametrize(
    ("source", "kind"),
    [("/etc/hydra-watchdog/keys", "a directory"), (SOCKET, "an AF_UNIX socket")],
    ids=["directory", "socket"],
)
def test_a_credential_source_that_is_no_file_is_never_read_and_says_how_to_pass_the_key(
    systemd_ns: SystemdNamespace, source: str, kind: str
) -> None:
    """LoadCredential=admin_key:SOURCE may name a directory (systemd loads each file in it) or
    an AF_UNIX socket (systemd reads the key from it at the unit's start): a command from a root
    shell reads neither, and says so with how to pass the key, never "run this as root"."""
    laid = _laid_out(systemd_ns, f"admin_key:{source}")
    node = next(laid)
    try:
        if kind == "a directory":
            node.write_file(f"{source}/admin_key", ADMIN_KEY + "\n", 0o600)
        else:
            bound = node.run([sys.executable, "-c", _BIND, source])
            assert bound.returncode == 0, bound.stderr
        code, out = _cli(node, "verify")
        said = " ".join(out.split())
        assert "Traceback" not in out and "CRITICAL" not in out and "FAIL" not in out, out
        # before: "... cannot be read (not a regular file ...): run this command as root, as
        # the daemon runs" -- said to root, of a source no command can read
        assert f"LoadCredential=admin_key:{source} of hydra-watchdog.service, {kind}" in said, out
        assert "set tabbyapi.admin_key_file to a file holding the key" in said, out
        assert "as root" not in said and "cannot be read" not in said, out
        assert code == 1, out
        code, out = _cli(node, "check", "--json")
        doc = json.loads(out)
        assert not [f for f in doc["findings"] if f["rule"] == "admin_key_rejected"], out
        assert doc["verdict"] != "CRITICAL" and code != 2, out
    finally:
        for _ in laid:  # the fixture's teardown
            pass
        node.run(["rm", "-rf", os.path.dirname(SOCKET)])
