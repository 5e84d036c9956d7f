"""A failure that a loop retries every cycle is said once while it stands: again when it
changes, and once when it clears. (A state file the daemon cannot write would otherwise be an
error line every 5 seconds, burying what else happened.)

Its own module, importing nothing: the load records (read by the load helper too) use it.
"""

from __future__ import annotations


def failure_key(exc: BaseException) -> str:
    """What makes two failures the same one: an OSError's errno (its message may name a random
    temp file), else the message (an UnsafeDirectoryError names the component at fault)."""
    errno = getattr(exc, "errno", None)
    return f"{type(exc).__name__}: errno {errno}" if errno else f"{type(exc).__name__}: {exc}"


class SaidOnce:
    """Whether a failure, or its end, is news."""

    def __init__(self) -> None:
        self.standing: str | None = None  # the failure said last, until it cleared

    def failed(self, key: str) -> bool:
        """A failure (`key`: failure_key, or any text that tells one failure from another)
        happened: True when the caller should say it (it is new, or not the one said)."""
        news = key != self.standing
        self.standing = key
        return news

    def worked(self) -> bool:
        """What failed works now: True when a failure stood (the caller says it cleared)."""
        cleared = self.standing is not None
        self.standing = None
        return cleared
