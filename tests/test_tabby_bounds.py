"""Issue 10: every read from TabbyAPI is bounded, and no piece of the admin key survives a cut.

The hostile load streams come from the real simulator over real HTTP; the client runs in a child
process that reports its own peak memory (VmHWM), so a regression (1.6 GB in 10 s) fails the test
instead of the test run: the child exits at once if it ever holds more than 1 GiB.
"""

from __future__ import annotations

import gzip
import json
import secrets
import socket
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable, Iterator

import pytest

from hydra_watchdog.adapters.sse import (
    SSE_MAX_BYTES,
    SSE_MAX_EVENT,
    SSE_MAX_EVENTS,
    SSE_MAX_LINE,
    SseLimits,
    SseParser,
    StreamMalformedError,
)
from hydra_watchdog.adapters.tabby import (
    TabbyClient,
)
from hydra_watchdog.observation import Outcome
from hydra_watchdog.sim.tabby_server import LOAD_STREAMS, parse_faults
from tests.harness.tabby import ADMIN_KEY, TabbySims, trusted_listener, wait_for

MIB = 1 << 20
GROWTH_MAX = 200 * MIB  # generous: the bounded client holds well under 1 MiB of stream

# The client in a child process: reads its request (JSON) from stdin, so the key is never in
# argv; prints {"detail", "outcome", "before", "peak"} (bytes of resident memory).
CHILD = r"""
import json, os, sys, threading, time
from hydra_watchdog.adapters.tabby import TabbyClient
from tests.harness.tabby import trusted_listener

def vm(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)

def guard():  # a client that reads without bound must not take the test machine down
    while True:
        if vm("VmRSS") > 1 << 30:
            print(json.dumps({"guard": vm("VmRSS")}), flush=True)
            os._exit(3)
        time.sleep(0.01)

threading.Thread(target=guard, daemon=True).start()
job = json.loads(sys.stdin.read())
client = TabbyClient(
    job["url"], admin_key=job["key"], health_timeout=30.0, gate=trusted_listener
)
before = vm("VmRSS")
if job["what"] == "load":
    out = client.load_model(
        "m1", timeout=120.0, on_progress=lambda d, t: None, cancel=threading.Event()
    )
    outcome, detail = ("ok" if out.ok else "failed"), out.detail
else:
    result = client.health().result
    outcome, detail = result.outcome.value, result.detail
print(json.dumps({"outcome": outcome, "detail": detail, "before": before, "peak": vm("VmHWM")}))
"""


