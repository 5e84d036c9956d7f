"""netlink_listeners (NETLINK_SOCK_DIAG) must agree with /proc/net/tcp{,6} on real sockets."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from hydra_watchdog.adapters.procs import netlink_listeners, parse_listeners


def _proc_listeners(ports: list[int]) -> dict[int, int]:
    found: dict[int, int] = {}
    for name in ("tcp", "tcp6"):
        found.update(parse_listeners(Path(f"/proc/net/{name}").read_text(), ports))
    return found


@pytest.fixture
def sockets() -> Iterator[tuple[int, int, int]]:
    """A v4 listener, a v6 listener, and a port that only has connected (non-LISTEN) sockets."""
    v4 = socket.socket()
    v4.bind(("127.0.0.1", 0))
    v4.listen()
    v6 = socket.socket(socket.AF_INET6)
    v6.bind(("::1", 0))
    v6.listen()
    client = socket.create_connection(v4.getsockname())
    server, _ = v4.accept()
    try:
        yield v4.getsockname()[1], v6.getsockname()[1], client.getsockname()[1]
    finally:
        for s in (client, server, v4, v6):
            s.close()


def test_netlink_matches_proc_net(sockets: tuple[int, int, int]) -> None:
    v4, v6, connected = sockets
    ports = [v4, v6, connected]
    found = netlink_listeners(ports)
    assert found is not None, "NETLINK_SOCK_DIAG unavailable on this machine"
    assert sorted(found.values()) == sorted([v4, v6])  # the connected-only port is not a listener
    assert found == _proc_listeners(ports)


def test_netlink_ignores_a_bound_port_nobody_listens_on(sockets: tuple[int, int, int]) -> None:
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))  # reserves the port; no listen()
        assert netlink_listeners([bound.getsockname()[1]]) == {}
