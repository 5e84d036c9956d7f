"""`hydra-watchdog check` beside a running daemon, under real systemd (issue 23, item 3).

check starts from the daemon's memory (its state file, read only) and says the daemon's verdict,
the one `status` says; without a daemon it says that its view is one cycle's.
"""

from __future__ import annotations

import pytest

from tests.chaos.conftest import WATCHDOG, ChaosNode, Row

pytestmark = [pytest.mark.chaos, pytest.mark.systemd]

Chaos = tuple[ChaosNode, Row]
# Today's TabbyAPI (exllamav3) on an exl2 model: no retry can ever help (notes/tabbyapi.md).
PERMANENT = (
    "Models quantized with 'exl2' require the exllamav2 backend, which is no longer supported. "
    "Please use an exl3 or unquantized model."
)


def _verdict_line(text: str) -> str:
    """`CRITICAL: blocked` of `CRITICAL: blocked since 12:00:01 (3 s ago)`."""
    return text.splitlines()[0].split(" since ")[0]


def test_check_agrees_with_the_daemon_during_a_permanent_load_block(chaos: Chaos) -> None:
    node, row = chaos
    node.faults(load_error=PERMANENT)
    node.unload()
    node.wait(lambda: node.status().get("phase") == "blocked", 60, node.describe)
    loads = len(node.loads())
    status = node.cli("status")
    check = node.cli("check")
    assert status.returncode == 2, status.stdout
    # the daemon's verdict, as status says it; before, a fresh memory: "WARNING … would load"
    assert check.returncode == status.returncode, check.stdout
    assert _verdict_line(check.stdout) == _verdict_line(status.stdout) == "CRITICAL: blocked"
    assert "View: the daemon's (pid " in check.stdout, check.stdout
    assert "would load model" not in check.stdout, check.stdout
    assert len(node.loads()) == loads  # check sends nothing that changes the node
    # without the daemon (its unit's RuntimeDirectory goes with it), check says what its view is
    assert node.systemctl("stop", WATCHDOG).returncode == 0
    alone = node.cli("check")
    assert "(one cycle's view)" in alone.stdout.splitlines()[0], alone.stdout
    said = "View: one cycle's, without a daemon's memory: hydra-watchdog is not running"
    assert said in alone.stdout, alone.stdout
    assert len(node.loads()) == loads
    row.restarts = node.restarts_issued()
