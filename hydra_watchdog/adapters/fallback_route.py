"""The LiteLLM fallback route over HTTP: an adapter (interfaces.FallbackRoute).

The runbook's check: a 5-token chat completion through the proxy at the configured URL, within
a total deadline (adapters/http_deadline.py). The proxy is another host than TabbyAPI, so this
adapter has no key to send: it never sees TabbyAPI's admin key, and it sends no Authorization
header at all. A URL's own credentials (`http://user:pass@...`) are redacted from every detail.
"""

from __future__ import annotations

import time

from hydra_watchdog.adapters.http_deadline import (
    DeadlineTransport,
    Reply,
    choices_result,
    error_detail,
    exchange,
    result,
)
from hydra_watchdog.config import redact_url
from hydra_watchdog.observation import HttpResult, Outcome
from hydra_watchdog.printable import one_line

_DETAIL_MAX = 300


def _scrub(text: str) -> str:
    return one_line(text, _DETAIL_MAX)


def _status_result(reply: Reply) -> HttpResult:
    """An unexpected status: UNAUTHORIZED for 401/403 (the proxy's own key), HTTP_ERROR else."""
    detail = f"HTTP {reply.status}"
    said = error_detail(reply, lambda text: text)
    if said:
        detail += f": {said}"
    outcome = Outcome.UNAUTHORIZED if reply.status in (401, 403) else Outcome.HTTP_ERROR
    return result(reply, outcome, _scrub(detail))


class LiteLlmRoute:
    """Safe to share between threads; close() releases the connection pool."""

    def __init__(self) -> None:
        self._transport = DeadlineTransport()

    def check(self, url: str, model: str, timeout: float) -> HttpResult:
        started = time.monotonic()
        payload = {
            "model": model,
            "messages": [{"role": "user", "content": "test"}],
            "max_tokens": 5,
        }
        target = url.rstrip("/") + "/v1/chat/completions"
        try:
            shown = redact_url(target)
        except ValueError:  # e.g. an unclosed "[" of an IPv6 host: the request will say more
            shown = "the configured URL"
        reply = exchange(
            self._transport,
            "POST",
            target,
            shown=shown,
            headers={},
            body=payload,
            started=started,
            budget=timeout,
            scrub=_scrub,
        )
        return choices_result(reply, _status_result)

    def close(self) -> None:
        self._transport.close()
