"""The deadline transport and `exchange`, which sends to httpcore's pool directly: what httpx
did for us there must still happen (Host, identity coding, typed outcomes), against real
sockets on loopback. Its construction must not cost a CA bundle (issue 15: ~1 MB of RSS for a
context no request ever uses)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import certifi
import pytest

from hydra_watchdog.adapters.http_deadline import DeadlineTransport, Reply, exchange, new_client
from hydra_watchdog.observation import Outcome
from tests.harness.raw_http import RawServer, Script, answer_head, reply


def test_a_new_client_loads_no_ca_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    def where() -> str:
        raise AssertionError("the CA bundle was looked up for a context nobody uses")

    # httpx calls certifi.where() only to build a verifying context (verify=True).
    monkeypatch.setattr(certifi, "where", where)
    with new_client() as client:
        assert client.headers["Accept-Encoding"] == "identity"


def _get(
    transport: DeadlineTransport,
    url: str,
    headers: dict[str, str] | None = None,
    vet: Callable[[socket.socket], str] | None = None,
) -> Reply:
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
        vet=vet,
    )


JSON_OK = reply(200, "application/json", b"{}")


def _head_lines(request: bytes) -> list[bytes]:
    return request.partition(b"\r\n\r\n")[0].split(b"\r\n")


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
    with RawServer(host=host, default=JSON_OK) as server:
        port = server.port
        answer = _get(transport, f"{server.url}/health")
    assert answer.failure is None and answer.status == 200 and answer.body == b"{}"
    (request,) = server.seen
    lines = _head_lines(request)
    assert lines[0] == b"GET /health HTTP/1.1"
    assert f"Host: {shown}:{port}".encode() in lines
    assert b"Accept-Encoding: identity" in lines


def test_a_repeated_content_encoding_is_refused(transport: DeadlineTransport) -> None:
    """httpx joined repeated headers: `identity` then `gzip` is a compressed answer."""
    head = answer_head(
        200, "application/json", 2, "content-encoding: identity\r\ncontent-encoding: gzip"
    )
    with RawServer(default=Script(((0, head + b"{}"),))) as server:
        answer = _get(transport, f"{server.url}/health")
    assert answer.failure is not None and answer.failure.outcome is Outcome.BAD_BODY
    assert "compressed answer (identity, gzip)" in answer.failure.detail


def test_a_request_we_cannot_write_is_our_failure_not_a_refusal(
    transport: DeadlineTransport,
) -> None:
    """A header h11 will not write, or one latin-1 cannot hold: nothing sent, LOCAL_ERROR (no
    evidence about the server, never counted toward a restart)."""
    with RawServer(default=JSON_OK) as server:
        for bad in ("Bearer a\r\nX-Injected: 1", "Bearer \u2603"):
            answer = _get(transport, f"{server.url}/health", {"Authorization": bad})
            assert answer.failure is not None, bad
            assert answer.failure.outcome is Outcome.LOCAL_ERROR, answer.failure
            assert "not probed: the request could not be written" in answer.failure.detail
    assert not any(server.seen)  # no byte of a request arrived (a connection may have opened)


def test_a_closed_transport_sends_nothing(transport: DeadlineTransport) -> None:
    with RawServer(default=JSON_OK) as server:
        transport.close()
        answer = _get(transport, f"{server.url}/health")
    assert answer.failure is not None and answer.failure.outcome is Outcome.LOCAL_ERROR
    assert "the client is closed" in answer.failure.detail
    assert server.seen == []


def test_a_vetted_pool_sends_only_over_connections_its_vet_passed() -> None:
    """The pool for requests with the key (vetted=True): without a vet nothing connects; a new
    connection the vet refuses carries nothing (WITHHELD, closed before a byte went out); one it
    passes carries the request."""
    vetted = DeadlineTransport(vetted=True)
    asked: list[str] = []

    def vet_saying(why: str) -> Callable[[socket.socket], str]:
        def vet(conn: socket.socket) -> str:
            assert conn.getpeername()[1] == server.port  # the very connection just made
            asked.append(why)
            return why

        return vet

    try:
        with RawServer(default=JSON_OK) as server:
            url = f"{server.url}/v1/model"
            bare = _get(vetted, url, {"Authorization": "Bearer k"})
            assert bare.failure is not None and bare.failure.outcome is Outcome.WITHHELD
            assert "no listener check came with the request" in bare.failure.detail
            refused = _get(vetted, url, {"Authorization": "Bearer k"}, vet_saying("moved"))
            assert refused.failure is not None and refused.failure.outcome is Outcome.WITHHELD
            assert refused.failure.detail == f"{url} not sent: moved"
            assert not any(server.seen)  # no byte of a request arrived
            sent = _get(vetted, url, {"Authorization": "Bearer k"}, vet_saying(""))
            assert sent.failure is None and sent.status == 200
            assert [r.split(b"\r\n", 1)[0] for r in server.seen if r] == [b"GET /v1/model HTTP/1.1"]
    finally:
        vetted.close()
    assert asked == ["moved", ""]
