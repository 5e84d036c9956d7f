# ruff: noqa: F811  (pytest fixtures imported from tests/harness are redefined as arguments)
"""Issue 22: what the watchdog does rests on evidence from the verified TabbyAPI only.

Against real processes: the TabbyAPI simulator run from its install tree, the daemon as a
subprocess (tests/test_daemon.py's harness: with the demo's stand-in unit, or with no unit at
all), and an unprivileged local user (uid 65534, tests/harness/adversary.py) who takes the port,
keeps connections, or binds sockets on the port that take no traffic to TabbyAPI's address.
Under real systemd: tests/chaos/test_chaos.py::test_08b_port_squatted_while_tabbyapi_restarts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from hydra_watchdog.actions import UnitCommand, UnitVerb
from hydra_watchdog.adapters import identity
from hydra_watchdog.adapters.procs import ProcScanner
from hydra_watchdog.adapters.tabby import TabbyClient
from hydra_watchdog.config import parse_config
from hydra_watchdog.events import EventKind
from hydra_watchdog.observation import GpuReport, Health, HttpResult, Outcome, UnitStatus
from hydra_watchdog.policy_state import PolicyState
from hydra_watchdog.sim.tabby_server import write_control
from hydra_watchdog.states import Phase, Rule
from tests import policy_kit as pk
from tests.harness.adversary import KEEPER, Squatter
from tests.harness.nvml import NvmlSim, nvml_sim, nvml_sim_library  # noqa: F401
from tests.harness.tabby import ADMIN_KEY, TabbySims, tabby_sim, wait_for  # noqa: F401
from tests.test_daemon import WAIT, Daemons, Node

NO_SYSTEMD = UnitStatus(name="tabbyapi.service", available=False, detail="no systemd here")


@pytest.fixture
def runner() -> Iterator[Daemons]:
    d = Daemons()
    yield d
    d.cleanup()


def _client(url: str, key_file: Path, install: Path) -> TabbyClient:
    cfg = parse_config(
        {
            "tabbyapi": {
                "url": url,
                "admin_key_file": str(key_file),
                "cmdline_patterns": [str(install)],
                "health_timeout": "3s",
            }
        }
    )
    return TabbyClient.from_config(cfg)


# --- item 1: the policy counts only verified evidence ---------------------------------------------

WITHHELD = Health(
    HttpResult(
        Outcome.WITHHELD,
        0.001,
        None,
        "http://127.0.0.1:5000/health not sent: port 5000 held by pid 9, uid 65534, `python3 x`"
        " (not in tabbyapi.service): not TabbyAPI",
    ),
    healthy=False,
)


@pytest.mark.parametrize(
    "unit_now",
    [
        pk.unit(),  # up
        pk.unit("failed", "failed", result="exit-code"),  # down: a start would be due
        pk.unit("activating", "auto-restart", n=4),  # systemd restarting it
        pk.unit(available=False),  # no systemd to ask
    ],
    ids=["unit-up", "unit-failed", "auto-restart", "no-unit"],
)
def test_an_unverified_health_is_never_evidence_to_act_on(unit_now: UnitStatus) -> None:
    """/health WITHHELD (the port's listener is not verified as TabbyAPI): whatever the unit
    says, whatever came before (failures one short of an outage, restarts filling the window,
    a back-off under way), no restart, stop, start or load, and no failure counted; the holder
    is a foreign_holder finding. A verified failure afterwards counts again."""
    for before in ("failures", "backoff"):
        run = pk.Run()
        at = 1.0
        if before == "failures":  # failures_before_down - 1 verified failures
            run.step(pk.obs(0.0))
            for _ in range(pk.CFG.tabbyapi.failures_before_down - 1):
                run.step(pk.obs(at, health=pk.timeout()))
                at += 1.0
        else:  # a restart loop's back-off: the next start attempt is due in 2 s
            run.state = PolicyState(
                phase=Phase.BACKOFF, backoff_step=1, backoff_until=at + 2.0, loop_since=0.0
            )
        counted, acted = run.state.failures, len(run.actions)
        for _ in range(30):  # 30 s of a squatter's say: past every back-off step and grace
            run.step(pk.obs(at, health=WITHHELD, unit=unit_now))
            at += 1.0
            assert run.state.failures == counted
        assert run.actions[acted:] == [], run.actions[acted:]
        assert run.phase() is Phase.BLOCKED
        holder = [f for f in run.state.findings if f.rule is Rule.FOREIGN_HOLDER]
        assert holder and "uid 65534" in holder[0].message, run.state.findings
        assert "no evidence about TabbyAPI" in holder[0].message
        if before == "failures" and unit_now == pk.unit():  # TabbyAPI's own silence: counted
            actions = run.step(pk.obs(at, health=pk.timeout()))
            assert [a.verb for a in pk.only(UnitCommand, actions)] == [UnitVerb.RESTART]


# --- item 1: /health from a kept connection, without a unit --------------------------------------


@pytest.mark.slow
def test_without_a_unit_a_squatters_kept_connection_neither_alarms_nor_blocks_the_load(
    tmp_path: Path, nvml_sim: NvmlSim, tabby_sim: TabbySims, runner: Daemons
) -> None:
    """No systemd: TabbyAPI restarts (a new process, no model), and in between a uid 65534
    squatter takes the port, keeps the connection of the daemon's next /health, lets go of the
    port and answers TabbyAPI's sticky 503 on it. Vetted, that connection is closed before a
    byte goes over it: no CRITICAL 'health http_error (503)', and the model is loaded into the
    new TabbyAPI as soon as it listens."""
    node = Node(tmp_path / "node", nvml_sim)
    first = tabby_sim.start(flavor="exl2", port=node.port)
    node.write_config(
        tabbyapi={"cmdline_patterns": [str(tabby_sim.tmp)]},  # every simulator's install tree
        model={"models_dir": str(first.models_dir)},
    )
    runner.start(node, unit=False)
    wait_for(lambda: node.phase() is Phase.HEALTHY, WAIT, "the model loaded into the first")
    assert [r["status"] for r in first.loads()] == [200]
    first.stop()
    with Squatter.start("127.0.0.1", node.port, source=KEEPER, args=("5",)) as squatter:
        wait_for(lambda: "released" in squatter.transcript(), WAIT, "the squatter to let go")
        second = tabby_sim.start(flavor="exl2", port=node.port)
        wait_for(lambda: bool(second.loads()), WAIT, "the model loaded into the second")
        wait_for(lambda: node.phase() is Phase.HEALTHY, WAIT, "healthy again")
        squatter.stop()
    assert "REQUEST" not in squatter.transcript(), squatter.transcript()
    assert [r["status"] for r in second.loads()] == [200]
    said = [e.message for e in node.events()]
    assert not [m for m in said if "503" in m or "http_error" in m], said


# --- item 3: a socket on the port that takes no traffic to TabbyAPI's address -------------------


SILENT_SOCKETS = [
    ("::", "http://127.0.0.1:{port}"),  # an IPv6 wildcard with IPV6_V6ONLY: no IPv4 at all
    ("::", "http://localhost:{port}"),
    ("::1", "http://127.0.0.1:{port}"),
    ("::1", "http://localhost:{port}"),  # localhost is 127.0.0.1 first, as TabbyAPI listens
]


@pytest.mark.parametrize(("bound", "url"), SILENT_SOCKETS)
def test_a_socket_that_takes_no_traffic_blinds_nothing(
    bound: str, url: str, tabby_sim: TabbySims, tmp_path: Path
) -> None:
    """TabbyAPI on 127.0.0.1; uid 65534 binds the same port on an address no request to
    TabbyAPI's URL can reach. It holds nothing TabbyAPI needs: the gate verifies TabbyAPI (the
    key goes, the canary runs), /health is TabbyAPI's, and the port's holders are TabbyAPI's
    alone; once TabbyAPI is gone, it is down (refused), never withheld on the squatter's
    account. Nothing reaches the squatter."""
    sim = tabby_sim.start(startup_model="m1")
    key = tmp_path / "admin_key"
    key.write_text(ADMIN_KEY)
    url = url.format(port=sim.port)
    with Squatter.start(bound, sim.port) as squatter:  # IPv6: IPV6_V6ONLY, as the harness binds
        client = _client(url, key, sim.install_dir)
        client.note_unit(NO_SYSTEMD)
        try:
            health, model, canary = client.health(), client.model(), client.canary(5.0)
        finally:
            client.close()
        host = urllib.parse.urlsplit(url).hostname or ""
        scanner = ProcScanner(sim.port, [str(sim.install_dir)], host=host)
        port, _ = scanner.scan(NO_SYSTEMD, GpuReport(), full=True)
        # TabbyAPI gone, the squatter still there: nothing listens at TabbyAPI's address, which
        # the kernel says itself (no impostor involved): TabbyAPI is down, not withheld.
        sim.stop()
        client = _client(url, key, sim.install_dir)
        client.note_unit(NO_SYSTEMD)
        try:
            gone = (client.health().result, client.model().result)
        finally:
            client.close()
        left, _ = scanner.scan(NO_SYSTEMD, GpuReport(), full=True)
        squatter.stop()
    assert health.healthy, health.result
    assert model.loaded == "m1", model.result
    assert canary.result.outcome is Outcome.OK, canary.result
    assert port.owners(sim.port) == (sim.proc.pid,)
    assert [r.outcome for r in gone] == [Outcome.REFUSED, Outcome.REFUSED], gone
    assert left.owners(sim.port) == ()
    assert squatter.requests() == []


def test_without_sock_diag_an_ipv6_wildcard_is_counted_to_be_safe(
    tabby_sim: TabbySims, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where netlink is not allowed, the listeners come from /proc/net, which has no V6ONLY
    flag: an IPv6 wildcard counts as taking IPv4 too, so the key is withheld (and /health not
    asked: no evidence either way) while it stays. A socket on [::1] is still nobody's way."""
    monkeypatch.setattr(identity, "netlink_sockets", lambda ports: None)
    sim = tabby_sim.start(startup_model="m1")
    key = tmp_path / "admin_key"
    key.write_text(ADMIN_KEY)
    results = {}
    for bound in ("::", "::1"):
        with Squatter.start(bound, sim.port) as squatter:
            client = _client(sim.url, key, sim.install_dir)
            client.note_unit(NO_SYSTEMD)
            try:
                results[bound] = (client.health().result, client.model().result)
            finally:
                client.close()
            squatter.stop()
        assert squatter.requests() == []
    for result in results["::"]:
        assert result.outcome is Outcome.WITHHELD, result
        assert f"port {sim.port} held by pid " in result.detail and "uid 65534" in result.detail
    assert [r.outcome for r in results["::1"]] == [Outcome.OK, Outcome.OK]


