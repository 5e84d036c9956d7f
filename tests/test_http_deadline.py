"""The deadline transport and `exchange`, which sends to httpcore's pool directly: what httpx
did for us there must still happen (Host, identity coding, typed outcomes), against real
sockets on loopback. Its construction must not cost a CA bundle (issue 15: ~1 MB of RSS for a
context no request ever uses)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import certifi
import pytest

from hydra_watchdog.adapters.http_deadline import DeadlineTransport, Reply, exchange, new_client
from hydra_watchdog.observation import Outcome


def test_a_new_client_loads_no_ca_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    def where() -> str:
        raise AssertionError("the CA bundle was looked up for a context nobody uses")

    # httpx calls certifi.where() only to build a verifying context (verify=True).
    monkeypatch.setattr(certifi, "where", where)
    with new_client() as client:
        assert client.headers["Accept-Encoding"] == "identity"


class OneShot:
    """A listener on `host` that records each request's head and answers `answer` to it."""

    def __init__(self, host: str, answer: bytes) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family)
        self.sock.bind((host, 0))
        self.sock.listen(4)
        self.sock.settimeout(0.1)
        self.stop = threading.Event()
        self.port = self.sock.getsockname()[1]
        self.answer = answer
        self.heads: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
                break
            except TimeoutError:
                if self.stop.is_set():
                    return
            except OSError:
                return
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            self.heads.append(data.partition(b"\r\n\r\n")[0])
            conn.sendall(self.answer)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def _get(transport: DeadlineTransport, url: str, headers: dict[str, str] | None = None) -> Reply:
    return exchange(
        transport,
        "GET",
        url,
        shown=url,
        headers=headers or {},
        body=None,
        started=time.monotonic(),
        budget=3.0,
        scrub=str,
    )


JSON_OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


@pytest.fixture
def transport() -> Iterator[DeadlineTransport]:
    t = DeadlineTransport()
    yield t
    t.close()


@pytest.mark.parametrize(("host", "shown"), [("127.0.0.1", "127.0.0.1"), ("::1", "[::1]")])
def test_the_request_names_its_host_as_httpx_did(
    transport: DeadlineTransport, host: str, shown: str
) -> None:
    """An IPv6 literal goes in brackets (`Host: ::1:5000` is unreadable: uvicorn answers 400)."""
    server = OneShot(host, JSON_OK)
    try:
        reply = _get(transport, f"http://{shown}:{server.port}/health")
    finally:
        server.close()
    assert reply.failure is None and reply.status == 200 and reply.body == b"{}"
    (head,) = server.heads
    lines = head.split(b"\r\n")
    assert lines[0] == b"GET /health HTTP/1.1"
    assert f"Host: {shown}:{server.port}".encode() in lines
    assert b"Accept-Encoding: identity" in lines


def test_a_repeated_content_encoding_is_refused(transport: DeadlineTransport) -> None:
    """httpx joined repeated headers: `identity` then `gzip` is a compressed answer."""
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Encoding: identity\r\nContent-Encoding: gzip\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    )
    server = OneShot("127.0.0.1", answer)
    try:
        reply = _get(transport, f"http://127.0.0.1:{server.port}/health")
    finally:
        server.close()
    assert reply.failure is not None and reply.failure.outcome is Outcome.BAD_BODY
    assert "compressed answer (identity, gzip)" in reply.failure.detail


def test_a_request_we_cannot_write_is_our_failure_not_a_refusal(
    transport: DeadlineTransport,
) -> None:
    """A header h11 will not write, or one latin-1 cannot hold: nothing sent, LOCAL_ERROR (no
    evidence about the server, never counted toward a restart)."""
    server = OneShot("127.0.0.1", JSON_OK)
    try:
        url = f"http://127.0.0.1:{server.port}/health"
        for bad in ("Bearer a\r\nX-Injected: 1", "Bearer \u2603"):
            reply = _get(transport, url, {"Authorization": bad})
            assert reply.failure is not None, bad
            assert reply.failure.outcome is Outcome.LOCAL_ERROR, reply.failure
            assert "not probed: the request could not be written" in reply.failure.detail
    finally:
        server.close()
    assert server.heads == []


def test_a_closed_transport_sends_nothing(transport: DeadlineTransport) -> None:
    server = OneShot("127.0.0.1", JSON_OK)
    try:
        transport.close()
        reply = _get(transport, f"http://127.0.0.1:{server.port}/health")
    finally:
        server.close()
    assert reply.failure is not None and reply.failure.outcome is Outcome.LOCAL_ERROR
    assert "the client is closed" in reply.failure.detail
    assert server.heads == []
