"""A bounded HTTP/1.1 server for one page: one thread, one selector loop, a fixed connection cap.

The exporter must never cost the daemon more than a known number of file descriptors, threads and
bytes, whoever connects: http.server (and prometheus_client's bundled server, built on it) spends
a thread per connection and waits for a request head forever, so a few hundred idle connections
from any local user exhaust the daemon's file limit, and then the health probe, pause.json and
status.json fail with it. Here:

- one thread serves everything with non-blocking sockets;
- at most `max_connections` are open at once. A connection beyond the cap evicts the oldest one
  still sending its request (an idle flood pushes itself out, a scraper that asks at once is
  answered); only when every open connection is being answered is the newcomer closed instead;
- each connection has `deadline` seconds, from accept to the last byte of the answer, and a
  request head of at most `head_limit` bytes;
- one request per connection (`Connection: close`), GET only; the page is rendered in the loop;
  after the answer the server half-closes and waits (within the deadline) for the client's close.

Accepts are taken in rounds of at most half the cap, after the open connections were served, so a
newcomer is never evicted by the same round that accepted it: a client that sends its request
promptly gets it read before the next round can push it out.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

MAX_CONNECTIONS = 16
DEADLINE = 5.0  # seconds from accept to the last byte of the answer
HEAD_LIMIT = 8192  # bytes of request line and headers
BACKLOG = 128
ACCEPT_PAUSE = 0.5  # seconds without accepting after the process ran out of descriptors
_TICK = 1.0  # the longest select() wait: deadlines are checked at least this often
_RECV = 4096


@dataclass
class _Conn:
    sock: socket.socket
    deadline: float
    head: bytearray = field(default_factory=bytearray)
    answer: memoryview | None = None  # set once the request is understood
    sent: bool = False  # answered; reading what the client still sends until it closes


class _Listener:
    """Marks the listening socket's selector key."""


class _Wake:
    """Marks the wake-up socket's selector key."""


_LISTENER, _WAKE = _Listener(), _Wake()


def _reply(status: str, body: bytes, content_type: str, extra: str = "") -> memoryview:
    head = (
        f"HTTP/1.1 {status}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{extra}"
        "Connection: close\r\n\r\n"
    )
    return memoryview(head.encode("ascii") + body)


def _text(status: str, why: str, extra: str = "") -> memoryview:
    return _reply(status, why.encode() + b"\n", "text/plain; charset=utf-8", extra)