def _listener_pid(port: int) -> int | None:
    for conn in psutil.net_connections("tcp"):
        if conn.status == "LISTEN" and conn.laddr and tuple(conn.laddr)[:2] == ("127.0.0.1", port):
            return conn.pid
    return None


@pytest.mark.slow
@pytest.mark.parametrize(("bound", "host"), [("::", "127.0.0.1"), ("::1", "localhost")])
def test_a_generation_hang_is_seen_beside_a_socket_that_takes_no_traffic(
    bound: str, host: str, tmp_path: Path, nvml_sim: NvmlSim, runner: Daemons
) -> None:
    """The daemon with its stand-in unit; uid 65534 holds the port on an address that takes no
    traffic to TabbyAPI's (an IPV6_V6ONLY wildcard, or ::1 beside `localhost`). An injected
    generation hang (completions never return, /health stays 200) is seen, TabbyAPI restarted
    once, and verified with a passing completion."""
    node = Node(tmp_path, nvml_sim)
    node.write_config(
        tabbyapi={
            "url": f"http://{host}:{node.port}",
            "canary_interval": "1s",
            "canary_deadline": "1s",
        }
    )
    with Squatter.start(bound, node.port) as squatter:
        runner.start(node)
        wait_for(lambda: node.phase() is Phase.HEALTHY, WAIT, "the model to be loaded")
        serving = _listener_pid(node.port)
        assert serving is not None
        write_control(node.control, generation_hang=True, only_pid=serving)  # that process only
        wait_for(
            lambda: EventKind.GENERATION_HANG in node.kinds(), WAIT, "the generation hang seen"
        )

        def recovered_after_the_hang() -> bool:
            kinds = node.kinds()
            return EventKind.RECOVERED in kinds[kinds.index(EventKind.GENERATION_HANG) :]

        wait_for(recovered_after_the_hang, WAIT, "a verified recovery after the hang")
        squatter.stop()
    assert squatter.requests() == []
    events = node.events()
    hung = next(i for i, e in enumerate(events) if e.kind is EventKind.GENERATION_HANG)
    assert "completions stalled while /health is 200" in events[hung].message
    restarts = [e for e in events[hung:] if e.action == "restart_unit"]
    assert len(restarts) == 1, [e.message for e in events[hung:]]
    assert not [e for e in events if e.rule is not None and e.rule.value == "foreign_holder"]