def run_client(url: str, what: str, key: str = ADMIN_KEY) -> dict[str, object]:
    job = json.dumps({"url": url, "key": key, "what": what})
    proc = subprocess.run(
        [sys.executable, "-c", CHILD],
        input=job,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    report: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return report


def growth(report: dict[str, object]) -> int:
    peak, before = report["peak"], report["before"]
    assert isinstance(peak, int) and isinstance(before, int)
    return peak - before


# --- the parser's bounds, fed directly ----------------------------------------------------------

SMALL = SseLimits(line=100, event=300, events=50, total_bytes=10_000)


def feed_until_error(parser: SseParser, chunks: Iterator[bytes]) -> tuple[str, int]:
    """(the bound broken, bytes fed until then)."""
    fed = 0
    for chunk in chunks:
        fed += len(chunk)
        try:
            parser.feed(chunk)
        except StreamMalformedError as exc:
            return str(exc), fed
    raise AssertionError("no bound was hit")


def endless(unit: bytes, first: bytes = b"") -> Iterator[bytes]:
    yield first
    while True:
        yield unit


BIG_EVENT = (b"data: " + b"y" * 90 + b"\n") * 3 + b"\n"  # within the line and event bounds


@pytest.mark.parametrize(
    ("first", "unit", "bound", "within"),
    [
        (b"data: ", b"x" * 7, "a line over 100 bytes", 6 + 7 * 15),  # one line, never ended
        # data lines and no blank line: each adds 8 characters and a newline to the event
        (b"", b"data: xxxxxxxx\r\n", "an event over 300 bytes", 16 * (300 // 9 + 1)),
        (b"", b"data: {}\n\n", "over 50 events", 10 * 51),  # tiny events
        (b"", b": ping\r\n", "over 50 events", 8 * 51),  # comments count too
        (b"", b"retry: 1\n", "over 50 events", 9 * 51),  # so do other fields
        (b"", BIG_EVENT, "over 10000 bytes in total", 10_000 + len(BIG_EVENT)),
    ],
)
def test_parser_stops_at_the_first_bound_broken(
    first: bytes, unit: bytes, bound: str, within: int
) -> None:
    broken, fed = feed_until_error(SseParser(SMALL), endless(unit, first))
    assert broken == bound
    assert fed <= within  # it stopped at the bound, not somewhere later


def test_a_line_over_the_bound_in_one_chunk_is_refused() -> None:
    with pytest.raises(StreamMalformedError, match="a line over 100 bytes"):
        SseParser(SMALL).feed(b"data: " + b"x" * 200 + b"\n\n")


def test_streams_within_the_bounds_still_parse() -> None:
    parser = SseParser(SMALL)
    event = b"data: " + b"z" * 90 + b"\r\n"  # 3 lines of 90: within the line and event bounds
    assert parser.feed(event * 3 + b"\r\n") == ["\n".join(["z" * 90] * 3)]
    for _ in range(SMALL.events - 1):  # one blank line used already
        assert parser.feed(b": ping\n") == []


def test_the_default_bounds_are_the_documented_ones() -> None:
    assert SseLimits() == SseLimits(64 << 10, 256 << 10, 100_000, 64 << 20)
    assert (SSE_MAX_LINE, SSE_MAX_EVENT, SSE_MAX_EVENTS, SSE_MAX_BYTES) == (
        64 * 1024,
        256 * 1024,
        100_000,
        64 * MIB,
    )


# --- hostile load streams over real HTTP -------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "bound"),
    [
        ("endless_data", "an event over 256 KiB"),
        ("giant_line", "a line over 64 KiB"),
        ("tiny_events", "over 100000 events"),
        ("big_events", "over 64 MiB in total"),
    ],
)
def test_hostile_load_stream_fails_the_load_with_flat_memory(
    tabby_sim: TabbySims, mode: str, bound: str
) -> None:
    assert mode in LOAD_STREAMS
    sim = tabby_sim.start(faults={"load_stream": mode})
    report = run_client(sim.url, "load")
    assert report["outcome"] == "failed"
    assert report["detail"] == f"event stream malformed: {bound}"
    assert growth(report) < GROWTH_MAX, report
    # We closed the connection: the simulator's endless writer saw the client go.
    wait_for(lambda: bool(sim.loads()), 10.0, "the load to be logged")
    assert "client gone" in sim.loads()[0]["result"]


def test_unknown_load_stream_mode_is_ignored_with_a_warning() -> None:
    faults, warnings = parse_faults({"load_stream": "endless-typo"})
    assert faults.load_stream == ""
    assert "endless-typo" in warnings[0] and "endless_data" in warnings[0]


# --- compressed answers: never inflated ---------------------------------------------------------


@pytest.fixture(scope="module")
def gzip_bomb() -> bytes:
    """256 MiB of zeros, gzipped twice: under 1 KiB on the wire."""
    inner = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: the gzip container
    zeros = bytes(MIB)
    body = b"".join(inner.compress(zeros) for _ in range(256)) + inner.flush()
    return gzip.compress(body, 9)


class OneAnswer:
    """A raw server on 127.0.0.1 that answers every request with the same bytes."""

    def __init__(self, answer: Callable[[bytes], bytes]) -> None:
        self._answer = answer
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    request = conn.recv(65536)
                    conn.sendall(self._answer(request))
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


def _compressed(ctype: str, body: bytes) -> bytes:
    head = (
        "HTTP/1.1 200 OK\r\nconnection: close\r\n"
        f"content-type: {ctype}\r\ncontent-encoding: gzip, gzip\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def test_a_compressed_answer_is_refused_unread(gzip_bomb: bytes) -> None:
    server = OneAnswer(lambda _req: _compressed("application/json", gzip_bomb))
    try:
        report = run_client(server.url, "health")
    finally:
        server.close()
    assert report["outcome"] == Outcome.BAD_BODY.value
    assert "compressed answer (gzip, gzip), which was not asked for" in str(report["detail"])
    assert growth(report) < GROWTH_MAX, report


def test_a_compressed_load_stream_is_refused_unread(gzip_bomb: bytes) -> None:
    server = OneAnswer(lambda _req: _compressed("text/event-stream", gzip_bomb))
    try:
        report = run_client(server.url, "load")
    finally:
        server.close()
    assert report["outcome"] == "failed"
    assert report["detail"] == "event stream malformed: compressed (gzip, gzip)"
    assert growth(report) < GROWTH_MAX, report


def test_the_client_asks_for_uncompressed_answers() -> None:
    seen: list[bytes] = []

    def answer(request: bytes) -> bytes:
        seen.append(request)
        body = b'{"status": "healthy", "issues": []}'
        head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}"
        return head.encode() + b"\r\nconnection: close\r\n\r\n" + body

    server = OneAnswer(answer)
    client = TabbyClient(server.url, admin_key=None, health_timeout=5.0, gate=trusted_listener)
    try:
        assert client.health().healthy
    finally:
        client.close()
        server.close()
    assert b"\r\naccept-encoding: identity\r\n" in seen[0].lower()


# --- the key at a cut ---------------------------------------------------------------------------


def fragments(key: str, size: int = 4) -> set[str]:
    return {key[i : i + size] for i in range(len(key) - size + 1)}


def test_a_key_echoed_across_a_cut_leaves_no_fragment(tabby_sim: TabbySims) -> None:
    key = secrets.token_hex(16)  # random: no fixed key can be special-cased
    sim = tabby_sim.start(auth=False)  # every request is admin: loads run with any key
    client = TabbyClient(
        sim.url, admin_key=key, health_timeout=5.0, request_timeout=5.0, gate=trusted_listener
    )
    details: list[str] = []
    try:
        # The plain-text excerpt is cut at 120 characters: these offsets put the cut inside
        # the key (and some before and after it).
        for at in range(80, 126):
            sim.set_faults(echo_auth_at=at)
            details += [client.model().result.detail, client.unload_model().detail]
            details += [client.list_models().result.detail, client.canary(5.0).result.detail]
            load = client.load_model(
                "m1", timeout=5.0, on_progress=lambda d, t: None, cancel=threading.Event()
            )
            details.append(load.detail)
        # An error event is cut at 300 characters, after the prefix the client adds.
        for at in range(250, 300, 3):
            sim.set_faults(load_error="." * at + key + " was the key")
            load = client.load_model(
                "m1", timeout=5.0, on_progress=lambda d, t: None, cancel=threading.Event()
            )
            details.append(load.detail)
    finally:
        client.close()
    assert all(d.startswith(("HTTP 500: ...", "load refused: HTTP 500: ...")) for d in details[:5])
    assert sum("***" in d for d in details) > len(details) // 2  # the key was there to scrub
    text = "\n".join(details)
    leaked = sorted(f for f in fragments(key) if f in text)
    assert leaked == [], leaked
