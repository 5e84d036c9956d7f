"""A raw HTTP server on loopback that answers whatever a test scripts, byte by byte, and keeps
every request it read (`seen`): for the clients' handling of answers no real server gives."""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass, field


@dataclass
class Script:
    parts: tuple[tuple[float, bytes], ...]  # (pause before, bytes)
    hold_open: bool = False  # after the last part, keep the connection until the client leaves


@dataclass
class RawServer:
    host: str = "127.0.0.1"  # or "::1"
    routes: dict[str, Script] = field(default_factory=dict)
    default: Script = field(default_factory=lambda: Script(()))
    echo_auth: bool = False
    seen: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        self._sock.bind((self.host, 0))
        self._sock.listen(32)
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def __enter__(self) -> RawServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                request = self._read_request(conn)
                self.seen.append(request)
                path = request.split(b" ", 2)[1].decode() if request.count(b" ") >= 2 else "/"
                script = self.routes.get(path, self.default)
                if self.echo_auth:
                    script = self._echo(request)
                for pause, data in script.parts:
                    if pause and self._stop.wait(pause):
                        return
                    conn.sendall(data)
                if script.hold_open:
                    while not self._stop.is_set() and conn.recv(1024):
                        pass
            except OSError:
                pass  # the client gave up first: what the test wants to see

    @staticmethod
    def _read_request(conn: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(body) < length:
            chunk = conn.recv(4096)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body

    @staticmethod
    def _echo(request: bytes) -> Script:
        auth = [ln for ln in request.split(b"\r\n") if ln.lower().startswith(b"authorization")]
        detail = (auth[0] if auth else b"none").decode()
        body = json.dumps({"detail": f"you sent {detail}"}).encode()
        if b"/v1/model/load" in request.split(b"\r\n", 1)[0]:
            event = json.dumps({"error": {"message": f"you sent {detail}"}}).encode()
            stream = b"data: " + event + b"\n\n"
            return Script(((0, answer_head(200, "text/event-stream", len(stream)) + stream),))
        return Script(((0, answer_head(401, "application/json", len(body)) + body),))


def answer_head(status: int, ctype: str, length: int | None, extra: str = "") -> bytes:
    lines = [f"HTTP/1.1 {status} X", "connection: close"]
    if ctype:
        lines.append(f"content-type: {ctype}")
    if length is not None:
        lines.append(f"content-length: {length}")
    if extra:
        lines.append(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def reply(status: int, ctype: str, body: bytes) -> Script:
    return Script(((0, answer_head(status, ctype, len(body)) + body),))
