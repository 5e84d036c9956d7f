"""Server-sent events with bounds: TabbyAPI's model load answers with an event stream.

Bounds on one load's event stream. A real one is small: a 70B model sends ~160 module events
(a few hundred with draft and vision parts, each under 200 bytes), an error is one event with
a message and at most a traceback of a few KiB, newer builds add a `: ping` every 15 s (60 in
the default 15-minute load_timeout). Each bound is far above that and keeps our memory flat
against a stream that is not TabbyAPI's (endless data lines, one endless line, a flood of
tiny events): past one, the parser raises StreamMalformedError and the caller closes the stream.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

SSE_MAX_LINE = 64 << 10  # characters in one line
SSE_MAX_EVENT = 256 << 10  # characters of data in one event (its data lines together)
SSE_MAX_EVENTS = 100_000  # lines that are not data: event ends, comments (pings), other fields
SSE_MAX_BYTES = 64 << 20  # bytes in the whole stream

_LINE_END = re.compile(r"\r\n|\r|\n")


class StreamMalformedError(ValueError):
    """An event stream broke one of its bounds; the message says which."""


@dataclass(frozen=True)
class SseLimits:
    """The bounds SseParser enforces (the SSE_* constants, whose comment says why)."""

    line: int = SSE_MAX_LINE
    event: int = SSE_MAX_EVENT
    events: int = SSE_MAX_EVENTS
    total_bytes: int = SSE_MAX_BYTES


def _size(n: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


class SseParser:
    """Server-sent events, fed in arbitrary chunks; yields each event's data.

    Comments (TabbyAPI's `: ping`) and fields other than `data` are dropped; an event left
    unterminated when the stream ends is discarded, as the SSE specification says. feed() raises
    StreamMalformedError as soon as the stream breaks a bound of `limits`, so what it holds never
    exceeds one line and one event, however long the stream runs.
    """

    def __init__(self, limits: SseLimits = SseLimits()) -> None:
        self._limits = limits
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._buffer = ""  # the start of a line whose end has not come yet
        self._data: list[str] = []
        self._event_size = 0  # characters in self._data, with the newlines joining them
        self._other_lines = 0
        self._bytes = 0

    def feed(self, chunk: bytes) -> list[str]:
        limits = self._limits
        self._bytes += len(chunk)
        if self._bytes > limits.total_bytes:
            raise StreamMalformedError(f"over {_size(limits.total_bytes)} in total")
        text = self._buffer + self._decoder.decode(chunk)
        events: list[str] = []
        pos = 0
        for match in _LINE_END.finditer(text):
            if match.group() == "\r" and match.end() == len(text):
                break  # maybe the first half of a \r\n split across chunks
            self._line(text[pos : match.start()], events)
            pos = match.end()
        # Slicing once per chunk, not once per line: a chunk of tiny lines stays linear.
        self._buffer = text[pos:]
        if len(self._buffer) > limits.line:
            raise StreamMalformedError(f"a line over {_size(limits.line)}")
        return events

    def end(self) -> list[str]:
        """The stream ended: a trailing CR was a line end after all."""
        return self.feed(b"\n") if self._buffer.endswith("\r") else []

    def _line(self, line: str, events: list[str]) -> None:
        limits = self._limits
        if len(line) > limits.line:
            raise StreamMalformedError(f"a line over {_size(limits.line)}")
        name, _, value = line.partition(":")
        if line and name == "data":
            value = value.removeprefix(" ")
            self._event_size += len(value) + 1
            if self._event_size > limits.event:
                raise StreamMalformedError(f"an event over {_size(limits.event)}")
            self._data.append(value)
            return
        self._other_lines += 1
        if self._other_lines > limits.events:
            raise StreamMalformedError(f"over {limits.events} events")
        if not line and self._data:
            events.append("\n".join(self._data))
            self._data, self._event_size = [], 0
