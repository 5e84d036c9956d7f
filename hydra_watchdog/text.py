"""Text taken from other processes, made safe for one log line.

A command line is whatever its process put there: newlines, escape sequences, forged
"[hydra-watchdog] all OK" lines. Anything that quotes one in a message goes through here.
"""

from __future__ import annotations


def one_line(text: str, limit: int = 100) -> str:
    """`text` cut to `limit` characters, then every non-printable character escaped
    (\\n, \\x1b, ...), so it can never end a log line or drive a terminal."""
    cut = text if len(text) <= limit else text[: limit - 3] + "..."
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in cut)
