"""Text from other processes made safe to print on one line.

A command line, a server's error message or a journal value can hold anything a process chose to
put there: a newline followed by a forged "[ok] all healthy" record, a carriage return that
overwrites the line on a terminal, an escape sequence that recolours or clears it. Such text is
shown escaped, the way repr() shows it (a newline as the two characters `\\n`), so one record
stays one line and a terminal shows only what was sent. Backslashes are left as they are: a
literal `\\n` typed by the process is no more than two harmless characters either way.
"""

from __future__ import annotations

import re

# C0 controls, DEL, C1 controls; the Unicode line and paragraph separators (some viewers break
# lines there); bidirectional overrides and isolates (they reorder what the reader sees).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _SHORT.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def printable(text: str) -> str:
    """`text` with every control, line-separator and bidi-override character escaped."""
    return _UNSAFE.sub(_escape, text)


def one_line(text: str, limit: int = 100) -> str:
    """`text` escaped (see printable), then cut to `limit` characters."""
    shown = printable(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