# --- item 2: `localhost` for /health -------------------------------------------------------------

# Run in a mount namespace of its own where /etc/hosts is Debian's, ::1 listed first (the host's
# may name 127.0.0.1 alone): what the resolver answers for `localhost`, then the probes.
DEBIAN_HOSTS = "::1\tlocalhost ip6-localhost ip6-loopback\n127.0.0.1\tlocalhost\n"
LOCALHOST_CHILD = """
import json, socket, sys
from hydra_watchdog.adapters.tabby import TabbyClient
from hydra_watchdog.config import parse_config
from hydra_watchdog.observation import UnitStatus
url, key, install = sys.argv[1:4]
cfg = parse_config({"tabbyapi": {"url": url, "admin_key_file": key,
                                 "cmdline_patterns": [install], "health_timeout": "3s"}})
client = TabbyClient.from_config(cfg)
client.note_unit(UnitStatus(name="tabbyapi.service", available=False))
resolved = [a[4][0] for a in socket.getaddrinfo("localhost", 1, type=socket.SOCK_STREAM)]
health = [client.health() for _ in range(3)]
model = client.model()
client.close()
print(json.dumps({
    "resolved": resolved,
    "health": [[h.result.outcome, h.healthy, h.result.status] for h in health],
    "model": model.loaded,
}))
"""


