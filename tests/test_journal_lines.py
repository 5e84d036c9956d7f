"""What the journal finding quotes of TabbyAPI's log (issue 23 item 9): the lines that explain
an exit, each once, rather than the last lines of a crash loop."""

from __future__ import annotations

from hydra_watchdog.findings import journal
from hydra_watchdog.journal_lines import explaining, latest, message, request_errors
from hydra_watchdog.policy_state import Finding, PolicyState
from hydra_watchdog.states import Rule
from tests.policy_kit import config, obs, refused

HOST = "2026-12-01T19:19:02+0000 hydra-ai"


def _crash_loop(own: tuple[str, ...], starts: int = 3) -> list[str]:
    """What journalctl shows of `starts` crashes: TabbyAPI's lines, then PID 1's."""
    lines: list[str] = []
    for pid in range(100, 100 + starts):
        lines += [f"{HOST} python[{pid}]: {text}" for text in own]
        lines += [
            f"{HOST} systemd[1]: tabbyapi.service: Main process exited, code=exited, "
            "status=1/FAILURE",
            f"{HOST} systemd[1]: tabbyapi.service: Failed with result 'exit-code'.",
            f"{HOST} systemd[1]: tabbyapi.service: Scheduled restart job, restart counter is at 1.",
        ]
    return lines


def test_a_traceback_is_quoted_by_its_last_line_once_with_its_count() -> None:
    own = (
        "INFO:     Uvicorn running on http://127.0.0.1:5000",
        "Traceback (most recent call last):",
        '  File "/opt/tabbyapi/main.py", line 187, in <module>',
        "    entrypoint()",
        "RuntimeError: CUDA error: an illegal memory access was encountered",
    )
    lines, errors = explaining(_crash_loop(own))
    assert errors
    assert lines == ("RuntimeError: CUDA error: an illegal memory access was encountered (3x)",)


def test_without_an_error_the_last_distinct_lines_each_once() -> None:
    own = ("INFO:     Loading model m1", "INFO:     Uvicorn running on http://127.0.0.1:5000")
    lines, errors = explaining(_crash_loop(own))
    assert not errors
    assert lines == (
        "INFO:     Loading model m1 (3x)",
        "INFO:     Uvicorn running on http://127.0.0.1:5000 (3x)",
    )


def test_per_request_errors_explain_no_exit_and_pid1_speaks_only_alone() -> None:
    own = (
        "ERROR:    Sent to request: No models are currently loaded.",
        "ERROR:    Could not load model: Insufficient VRAM in split for model and cache",
        "INFO:     Shutting down",
    )
    lines, errors = explaining(_crash_loop(own, starts=1))
    assert errors
    assert lines == (
        "ERROR:    Could not load model: Insufficient VRAM in split for model and cache",
    )
    pid1_only = [line for line in _crash_loop(own, starts=1) if "systemd[1]" in line]
    lines, errors = explaining(pid1_only)
    assert not errors and lines[-1].endswith("restart counter is at 1.")
    assert message(pid1_only[0]).startswith("tabbyapi.service: Main process exited")


# --- issue 23 item 2: "none names an error" is never said above an ERROR line ------------------

POLL = "ERROR:    Sent to request: No models are currently loaded."
UVICORN = "INFO:     Uvicorn running on http://127.0.0.1:57045"


def test_without_an_error_no_quoted_line_names_one() -> None:
    lines, errors = explaining(_crash_loop((POLL, UVICORN), starts=5))
    assert not errors
    assert lines == (f"{UVICORN} (5x)",)
    assert request_errors(_crash_loop((POLL, UVICORN), starts=5)) == 5


def _journal_said(own: tuple[str, ...], backoff_step: int = 0) -> Finding:
    state = PolicyState(journal=tuple(_crash_loop(own, starts=5)), backoff_step=backoff_step)
    found = list(journal(state, obs(10.0, health=refused()), config()))
    assert len(found) == 1, found
    return found[0]


def test_the_finding_leaves_out_the_poll_answers_and_says_so() -> None:
    said = _journal_said((POLL, UVICORN)).message
    assert said == (
        f"last log lines (none names an error; 5 per-request ERROR lines left out): {UVICORN} (5x)"
    )


def test_only_poll_answers_are_said_to_explain_nothing() -> None:
    said = _journal_said((POLL,)).message
    assert "ERROR" not in said.split(": ", 1)[1].replace("per-request ERROR", "")
    assert said.endswith("nothing about the exit")


def test_the_lines_are_filed_under_tabbyapi_down_even_in_a_restart_loop() -> None:
    """They say why TabbyAPI is down and decide nothing (test_policy: the back-off's start
    cites backoff_attempt, not these lines)."""
    crash = "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert _journal_said((UVICORN, crash)).rule is Rule.DOWN
    in_loop = _journal_said((UVICORN, crash), backoff_step=1)
    assert in_loop.rule is Rule.DOWN
    assert in_loop.message == f"last log lines that explain the exit: {crash} (5x)"


def _at(second: int, micro: int, ident: str, text: str) -> str:
    """A line as journalctl --utc -o short-iso-precise writes it."""
    return f"2026-12-01T19:19:{second:02d}.{micro:06d}+00:00 hydra-ai {ident}: {text}"


NOTE = (
    "/etc/systemd/system/tabbyapi.service.d/10-hydra-watchdog.conf:28: Unknown key "
    "'RestartSteps' in section [Service], ignoring."
)


def test_pid1s_notes_on_the_unit_files_are_dropped_and_never_take_a_place() -> None:
    """The restart loop once stopped: PID 1's last 50 lines are its notes on the unit's files
    (one each load); TabbyAPI's error still comes out, and is what the finding quotes."""
    own = [
        _at(1, 0, "python[100]", "INFO: Loading model m1"),
        _at(1, 400_000, "python[100]", "ERROR: CUDA out of memory. Tried to allocate 20.00 GiB."),
    ]
    exit_lines = [
        _at(1, 500_000, "systemd[1]", "tabbyapi.service: Failed with result 'exit-code'.")
    ]
    notes = [_at(2, i, "systemd[1]", NOTE) for i in range(49)]
    excerpt = latest(own, exit_lines + notes, 50)
    assert excerpt == (*own, *exit_lines)
    lines, errors = explaining(excerpt)
    assert errors and lines == ("ERROR: CUDA out of memory. Tried to allocate 20.00 GiB.",)


def test_the_two_reads_are_joined_by_time_and_cut_to_the_last_lines() -> None:
    own = [
        _at(1, 0, "python[100]", "Traceback (most recent call last):"),
        '                                              File "main.py", line 1',  # continued
        _at(3, 0, "python[101]", "INFO: Loading model m1"),
    ]
    pid1 = [
        _at(1, 0, "systemd[1]", "tabbyapi.service: Main process exited, status=1/FAILURE"),
        _at(2, 0, "systemd[1]", "tabbyapi.service: Scheduled restart job."),
        _at(4, 0, "systemd[1]", "tabbyapi.service: Failed with result 'exit-code'."),
    ]
    # At the same microsecond TabbyAPI's line comes first, with its continuation.
    assert latest(own, pid1, 10) == (own[0], own[1], pid1[0], pid1[1], own[2], pid1[2])
    assert latest(own, pid1, 2) == (own[2], pid1[2])
    assert latest(own, pid1, 0) == ()
