"""HTTP with a hard total deadline per request: the transport every HTTP adapter shares.

httpx has no total-request deadline: its read timeout applies to each socket read, so a server
that trickles one byte a second holds a request forever (encode/httpx#1450). We therefore give
httpcore a network backend whose streams clamp every connect, read and write to the time left
before a per-thread deadline; a probe can overrun its deadline by one scheduler wake-up at most.
The same backend polls a cancel event during a model load, because a load has no read timeout
at all: older TabbyAPI builds cancel a load when the client disconnects, so a quiet stream must
never be cut short, only the overall load_timeout or an explicit cancel end it.

`exchange` is one request within such a deadline, its body read up to JSON_LIMIT bytes, every
failure a typed HttpResult (never an exception). Answers are asked for and read uncompressed (a
few KiB of gzip can inflate to gigabytes in one read), so the bytes counted are the bytes held.
Detail texts go through the caller's `scrub` (which removes its secret, escapes and cuts).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

from hydra_watchdog.observation import HttpResult, Outcome, local_failure
from hydra_watchdog.printable import cut

JSON_LIMIT = 1 << 20  # bytes; TabbyAPI's answers are a few hundred bytes
CANCEL_POLL = 0.1  # seconds between cancel checks while a load stream is quiet
_EXCERPT_MAX = 120  # characters of a plain-text error body quoted in a detail


class Budget(threading.local):
    """The deadline (monotonic) and cancel event of the request running on this thread, and
    the check a new connection must pass before it carries the request (see DeadlineTransport)."""

    deadline: float | None = None
    cancel: threading.Event | None = None
    received: int = 0  # bytes read so far: tells "closed in silence" from "sent garbage"
    # Asked about each new connection (its socket): "" when it may carry the request, else why not.
    vet: Callable[[socket.socket], str] | None = None


BUDGET = Budget()


class LoadCancelledError(Exception):
    """Raised inside a read when the load's cancel event is set; the load catches it."""


class ListenerChangedError(Exception):
    """A new connection that must not carry its request: the vet said why. Raised before a
    byte of the request was written; the connection is closed."""


@contextmanager
def deadline_scope(
    deadline: float,
    cancel: threading.Event | None = None,
    vet: Callable[[socket.socket], str] | None = None,
) -> Iterator[None]:
    saved = (BUDGET.deadline, BUDGET.cancel, BUDGET.received, BUDGET.vet)
    BUDGET.deadline, BUDGET.cancel, BUDGET.received, BUDGET.vet = deadline, cancel, 0, vet
    try:
        yield
    finally:
        BUDGET.deadline, BUDGET.cancel, BUDGET.received, BUDGET.vet = saved