class PageServer:
    """Serves `render()` at GET `path` on (host, port); binds at construction (OSError if it
    cannot), serves after start(), stops and closes every socket in close()."""

    def __init__(
        self,
        host: str,
        port: int,
        render: Callable[[], bytes],
        *,
        path: str = "/metrics",
        content_type: str = "text/plain; charset=utf-8",
        max_connections: int = MAX_CONNECTIONS,
        deadline: float = DEADLINE,
        head_limit: int = HEAD_LIMIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_connections < 2:
            raise ValueError(f"max_connections must be at least 2, not {max_connections}")
        self._render = render
        self._path = path
        self._content_type = content_type
        self._max = max_connections
        self._deadline = deadline
        self._head_limit = head_limit
        self._clock = clock
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            # Waiting connections cost the kernel, not us: a deep queue keeps a scraper's SYN
            # from being dropped (and retried a second later) while a flood is being shed.
            listener.listen(BACKLOG)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, _LISTENER)
        self._selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._conns: dict[int, _Conn] = {}  # by fd, in accept order (dicts keep it)
        self._accept_paused_until: float | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        self.evicted = 0  # connections closed to make room (a flood shows up here)
        self.expired = 0  # connections closed at their deadline

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def start(self, name: str = "hydra-watchdog-metrics") -> None:
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        if self._stop:
            return
        self._stop = True
        with contextlib.suppress(OSError):  # a full wake-up buffer already wakes the loop
            self._wake_w.send(b"!")
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        else:
            self._close_all()

    # --- the loop -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop:
                self._round()
        finally:
            self._close_all()

    def _round(self) -> None:
        now = self._clock()
        wait = _TICK
        if self._conns:
            wait = min(wait, min(c.deadline for c in self._conns.values()) - now)
        if self._accept_paused_until is not None:
            wait = min(wait, self._accept_paused_until - now)
        events = self._selector.select(max(0.0, wait))
        listener_ready = False
        for key, mask in events:
            if key.data is _LISTENER:
                listener_ready = True
            elif key.data is _WAKE:
                self._drain_wake()
            elif isinstance(key.data, _Conn):
                self._serve(key.data, mask)
        now = self._clock()
        for conn in [c for c in self._conns.values() if c.deadline <= now]:
            self.expired += 1
            self._drop(conn)
        if self._accept_paused_until is not None and now >= self._accept_paused_until:
            self._accept_paused_until = None
            self._selector.register(self._listener, selectors.EVENT_READ, _LISTENER)
        if listener_ready and not self._stop:
            self._accept(now)

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(_RECV):
                pass

    def _accept(self, now: float) -> None:
        for _ in range(max(1, self._max // 2)):
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # The connection stays in the backlog and the listener stays readable:
                    # without a pause this loop would spin until a descriptor frees up.
                    self._selector.unregister(self._listener)
                    self._accept_paused_until = now + ACCEPT_PAUSE
                return
            if len(self._conns) >= self._max and not self._evict_one():
                sock.close()
                continue
            sock.setblocking(False)
            conn = _Conn(sock, now + self._deadline)
            self._conns[sock.fileno()] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _evict_one(self) -> bool:
        """Close the oldest connection still sending its request (or already answered); False
        if every one is in the middle of its answer."""
        oldest = next((c for c in self._conns.values() if c.answer is None or c.sent), None)
        if oldest is None:
            return False
        self.evicted += 1
        self._drop(oldest)
        return True

    def _drop(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        self._conns.pop(fd, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        conn.sock.close()

    def _close_all(self) -> None:
        for conn in list(self._conns.values()):
            self._drop(conn)
        self._selector.close()
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()

    # --- one connection -----------------------------------------------------------------------

    def _serve(self, conn: _Conn, mask: int) -> None:
        if conn.sent:
            self._linger(conn)
            return
        if conn.answer is None and mask & selectors.EVENT_READ:
            try:
                data = conn.sock.recv(_RECV)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(conn)
                return
            if not data:  # the client gave up before asking
                self._drop(conn)
                return
            conn.head += data
            end = conn.head.find(b"\r\n\r\n")
            if end < 0 and len(conn.head) <= self._head_limit:
                return
            if end < 0 or end + 4 > self._head_limit:
                conn.answer = _text(
                    "431 Request Header Fields Too Large",
                    f"the request head is over {self._head_limit} bytes",
                )
            else:
                conn.answer = self._answer(bytes(conn.head[:end]))
            self._selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
        if conn.answer is not None:
            self._send(conn)

    def _send(self, conn: _Conn) -> None:
        assert conn.answer is not None
        try:
            sent = conn.sock.send(conn.answer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        conn.answer = conn.answer[sent:]
        if conn.answer:
            return
        # Closing a socket with unread input sends a reset, which can destroy the answer before
        # the client read it (a 431 for an endless head, say): send FIN, then read until the
        # client closes, within the same deadline.
        conn.sent = True
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._drop(conn)
            return
        self._selector.modify(conn.sock, selectors.EVENT_READ, conn)

    def _linger(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)

    def _answer(self, head: bytes) -> memoryview:
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _text("400 Bad Request", "expected 'GET /metrics HTTP/1.1'")
        method, target, _version = parts
        if method != "GET":
            return _text("405 Method Not Allowed", "use GET", "Allow: GET\r\n")
        if urlsplit(target).path != self._path:
            return _text("404 Not Found", f"the metrics are at {self._path}")
        try:
            page = self._render()
        except Exception as exc:  # a collector's bug must not end the exporter
            return _text("500 Internal Server Error", f"rendering failed: {type(exc).__name__}")
        return _reply("200 OK", page, self._content_type)
