"""The host-wide owner search of a listening socket (issue 15): the socket's uid first, the
processes with fewest fds first, and it stops at the first holder. Real processes of an
unprivileged user share one real listening socket; one of them also holds hundreds of fds."""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Iterator

import pytest

from hydra_watchdog.adapters.identity import (
    fewest_fds_first,
    find_owners,
    listen_sockets,
)
from tests.harness.adversary import NOBODY, SYSTEM_PYTHON, as_nobody
from tests.harness.tabby import free_port

# The parent listens, forks a child that keeps only the socket, then opens 400 more fds;
# both print their pid and wait for stdin to close.
SHARED_LISTENER = r"""
import os, socket, sys
port = int(sys.argv[1])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen()
r, w = os.pipe()
if os.fork() == 0:
    os.close(r)
    os.write(w, f"{os.getpid()}\n".encode())
    os.close(w)
    sys.stdin.read()
    os._exit(0)
os.close(w)
child = os.read(r, 64).decode().strip()
extra = [os.open("/dev/null", os.O_RDONLY) for _ in range(400)]
print(os.getpid(), child, flush=True)
sys.stdin.read()
"""


@pytest.fixture
def shared() -> Iterator[tuple[int, int, int]]:
    """(port, the big parent's pid, the small child's pid), both running as nobody."""
    port = free_port()
    proc = subprocess.Popen(
        as_nobody([SYSTEM_PYTHON, "-c", SHARED_LISTENER, str(port)]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        parent, child = (int(x) for x in proc.stdout.readline().split())
        yield port, parent, child
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(30)


def test_the_first_holder_found_is_the_one_with_fewest_fds(shared: tuple[int, int, int]) -> None:
    port, parent, child = shared
    sockets = listen_sockets([port])
    assert [s.uid for s in sockets] == [NOBODY]  # netlink names the socket's user
    inode = sockets[0].inode

    # No candidate holds it: the search goes to nobody's processes, the child (3 fds) first,
    # and stops there: the parent's 400 fds are never read.
    assert fewest_fds_first([parent, child]) == [child, parent]
    assert find_owners(sockets, []) == {inode: {child}}
    # A candidate that holds it is enough; nothing host-wide is read.
    assert find_owners(sockets, [parent]) == {inode: {parent}}
    # Every holder, when asked for every process.
    assert find_owners(sockets, [], everyone=True) == {inode: {parent, child}}


def test_a_socket_no_process_holds_visibly_stays_unowned(shared: tuple[int, int, int]) -> None:
    port, _, _ = shared
    ghost = [dataclasses.replace(s, inode=s.inode + 10**9) for s in listen_sockets([port])]
    assert ghost  # the real socket, with an inode no process holds
    assert find_owners(ghost, []) == {}