def _clamp(timeout: float | None, expired: type[Exception]) -> float | None:
    deadline = BUDGET.deadline
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise expired("the total deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        while True:
            cancel = BUDGET.cancel
            if cancel is not None and cancel.is_set():
                raise LoadCancelledError
            allowed = _clamp(timeout, httpcore.ReadTimeout)
            # A socket timeout leaves the socket intact, so a quiet load stream is re-read.
            last_try = cancel is None or (allowed is not None and allowed <= CANCEL_POLL)
            poll = allowed if last_try else CANCEL_POLL
            try:
                data = self._inner.read(max_bytes, poll)
            except httpcore.ReadTimeout:
                if last_try:
                    raise
                continue
            BUDGET.received += len(data)
            return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _clamp(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, *, vetted: bool = False) -> None:
        self._inner = httpcore.SyncBackend()
        self._vetted = vetted

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        vet = BUDGET.vet
        if vet is None and self._vetted:  # fail closed: this pool's connections carry the key
            raise ListenerChangedError("no listener check came with the request; not connected")
        allowed = _clamp(timeout, httpcore.ConnectTimeout)
        stream = self._inner.connect_tcp(host, port, allowed, local_address, socket_options)
        if vet is not None:
            try:
                why = vet(stream.get_extra_info("socket"))
            except Exception as exc:  # a failing check keeps the request off the connection
                why = f"the connection check failed ({type(exc).__name__}: {exc})"
            except BaseException:
                stream.close()
                raise
            if why:
                stream.close()
                raise ListenerChangedError(why)
            try:  # the check's own time counts against the request's deadline
                _clamp(None, httpcore.ConnectTimeout)
            except httpcore.ConnectTimeout:
                stream.close()
                raise
        return _DeadlineStream(stream)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class DeadlineTransport(httpx.HTTPTransport):
    """httpx's transport over a pool of our own: every connection under the deadline backend.

    vetted=True: a pool for requests that carry a credential or whose answers decide what is
    done. Each new connection is vetted once it is established, before a byte of the request
    goes out (the request's scope must bring a `vet`; without one nothing connects), and such a
    pool is never shared with requests that were not vetted. A kept-alive connection was
    accepted by whoever listened when it was made: one opened unchecked to a squatter, who then
    let go of the port but not of the connection, would otherwise carry the key to it, and
    bring back its answers (a 503 'unhealthy' for every /health) as TabbyAPI's."""

    def __init__(self, *, vetted: bool = False) -> None:
        # verify=False: the context httpx builds here serves only the pool replaced below, and
        # the default one loads certifi's CA bundle (~1 MB RSS). Ours gets no ssl_context: httpcore
        # would build its verifying default only for an https URL.
        super().__init__(verify=False, trust_env=False)
        # httpx offers no public hook for the network backend; its own pool is swapped for one
        # built the same way (no proxy, HTTP/1.1) but with the deadline backend.
        self._pool = httpcore.ConnectionPool(
            max_connections=20,
            max_keepalive_connections=10,
            network_backend=_DeadlineBackend(vetted=vetted),
        )
        self.closed = False

    @property
    def pool(self) -> httpcore.ConnectionPool:
        """The connection pool under the client, which `exchange` sends to directly."""
        return self._pool

    def close(self) -> None:
        # A closed pool would simply open new connections: `exchange` asks this flag instead,
        # as httpx refuses to send through a closed client.
        self.closed = True
        super().close()


@dataclass(frozen=True)
class Reply:
    """One complete HTTP answer, or `failure` when none came back (`unconnected`: no connection
    was made for it: refused, or no answer to the handshake within the deadline)."""

    latency_s: float
    status: int = 0
    content_type: str = ""
    body: bytes = b""
    failure: HttpResult | None = None
    unconnected: bool = False


def new_client(transport: DeadlineTransport | None = None) -> httpx.Client:
    """An httpx client over the deadline transport (a new one by default), blind to the
    environment's proxies.

    identity: httpx would inflate a compressed answer a whole read at a time, beyond any bound
    we count; an answer compressed anyway is refused (content_encoding)."""
    return httpx.Client(
        transport=transport or DeadlineTransport(),
        trust_env=False,
        headers={"Accept-Encoding": "identity"},
    )


def result(reply: Reply, outcome: Outcome, detail: str = "") -> HttpResult:
    return HttpResult(outcome, reply.latency_s, reply.status, detail)


def json_object(reply: Reply) -> tuple[dict[str, Any] | None, str]:
    """The body as a JSON object, or (None, why not). JSON nested deeper than the interpreter
    recurses (RecursionError) is as malformed as any other: a bad answer, never a crash."""
    ctype = reply.content_type.split(";")[0].strip().lower()
    if ctype != "application/json" and not ctype.endswith("+json"):
        return None, f"HTTP {reply.status} with content type {ctype or 'none'!r}, not JSON"
    try:
        body = json.loads(reply.body)
    except RecursionError:
        return None, f"HTTP {reply.status} with JSON nested too deeply ({len(reply.body)} bytes)"
    except ValueError:
        return None, f"HTTP {reply.status} with malformed JSON ({len(reply.body)} bytes)"
    if not isinstance(body, dict):
        return None, f"HTTP {reply.status} with JSON {type(body).__name__}, not an object"
    return body, ""


def content_encoding(resp: httpx.Response) -> str:
    """The answer's content coding when it is not plain bytes ("" for identity)."""
    coding = resp.headers.get("content-encoding", "").strip().lower()
    return "" if coding in ("", "identity") else coding


def error_detail(reply: Reply, redact: Callable[[str], str]) -> str:
    """FastAPI's {"detail": ...} in words, or a short excerpt of a plain-text body.

    The excerpt is cut from the redacted body: a body that echoes the key must not leave the
    part of it before the cut."""
    body, _ = json_object(reply)
    if body is None:
        text = " ".join(redact(reply.body.decode("utf-8", "replace")).split())
        return cut(text, _EXCERPT_MAX)
    detail = body.get("detail")
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):  # 422: [{"loc": [...], "msg": "..."}]
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                parts.append(f"{loc}: {item.get('msg', '?')}" if loc else str(item.get("msg")))
        return "; ".join(parts)
    return ""


