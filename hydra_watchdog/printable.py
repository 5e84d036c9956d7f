"""Text from other processes made safe to print on one line.

A command line, a server's error message or a journal value can hold anything a process chose to
put there: a newline followed by a forged "[ok] all healthy" record, a carriage return that
overwrites the line on a terminal, an escape sequence that recolours or clears it. Such text is
shown escaped, the way repr() shows it (a newline as the two characters `\\n`), so one record
stays one line and a terminal shows only what was sent. Backslashes are left as they are: a
literal `\\n` typed by the process is no more than two harmless characters either way.
"""

from __future__ import annotations

# C0 controls, DEL, C1 controls; the Unicode line and paragraph separators (some viewers break
# lines there); bidirectional overrides and isolates (they reorder what the reader sees).
_UNSAFE = [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, *range(0x202A, 0x202F)]
_UNSAFE += range(0x2066, 0x206A)
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# str.translate, not a regex: `status` imports this at every run, and compiling the pattern cost
# it more than escaping ever does.
_ESCAPES = {
    code: _SHORT.get(chr(code)) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    for code in _UNSAFE
}


def printable(text: str) -> str:
    """`text` with every control, line-separator and bidi-override character escaped."""
    return text.translate(_ESCAPES)


CUT = "…"  # marks where a value was cut; "..." can be part of a true value (a path, a range)


def cut(text: str, limit: int) -> str:
    """`text` whole if it fits in `limit` characters, else cut to fit and marked with CUT: after
    the last whole word when that keeps at least half, else mid-word. Never an unmarked cut, so a
    cut value ("--port 570" of "--port 57065") never reads as another, whole one."""
    if len(text) <= limit:
        return text
    kept = text[: limit - len(CUT)]
    space = kept.rfind(" ")
    if space >= limit // 2:
        kept = kept[: space + 1]  # the space stays: "--port …", the flag whole, its value not
    return kept + CUT


def one_line(text: str, limit: int = 100) -> str:
    """`text` escaped (see printable), then cut to `limit` characters (see cut)."""
    return cut(printable(text), limit)


WIDTH = 100  # every line the watchdog prints fits in this many columns


def wrapped(text: str, width: int = WIDTH, indent: str = "  ") -> str:
    """`text` escaped (see printable), as lines of at most `width` characters, the lines after
    the first indented: a refusal on a terminal, the key first and the value it quotes whole
    where it fits on a line. Never a word cut but one longer than a line (a long path)."""
    import textwrap  # noqa: PLC0415 - only a command that refuses something pays for it

    return textwrap.fill(
        printable(text), width=width, subsequent_indent=indent, break_on_hyphens=False
    )
