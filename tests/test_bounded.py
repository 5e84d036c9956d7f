"""The one bounded-call mechanism (adapters/bounded.py): long-lived lanes, real threads, a call
that really hangs (it waits on an Event the test holds)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from hydra_watchdog.adapters.bounded import Call, Lane, Pool, Refused, Why


def _wait_until(cond: object, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if callable(cond) and cond():
            return True
        time.sleep(0.01)
    return False


def test_a_stuck_call_refuses_the_next_until_it_returns() -> None:
    lane = Lane("test-stuck")
    release = threading.Event()
    try:
        hung = lane.submit("hang", lambda: release.wait(30))
        assert isinstance(hung, Call)
        assert not hung.wait(0.05)  # past its deadline: the caller moves on
        refused = lane.submit("next", lambda: 1)
        assert isinstance(refused, Refused) and refused.why is Why.STUCK
        assert refused.stuck is hung and "hang has not returned" in refused.detail
        release.set()
        assert hung.wait(10) and hung.value is True
        again = lane.submit("after", lambda: 41 + 1)
        assert isinstance(again, Call) and again.wait(10) and again.value == 42
    finally:
        release.set()
        lane.close()


def test_a_lane_is_one_long_lived_thread() -> None:
    lane = Lane("test-one-thread")
    try:
        seen = set()
        for _ in range(20):
            call = lane.submit("who", threading.get_ident)
            assert isinstance(call, Call) and call.wait(10)
            seen.add(call.value)
        assert len(seen) == 1
        assert [t.name for t in threading.enumerate()].count("test-one-thread") == 1
    finally:
        lane.close()


def test_an_exception_is_handed_to_the_caller_and_the_lane_goes_on() -> None:
    lane = Lane("test-raise")
    try:
        boom = lane.submit("boom", lambda: 1 // 0)
        assert isinstance(boom, Call) and boom.wait(10)
        assert isinstance(boom.error, ZeroDivisionError) and boom.value is None
        fine = lane.submit("fine", lambda: "ok")
        assert isinstance(fine, Call) and fine.wait(10) and fine.value == "ok"
    finally:
        lane.close()


def test_close_stops_the_thread_and_refuses_later_calls() -> None:
    lane = Lane("test-close")
    call = lane.submit("warm", lambda: None)
    assert isinstance(call, Call) and call.wait(10)
    lane.close()
    assert _wait_until(lambda: "test-close" not in [t.name for t in threading.enumerate()])
    late = lane.submit("late", lambda: 1)
    assert isinstance(late, Refused) and late.why is Why.CLOSED


def test_close_leaves_a_stuck_thread_behind_without_waiting_for_it() -> None:
    lane = Lane("test-close-stuck")
    release = threading.Event()
    hung = lane.submit("hang", lambda: release.wait(30))
    assert isinstance(hung, Call) and not hung.wait(0.05)
    lane.close(wait=30.0)  # returns at once: joining a stuck thread would only eat the wait
    assert not hung.done.is_set()
    release.set()
    assert _wait_until(lambda: "test-close-stuck" not in [t.name for t in threading.enumerate()])


def test_a_pool_has_a_fixed_set_of_lanes_each_stuck_on_its_own() -> None:
    pool = Pool("test-pool", ("a", "b"))
    release = threading.Event()
    try:
        hung = pool.submit("a", lambda: release.wait(30))
        assert isinstance(hung, Call) and not hung.wait(0.05)
        assert pool.busy("a") and isinstance(pool.submit("a", lambda: 1), Refused)
        other = pool.submit("b", lambda: 2)  # a stuck lane does not hold up the others
        assert isinstance(other, Call) and other.wait(10) and other.value == 2
        try:
            pool.submit("c", lambda: 3)
        except KeyError:
            pass
        else:
            raise AssertionError("a lane outside the set was made up")
    finally:
        release.set()
        pool.close()


def test_a_lanes_thread_carries_its_name_for_top_and_ps() -> None:
    """The kernel's name of the lane's thread (top -H, ps -L) is the lane's, cut to 15 bytes."""
    pool = Pool("probe", ["health", "a-rather-long-lane-name"])
    try:
        comms = []
        for name in ("health", "a-rather-long-lane-name"):
            call = pool.submit(name, threading.get_native_id)
            assert isinstance(call, Call) and call.wait(10), call
            comms.append(Path(f"/proc/self/task/{call.value}/comm").read_text().strip())
    finally:
        pool.close()
    assert comms == ["probe-health", "probe-a-rather-"]