def describe(exc: BaseException, scrub: Callable[[str], str]) -> str:
    text = str(exc)
    return scrub(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def failed(
    started: float,
    outcome: Outcome,
    detail: str,
    scrub: Callable[[str], str],
    status: int | None = None,
    *,
    unconnected: bool = False,
) -> Reply:
    res = HttpResult(outcome, time.monotonic() - started, status, scrub(detail))
    return Reply(res.latency_s, failure=res, unconnected=unconnected)


def _local(
    started: float, shown: str, exc: BaseException, scrub: Callable[[str], str]
) -> Reply | None:
    """LOCAL_ERROR when the exception is our own lack of descriptors or memory: the server was
    never asked, so it must not read as refused (that would count toward a restart)."""
    why = local_failure(exc)
    if not why:
        return None
    return failed(started, Outcome.LOCAL_ERROR, f"{shown} not probed: {why}", scrub)


@dataclass(frozen=True)
class Request:
    """A request as it goes to the pool."""

    method: str
    url: httpcore.URL
    headers: list[tuple[bytes, bytes]]
    content: bytes | None


def exchange(
    transport: DeadlineTransport,
    method: str,
    url: str,
    *,
    shown: str,
    headers: dict[str, str],
    body: object,
    started: float,
    budget: float,
    scrub: Callable[[str], str],
    vet: Callable[[socket.socket], str] | None = None,
) -> Reply:
    """One request that ends by `started + budget` (monotonic), the body read up to JSON_LIMIT
    bytes. `shown` is the URL as a detail may name it (credentials redacted). `vet` is asked
    about a connection opened for this request (DeadlineTransport): WITHHELD when it refuses.

    It goes to httpcore's pool directly (DeadlineTransport.pool, under an httpx client or not):
    these are small requests of every cycle, and httpx's layers above the pool (URL model,
    cookies, auth and redirect flows, response wrapping) cost more CPU than the exchange itself
    (issue 15; bench/RESULTS.md). h11 still parses every byte the server sends."""
    if transport.closed:  # our own state, no evidence about the server
        return failed(
            started, Outcome.LOCAL_ERROR, f"{shown} not probed: the client is closed", scrub
        )
    try:
        target = httpcore.URL(url)
    except (ValueError, TypeError) as exc:  # an unclosed "[", a bad port, a non-ASCII URL
        # Never sent: closest to "could not reach"; the detail says it is the URL's fault.
        why = f"{shown} is not a usable http URL ({describe(exc, scrub)})"
        return failed(started, Outcome.REFUSED, why, scrub)
    try:
        # httpx's own JSON encoding of a request body
        content = (
            None
            if body is None
            else json.dumps(
                body, ensure_ascii=False, separators=(",", ":"), allow_nan=False
            ).encode("utf-8")
        )
        request = Request(method, target, _request_headers(target, headers, content), content)
    except (ValueError, TypeError) as exc:  # a body JSON cannot hold, a header latin-1 cannot
        why = f"{shown} not probed: the request could not be written ({describe(exc, scrub)})"
        return failed(started, Outcome.LOCAL_ERROR, why, scrub)
    # The scope spans the handlers too: they ask BUDGET whether any byte came back.
    with deadline_scope(started + budget, vet=vet):
        return _exchange(transport.pool, request, shown, started, budget, scrub)


def host_header(url: httpcore.URL) -> bytes:
    """Host as httpx writes it: an IPv6 address in brackets (httpcore's own would be `::1:5000`,
    which no server can read), the port only when it is not the scheme's default."""
    host = b"[" + url.host + b"]" if b":" in url.host else url.host
    default = {b"http": 80, b"https": 443}.get(url.scheme)
    return host if url.port is None or url.port == default else b"%s:%d" % (host, url.port)


def _request_headers(
    url: httpcore.URL, headers: dict[str, str], content: bytes | None
) -> list[tuple[bytes, bytes]]:
    """The caller's headers plus what httpx would have added: Host, identity coding (see
    new_client), and the JSON body's type and length."""
    out = [(b"Host", host_header(url)), (b"Accept", b"*/*"), (b"Accept-Encoding", b"identity")]
    out += [(name.encode("ascii"), value.encode("latin-1")) for name, value in headers.items()]
    if content is not None:
        out += [(b"Content-Type", b"application/json"), (b"Content-Length", b"%d" % len(content))]
    return out


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str:
    """Every value of header `name` (lower case), joined by ", " as httpx joins them; "" when
    absent."""
    return ", ".join(value.decode("latin-1") for key, value in headers if key.lower() == name)


def _exchange(
    pool: httpcore.ConnectionPool,
    request: Request,
    shown: str,
    started: float,
    budget: float,
    scrub: Callable[[str], str],
) -> Reply:
    deadline = started + budget
    got_headers = False
    try:
        timeouts = {"connect": budget, "read": budget, "write": budget, "pool": budget}
        with pool.stream(
            request.method,
            request.url,
            headers=request.headers,
            content=request.content,
            extensions={"timeout": timeouts},
        ) as resp:
            got_headers = True
            coding = _header(resp.headers, b"content-encoding").strip().lower()
            if any(c.strip() not in ("", "identity") for c in coding.split(",")):
                why = f"{shown}: compressed answer ({coding}), which was not asked for"
                return failed(started, Outcome.BAD_BODY, why, scrub, resp.status)
            data = bytearray()
            for chunk in resp.iter_stream():
                data += chunk
                if len(data) > JSON_LIMIT:
                    return failed(started, Outcome.BAD_BODY, "body over 1 MiB", scrub, resp.status)
                if time.monotonic() > deadline:
                    raise httpcore.ReadTimeout("the total deadline passed")
            return Reply(
                time.monotonic() - started,
                resp.status,
                _header(resp.headers, b"content-type"),
                bytes(data),
            )
    except httpcore.TimeoutException as exc:
        why = f"no complete answer from {shown} within {budget:g} s"
        connecting = isinstance(exc, httpcore.ConnectTimeout)
        return failed(started, Outcome.TIMEOUT, why, scrub, unconnected=connecting)
    except httpcore.ConnectError as exc:
        return _local(started, shown, exc, scrub) or failed(
            started, Outcome.REFUSED, f"{shown}: {describe(exc, scrub)}", scrub, unconnected=True
        )
    except httpcore.LocalProtocolError as exc:
        # h11 would not write our own request (e.g. a control character in a header): never
        # sent, so no evidence about the server, and never a refusal that counts to a restart.
        why = f"{shown} not probed: the request could not be written ({describe(exc, scrub)})"
        return failed(started, Outcome.LOCAL_ERROR, why, scrub)
    except httpcore.UnsupportedProtocol as exc:  # never sent, as for an unusable URL above
        why = f"{shown} is not a usable http URL ({describe(exc, scrub)})"
        return failed(started, Outcome.REFUSED, why, scrub)
    except (httpcore.ReadError, httpcore.WriteError, httpcore.RemoteProtocolError) as exc:
        local = _local(started, shown, exc, scrub)
        if local is not None:
            return local
        if not got_headers and BUDGET.received == 0:
            why = f"{shown}: connection closed before an answer ({describe(exc, scrub)})"
            return failed(started, Outcome.REFUSED, why, scrub)
        why = f"{shown}: broken answer ({describe(exc, scrub)})"
        return failed(started, Outcome.BAD_BODY, why, scrub)
    except Exception as exc:
        return _other_failure(started, shown, exc, scrub)


def _other_failure(
    started: float, shown: str, exc: Exception, scrub: Callable[[str], str]
) -> Reply:
    """A failure that is not httpcore's: a new connection the vet refused (connected, nothing
    sent: no say of the server's), our own lack of resources, or anything else the answer made
    the client raise (a bad answer)."""
    if isinstance(exc, ListenerChangedError):
        return failed(started, Outcome.WITHHELD, f"{shown} not sent: {exc}", scrub)
    why = f"{shown}: unusable answer ({describe(exc, scrub)})"
    return _local(started, shown, exc, scrub) or failed(started, Outcome.BAD_BODY, why, scrub)


def choices_result(reply: Reply, status_result: Callable[[Reply], HttpResult]) -> HttpResult:
    """A completion's answer: OK with a non-empty `choices` list; `status_result` words an
    unexpected HTTP status."""
    if reply.failure is not None:
        return reply.failure
    if reply.status != 200:
        return status_result(reply)
    body, why = json_object(reply)
    if body is None:
        return result(reply, Outcome.BAD_BODY, why)
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        return result(reply, Outcome.BAD_BODY, "200 without a non-empty 'choices' list")
    return result(reply, Outcome.OK)
