# ruff: noqa: F811  (pytest fixtures imported from tests/harness are redefined as arguments)
"""Issue 22: what the watchdog does rests on evidence from the verified TabbyAPI only.

Against real processes: the TabbyAPI simulator run from its install tree, the daemon as a
subprocess (tests/test_daemon.py's harness, with the demo's stand-in unit), and an unprivileged
local user (uid 65534, tests/harness/adversary.py) who binds sockets on the port that take no
traffic to TabbyAPI's address.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from hydra_watchdog.adapters.procs import ProcScanner
from hydra_watchdog.adapters.tabby import TabbyClient
from hydra_watchdog.config import parse_config
from hydra_watchdog.events import EventKind
from hydra_watchdog.observation import GpuReport, Outcome, UnitStatus
from hydra_watchdog.sim.tabby_server import write_control
from hydra_watchdog.states import Phase
from tests.harness.adversary import Squatter
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
