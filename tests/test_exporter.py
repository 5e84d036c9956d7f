"""The bounded page server on real loopback sockets: a cap, deadlines, a head limit, one thread."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from hydra_watchdog.report.exporter import PageServer
from tests.harness.tabby import wait_for

PAGE = b"# a page\nsome_metric 1.0\n"
WAIT = 30.0  # generous: two cores shared with other test runs


@pytest.fixture
def serve() -> Iterator[Callable[..., PageServer]]:
    servers: list[PageServer] = []

    def start(render: Callable[[], bytes] = lambda: PAGE, **kw: Any) -> PageServer:
        server = PageServer("127.0.0.1", 0, render, **kw)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def ask(server: PageServer, request: bytes) -> bytes:
    """Send `request`, read until the server closes: the whole answer."""
    with socket.create_connection(server.address, timeout=WAIT) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def get(server: PageServer, path: str = "/metrics") -> bytes:
    return ask(server, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())


def status_and_body(answer: bytes) -> tuple[str, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0].decode(), body


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the server closed `sock` (EOF or reset), waiting up to WAIT for it."""
    sock.settimeout(WAIT)
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def test_get_metrics_answers_the_page_and_closes(serve: Callable[..., PageServer]) -> None:
    server = serve(content_type="text/plain; version=0.0.4; charset=utf-8")
    answer = get(server)  # returns only because the server closed the connection
    status, body = status_and_body(answer)
    assert status == "HTTP/1.1 200 OK"
    assert body == PAGE
    assert b"Content-Length: %d\r\n" % len(PAGE) in answer
    assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n" in answer
    assert b"Connection: close\r\n" in answer
    assert status_and_body(get(server, "/metrics?name[]=x"))[1] == PAGE


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
        (b"GET /metricsx HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "HTTP/1.1 405 Method Not Allowed"),
        (b"hello\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (b"GET /metrics\r\n\r\n", "HTTP/1.1 400 Bad Request"),
    ],
)
def test_other_requests_get_a_clear_status(
    serve: Callable[..., PageServer], request_bytes: bytes, status: str
) -> None:
    rendered: list[int] = []

    def render() -> bytes:
        rendered.append(1)
        return PAGE

    server = serve(render)
    got, body = status_and_body(ask(server, request_bytes))
    assert got == status
    assert PAGE not in body
    assert rendered == []  # nothing is rendered for a request that is not a scrape


def test_a_head_over_the_limit_gets_431_without_waiting_for_its_end(
    serve: Callable[..., PageServer],
) -> None:
    server = serve(head_limit=1024)
    endless = b"GET /metrics HTTP/1.1\r\n" + b"X-Filler: " + b"a" * 4096  # never ends its head
    status, _ = status_and_body(ask(server, endless))
    assert status == "HTTP/1.1 431 Request Header Fields Too Large"


def test_a_render_failure_is_a_500_and_the_server_keeps_serving(
    serve: Callable[..., PageServer],
) -> None:
    calls: list[int] = []

    def render() -> bytes:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a collector's bug")
        return PAGE

    server = serve(render)
    assert status_and_body(get(server))[0] == "HTTP/1.1 500 Internal Server Error"
    assert status_and_body(get(server)) == ("HTTP/1.1 200 OK", PAGE)


def test_a_silent_connection_is_closed_at_its_deadline(serve: Callable[..., PageServer]) -> None:
    server = serve(deadline=0.3)
    with socket.create_connection(server.address, timeout=WAIT) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # slowloris: the head never ends
        assert closed_by_peer(sock)
    assert server.expired == 1
    assert status_and_body(get(server)) == ("HTTP/1.1 200 OK", PAGE)


def test_a_client_that_never_reads_the_answer_is_dropped_at_the_deadline(
    serve: Callable[..., PageServer],
) -> None:
    big = b"x" * (64 << 20)  # more than the loopback socket buffers hold
    server = serve(lambda: big, deadline=0.5)
    with socket.create_connection(server.address, timeout=WAIT) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        wait_for(lambda: server.expired == 1, WAIT, "the stalled answer to be dropped")
    assert server.open_connections == 0


def test_an_idle_flood_is_capped_and_a_prompt_scrape_is_still_answered(
    serve: Callable[..., PageServer],
) -> None:
    cap = 8
    server = serve(max_connections=cap, deadline=60.0)  # only the cap can shed them
    flood = [socket.create_connection(server.address, timeout=WAIT) for _ in range(100)]
    try:
        wait_for(lambda: server.evicted >= 100 - cap, WAIT, "the flood to be shed")
        assert server.open_connections <= cap
        # The oldest were closed to make room: each of them sees the server hang up.
        assert all(closed_by_peer(sock) for sock in flood[: 100 - cap])
        for _ in range(3):
            assert status_and_body(get(server)) == ("HTTP/1.1 200 OK", PAGE)
        assert server.open_connections <= cap
    finally:
        for sock in flood:
            sock.close()


def test_one_thread_serves_every_connection(serve: Callable[..., PageServer]) -> None:
    before = threading.active_count()
    server = serve(max_connections=16, deadline=60.0)
    flood = [socket.create_connection(server.address, timeout=WAIT) for _ in range(40)]
    try:
        wait_for(lambda: server.evicted >= 40 - 16, WAIT, "the flood to be shed")
        assert threading.active_count() == before + 1
        assert status_and_body(get(server)) == ("HTTP/1.1 200 OK", PAGE)
    finally:
        for sock in flood:
            sock.close()


def test_close_stops_the_thread_and_closes_every_socket(
    serve: Callable[..., PageServer],
) -> None:
    before = threading.active_count()
    server = serve(deadline=60.0)
    address = server.address
    idle = socket.create_connection(address, timeout=WAIT)
    wait_for(lambda: server.open_connections == 1, WAIT, "the connection to be accepted")
    server.close()
    assert threading.active_count() == before
    assert closed_by_peer(idle)
    idle.close()
    with pytest.raises(ConnectionRefusedError), socket.socket() as sock:
        sock.connect(address)


def test_a_busy_port_raises_at_construction() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match="in use"):
            PageServer("127.0.0.1", taken.getsockname()[1], lambda: PAGE)


def test_a_cap_below_two_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        PageServer("127.0.0.1", 0, lambda: PAGE, max_connections=1)