def test_localhost_health_goes_to_the_verified_address_never_resolved(
    tabby_sim: TabbySims, tmp_path: Path
) -> None:
    """url = http://localhost:PORT with Debian's /etc/hosts (::1 first), TabbyAPI on 127.0.0.1
    and uid 65534 on [::1] of the same port: /health goes to the address the keyed requests
    are pinned to, 127.0.0.1, where TabbyAPI was verified; the resolver is never asked."""
    sim = tabby_sim.start(startup_model="m1")
    key = tmp_path / "admin_key"
    key.write_text(ADMIN_KEY)
    hosts = tmp_path / "hosts"
    hosts.write_text(DEBIAN_HOSTS)
    repo = Path(__file__).resolve().parents[1]
    script = 'mount --bind "$1" /etc/hosts && shift && exec "$@"'
    argv = [sys.executable, "-c", LOCALHOST_CHILD, f"http://localhost:{sim.port}", str(key)]
    with Squatter.start("::1", sim.port) as squatter:
        out = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
             str(hosts), *argv, str(sim.install_dir)],
            capture_output=True, text=True, timeout=120, check=False, cwd=repo,
            env={**os.environ, "PYTHONPATH": str(repo)},
        )  # fmt: skip
        squatter.stop()
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["resolved"][0] == "::1", seen  # the resolver would send /health to the squatter
    assert seen["health"] == [["ok", True, 200]] * 3, seen
    assert seen["model"] == "m1"
    assert squatter.requests() == []
    assert [r["path"] for r in sim.requests()].count("/health") == 3
