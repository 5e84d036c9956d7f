"""TabbyAPI over HTTP: one httpx client, a hard total deadline per request, typed outcomes.

httpx has no total-request deadline: its read timeout applies to each socket read, so a server
that trickles one byte a second holds a request forever (encode/httpx#1450). We therefore give
httpcore a network backend whose streams clamp every connect, read and write to the time left
before a per-thread deadline; a probe can overrun its deadline by one scheduler wake-up at most.
The same backend polls a cancel event during a model load, because a load has no read timeout
at all: older TabbyAPI builds cancel a load when the client disconnects, so a quiet stream must
never be cut short, only the overall load_timeout or an explicit cancel end it.

Nothing here raises for anything the server or the network does: every method returns a typed
outcome (observation.Outcome) with the measured latency. The admin key goes out only in the
Authorization header of requests to TabbyAPI, and only after the listener on its port was
verified as TabbyAPI (probes/identity.py): a local user who binds the port while TabbyAPI is down
gets nothing but unauthenticated /health probes. Every detail string is scrubbed of the key
(before it is cut to length, so no piece of the key survives a cut) and has its control
characters escaped.

Every read is bounded: a plain answer by JSON_LIMIT, a load's event stream by the SSE_* bounds
below. Answers are asked for and read uncompressed (a few KiB of gzip can inflate to gigabytes
in one read), so the bytes counted are the bytes held.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpcore
import httpx

from hydra_watchdog.config import Config, redact_url
from hydra_watchdog.interfaces import LoadOutcome
from hydra_watchdog.observation import (
    Canary,
    Health,
    HttpResult,
    ModelStatus,
    Outcome,
    UnitStatus,
    local_failure,
)
from hydra_watchdog.printable import printable
from hydra_watchdog.probes.identity import ListenerCheck, ListenerGate

JSON_LIMIT = 1 << 20  # bytes; TabbyAPI's answers are a few hundred bytes
_CANCEL_POLL = 0.1  # seconds between cancel checks while a load stream is quiet
_DETAIL_MAX = 300
_EXCERPT_MAX = 120  # characters of a plain-text error body quoted in a detail
_NO_MODEL = "No models"  # TabbyAPI: "No models are currently loaded."

# Bounds on one load's event stream. A real one is small: a 70B model sends ~160 module events
# (a few hundred with draft and vision parts, each under 200 bytes), an error is one event with
# a message and at most a traceback of a few KiB, newer builds add a `: ping` every 15 s (60 in
# the default 15-minute load_timeout). Each bound is far above that and keeps our memory flat
# against a stream that is not TabbyAPI's (endless data lines, one endless line, a flood of
# tiny events): past one, the load fails as "event stream malformed" and the connection closes.
SSE_MAX_LINE = 64 << 10  # characters in one line
SSE_MAX_EVENT = 256 << 10  # characters of data in one event (its data lines together)
SSE_MAX_EVENTS = 100_000  # lines that are not data: event ends, comments (pings), other fields
SSE_MAX_BYTES = 64 << 20  # bytes in the whole stream


class _Budget(threading.local):
    """The deadline (monotonic) and cancel event of the request running on this thread."""

    deadline: float | None = None
    cancel: threading.Event | None = None
    received: int = 0  # bytes read so far: tells "closed in silence" from "sent garbage"


_BUDGET = _Budget()


class _LoadCancelledError(Exception):
    """Raised inside a read when the load's cancel event is set; never leaves this module."""


@contextmanager
def _budget(deadline: float, cancel: threading.Event | None = None) -> Iterator[None]:
    saved = (_BUDGET.deadline, _BUDGET.cancel, _BUDGET.received)
    _BUDGET.deadline, _BUDGET.cancel, _BUDGET.received = deadline, cancel, 0
    try:
        yield
    finally:
        _BUDGET.deadline, _BUDGET.cancel, _BUDGET.received = saved


def _clamp(timeout: float | None, expired: type[Exception]) -> float | None:
    deadline = _BUDGET.deadline
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
            cancel = _BUDGET.cancel
            if cancel is not None and cancel.is_set():
                raise _LoadCancelledError
            allowed = _clamp(timeout, httpcore.ReadTimeout)
            # A socket timeout leaves the socket intact, so a quiet load stream is re-read.
            last_try = cancel is None or (allowed is not None and allowed <= _CANCEL_POLL)
            poll = allowed if last_try else _CANCEL_POLL
            try:
                data = self._inner.read(max_bytes, poll)
            except httpcore.ReadTimeout:
                if last_try:
                    raise
                continue
            _BUDGET.received += len(data)
            return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _clamp(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        allowed = _clamp(timeout, httpcore.ConnectTimeout)
        stream = self._inner.connect_tcp(host, port, allowed, local_address, socket_options)
        return _DeadlineStream(stream)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _DeadlineTransport(httpx.HTTPTransport):
    def __init__(self) -> None:
        super().__init__(trust_env=False)
        # httpx offers no public hook for the network backend; its own pool is swapped for one
        # built the same way (no proxy, HTTP/1.1) but with the deadline backend.
        self._pool = httpcore.ConnectionPool(
            max_connections=20, max_keepalive_connections=10, network_backend=_DeadlineBackend()
        )


@dataclass(frozen=True)
class ModelList:
    """GET /v1/model/list: every model folder with the admin key, only the loaded one without."""

    result: HttpResult
    models: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Reply:
    """One complete HTTP answer, or `failure` when none came back."""

    latency_s: float
    status: int = 0
    content_type: str = ""
    body: bytes = b""
    failure: HttpResult | None = None


def read_admin_key(path: str, environ: Mapping[str, str]) -> tuple[str | None, str]:
    """(key, problem) from `path`, or from systemd's credential `admin_key` when path is empty.

    problem is "" when all is well (including "no key configured"); otherwise it says which file
    could not be used and why, never what it holds.
    """
    source = path
    if not source:
        creds = environ.get("CREDENTIALS_DIRECTORY", "")
        candidate = Path(creds, "admin_key") if creds else None
        if candidate is None or not candidate.is_file():
            return None, ""
        source = str(candidate)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        return None, f"the admin key file {source} cannot be read ({why})"
    key = text.strip()
    if not key:
        return None, f"the admin key file {source} is empty"
    if any(ch.isspace() for ch in key):
        return None, f"the admin key file {source} holds more than one word; expected the key only"
    return key, ""


def admin_key_source(path: str, environ: Mapping[str, str]) -> str:
    """Where the admin key comes from, for messages (never the key itself)."""
    if path:
        return f"the file {path}"
    creds = environ.get("CREDENTIALS_DIRECTORY", "")
    if creds and Path(creds, "admin_key").is_file():
        return "the systemd credential 'admin_key'"
    return ""


class TabbyClient:
    """interfaces.TabbyApi over HTTP, plus list_models(). Safe to share between threads."""

    def __init__(
        self,
        base_url: str,
        *,
        admin_key: str | None,
        health_timeout: float,
        gate: Callable[[], ListenerCheck],
        request_timeout: float = 60.0,
        key_problem: str = "",
        on_unit: Callable[[UnitStatus], None] | None = None,
        key_source: str = "",
    ) -> None:
        """`gate` is asked right before every request that would carry the key (and its URL is
        pinned to the address it verified); `on_unit` receives each cycle's unit status, which
        the gate judges listeners by."""
        self.base_url = base_url.rstrip("/")
        self._gate = gate
        self._on_unit = on_unit
        self.health_timeout = health_timeout
        self.request_timeout = request_timeout
        self.key_problem = key_problem
        self.key_source = key_source
        self.__key = admin_key or None
        self._load_lock = threading.Lock()
        # identity: httpx would inflate a compressed answer a whole read at a time, beyond any
        # bound we count; an answer compressed anyway is refused (_encoding).
        self._http = httpx.Client(
            transport=_DeadlineTransport(),
            trust_env=False,
            headers={"Accept-Encoding": "identity"},
        )

    @classmethod
    def from_config(
        cls, cfg: Config, *, admin_key: tuple[str | None, str] | None = None
    ) -> TabbyClient:
        """`admin_key`: (key, problem) read elsewhere (the load helper's inherited descriptor);
        by default read_admin_key() of the configured file or credential."""
        if admin_key is None:
            admin_key = read_admin_key(cfg.tabbyapi.admin_key_file, os.environ)
        key, problem = admin_key
        t = cfg.tabbyapi
        gate = ListenerGate(
            urllib.parse.urlsplit(t.url).hostname or "",
            t.port,
            install_dirs=t.cmdline_patterns,
            user=t.user,
        )
        return cls(
            t.url,
            admin_key=key,
            health_timeout=t.health_timeout,
            gate=gate.check,
            key_problem=problem,
            on_unit=gate.set_unit,
            key_source=admin_key_source(t.admin_key_file, os.environ),
        )

    def note_unit(self, unit: UnitStatus) -> None:
        if self._on_unit is not None:
            self._on_unit(unit)

    def __repr__(self) -> str:
        key = "set" if self.__key else "unset"
        return f"TabbyClient({self.base_url!r}, admin_key=<{key}>)"

    def close(self) -> None:
        self._http.close()

    # --- probes ---------------------------------------------------------------------------------

    def health(self) -> Health:
        reply = self._fetch("GET", "/health", self.health_timeout, auth=False)
        if reply.failure is not None:
            return Health(reply.failure, healthy=False)
        if reply.status not in (200, 503):
            return Health(self._status_result(reply), healthy=False)
        body, why = _json_object(reply)
        if body is None:
            return Health(_result(reply, Outcome.BAD_BODY, why), healthy=False)
        state = body.get("status")
        if reply.status == 200 and state == "healthy":
            return Health(_result(reply, Outcome.OK), healthy=True)
        if reply.status == 503 and state == "unhealthy":
            issues = _issue_descriptions(body.get("issues"))
            if issues is None:
                why = "503 'unhealthy' whose 'issues' is not a list"
                return Health(_result(reply, Outcome.BAD_BODY, why), healthy=False)
            detail = "unhealthy (sticky until restart): " + ("; ".join(issues) or "no issue text")
            issue_text = tuple(self._scrub(i) for i in issues)
            return Health(
                _result(reply, Outcome.HTTP_ERROR, self._scrub(detail)),
                healthy=False,
                unhealthy_issues=issue_text,
            )
        why = f"HTTP {reply.status} with status {self._scrub(repr(state))}"
        return Health(_result(reply, Outcome.BAD_BODY, why), healthy=False)

    def model(self) -> ModelStatus:
        return self._model(self.health_timeout)

    def _model(self, budget: float) -> ModelStatus:
        reply = self._fetch("GET", "/v1/model", budget)
        if reply.failure is not None:
            return ModelStatus(reply.failure, loaded=None, known=False)
        if reply.status in (200, 400, 503):
            body, why = _json_object(reply)
            if body is None:
                return ModelStatus(_result(reply, Outcome.BAD_BODY, why), None, known=False)
            if reply.status == 200:
                ident = body.get("id")
                if isinstance(ident, str) and ident:
                    return ModelStatus(_result(reply, Outcome.OK), loaded=ident, known=True)
                why = "200 without a model 'id'"
                return ModelStatus(_result(reply, Outcome.BAD_BODY, why), None, known=False)
            detail = body.get("detail")
            # 503 is the newer builds' "no model"; builds before 2025-04 answer 400.
            if isinstance(detail, str) and (reply.status == 503 or _NO_MODEL in detail):
                no_model = _result(reply, Outcome.OK, self._scrub(detail))
                return ModelStatus(no_model, loaded=None, known=True)
        return ModelStatus(self._status_result(reply), loaded=None, known=False)

    def canary(self, deadline: float) -> Canary:
        """A 1-token completion that must finish within `deadline` seconds."""
        payload = {"prompt": "Hi", "max_tokens": 1}
        reply = self._fetch("POST", "/v1/completions", deadline, body=payload)
        return Canary(self._choices_result(reply))

    def unload_model(self) -> HttpResult:
        reply = self._fetch("POST", "/v1/model/unload", self.request_timeout, body={})
        if reply.failure is not None:
            return reply.failure
        if reply.status == 200:
            return _result(reply, Outcome.OK)
        return self._status_result(reply)

    def list_models(self) -> ModelList:
        reply = self._fetch("GET", "/v1/model/list", self.request_timeout)
        if reply.failure is not None:
            return ModelList(reply.failure)
        if reply.status != 200:
            return ModelList(self._status_result(reply))
        body, why = _json_object(reply)
        data = None if body is None else body.get("data")
        if body is None or not isinstance(data, list):
            return ModelList(_result(reply, Outcome.BAD_BODY, why or "no 'data' list"))
        ids = [item.get("id") for item in data if isinstance(item, dict)]
        if len(ids) != len(data) or not all(isinstance(i, str) for i in ids):
            return ModelList(_result(reply, Outcome.BAD_BODY, "a 'data' entry without an 'id'"))
        return ModelList(_result(reply, Outcome.OK), tuple(str(i) for i in ids))

    def check_fallback_route(self, url: str, model: str, timeout: float) -> HttpResult:
        """The runbook's LiteLLM check: a 5-token chat completion through the proxy at `url`."""
        payload = {
            "model": model,
            "messages": [{"role": "user", "content": "test"}],
            "max_tokens": 5,
        }
        target = url.rstrip("/") + "/v1/chat/completions"
        # Another host: TabbyAPI's admin key must never travel there.
        reply = self._fetch("POST", target, timeout, body=payload, auth=False, absolute=True)
        return self._choices_result(reply)

    # --- the model load -------------------------------------------------------------------------

    def load_model(
        self,
        name: str,
        *,
        timeout: float,
        on_progress: Callable[[int, int], None],
        cancel: threading.Event,
    ) -> LoadOutcome:
        """POST /v1/model/load and follow its event stream to the end.

        Ends on: an error event (sent with HTTP 200), a clean end of the stream (confirmed with
        /v1/model, which gets its own health_timeout), `timeout` seconds, or `cancel`. Refuses
        at once while another load by this client is in flight.
        """
        if not self._load_lock.acquire(blocking=False):
            return LoadOutcome(False, "a load is already in flight; not starting a second one")
        try:
            return self._load(name, timeout, on_progress, cancel)
        except Exception as exc:  # a bug here must still end as an outcome, not a crash
            return LoadOutcome(False, f"load of {name} failed: {self._describe(exc)}")
        finally:
            self._load_lock.release()

    def _load(
        self,
        name: str,
        timeout: float,
        on_progress: Callable[[int, int], None],
        cancel: threading.Event,
    ) -> LoadOutcome:
        progress = _LoadProgress(on_progress)
        started = time.monotonic()
        authorized = self._authorized("/v1/model/load", started)
        if isinstance(authorized, HttpResult):
            return LoadOutcome(False, f"load not sent: {authorized.detail}")
        url, headers = authorized
        try:
            with (
                _budget(started + timeout, cancel),
                self._http.stream(
                    "POST",
                    url,
                    json={"model_name": name},
                    headers=headers,
                    timeout=httpx.Timeout(timeout),
                ) as resp,
            ):
                if resp.status_code != 200:
                    code = resp.status_code
                    kind = "unauthorized" if code in (401, 403) else ""
                    if not kind and 400 <= code < 500:
                        kind = "permanent"  # TabbyAPI refused this request as such
                    return LoadOutcome(False, self._load_refusal(resp, started), kind=kind)
                ctype = resp.headers.get("content-type", "")
                if not ctype.startswith("text/event-stream"):
                    return LoadOutcome(
                        False, f"load answered 200 with {self._scrub(ctype)!r}, not an event stream"
                    )
                if encoding := _encoding(resp):
                    why = f"event stream malformed: compressed ({self._scrub(encoding)})"
                    return LoadOutcome(False, why)
                parser = SseParser()
                for chunk in resp.iter_raw():
                    for data in parser.feed(chunk):
                        error = progress.event(data)
                        if error is not None:
                            return progress.failed(self._scrub(error) or "load failed")
                    if cancel.is_set():
                        raise _LoadCancelledError
                for data in parser.end():
                    error = progress.event(data)
                    if error is not None:
                        return progress.failed(self._scrub(error) or "load failed")
        except StreamMalformedError as exc:  # the `with` has closed the connection
            return progress.outcome(False, f"event stream malformed: {exc}")
        except _LoadCancelledError:
            return progress.outcome(False, "cancelled; the connection was closed")
        except httpx.TimeoutException:
            if cancel.is_set():
                return progress.outcome(False, "cancelled; the connection was closed")
            return progress.outcome(False, f"no result within the load timeout ({timeout:g} s)")
        except httpx.ConnectError as exc:
            return progress.outcome(False, f"refused: {self._describe(exc)}")
        except httpx.HTTPError as exc:
            return progress.outcome(False, f"the load stream broke: {self._describe(exc)}")
        # exl2-era builds answer an empty stream when the model is already loaded, so a clean
        # end proves nothing by itself: only /v1/model does.
        status = self._model(self.health_timeout)
        if status.loaded == name:
            return progress.outcome(True, "confirmed by /v1/model")
        seen = status.loaded or ("no model" if status.known else status.result.outcome.value)
        return progress.outcome(
            False, f"the stream ended without an error, but /v1/model reports {seen}"
        )

    def _load_refusal(self, resp: httpx.Response, started: float) -> str:
        body = bytearray()
        try:
            # A compressed body is not read: the status alone still says why.
            for chunk in () if _encoding(resp) else resp.iter_raw():
                body += chunk
                if len(body) > JSON_LIMIT:
                    del body[JSON_LIMIT:]
                    break
        except httpx.HTTPError:
            pass  # the status alone still says why
        reply = _Reply(
            time.monotonic() - started,
            resp.status_code,
            resp.headers.get("content-type", ""),
            bytes(body),
        )
        result = self._status_result(reply)
        return f"load refused: {result.detail}"

    # --- plumbing -------------------------------------------------------------------------------

    def _authorized(self, path: str, started: float) -> tuple[str, dict[str, str]] | HttpResult:
        """(URL pinned to the verified address, auth headers), or why nothing may be sent: a
        request to TabbyAPI's API goes out only once its listener is verified as TabbyAPI
        (identity.ListenerGate), key or no key: a squatter gets neither the key nor a say."""
        try:
            check = self._gate()
        except Exception as exc:  # a bug in the gate must withhold, never send
            check = ListenerCheck(False, f"listener check failed ({self._describe(exc)})")
        if not check.ok:
            outcome = Outcome.REFUSED if check.refused else Outcome.WITHHELD
            latency = time.monotonic() - started
            return HttpResult(outcome, latency, None, self._scrub(check.detail))
        try:
            base = str(httpx.URL(self.base_url).copy_with(host=check.address)).rstrip("/")
        except (httpx.InvalidURL, TypeError, ValueError):
            base = self.base_url  # unusable anyway: the request reports the URL's fault
        headers = {"Authorization": f"Bearer {self.__key}"} if self.__key else {}
        return base + path, headers

    def _redact(self, text: str) -> str:
        return text.replace(self.__key, "***") if self.__key else text

    def _scrub(self, text: str) -> str:
        """Text from the server or the network made fit for a detail: the key replaced first
        (a cut made before could leave a piece of it), control characters escaped, then cut."""
        text = printable(self._redact(text))
        return text if len(text) <= _DETAIL_MAX else text[: _DETAIL_MAX - 3] + "..."

    def _describe(self, exc: BaseException) -> str:
        text = str(exc)
        return self._scrub(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)

    def _fetch(
        self,
        method: str,
        path: str,
        budget: float,
        *,
        body: object = None,
        auth: bool = True,
        absolute: bool = False,
    ) -> _Reply:
        """One request within `budget` seconds in total, the body read up to JSON_LIMIT bytes."""
        started = time.monotonic()
        deadline = started + budget
        url = path if absolute else self.base_url + path
        try:
            shown = redact_url(url)
        except ValueError:  # e.g. an unclosed "[" of an IPv6 host: httpx will say more
            shown = "the configured URL"
        headers: dict[str, str] = {}
        if auth:
            authorized = self._authorized(path, started)
            if isinstance(authorized, HttpResult):
                return _Reply(authorized.latency_s, failure=authorized)
            url, headers = authorized
        with _budget(deadline):
            return self._exchange(method, url, shown, headers, body, started, budget)

    def _exchange(
        self,
        method: str,
        url: str,
        shown: str,
        headers: dict[str, str],
        body: object,
        started: float,
        budget: float,
    ) -> _Reply:
        deadline = started + budget
        got_headers = False
        try:
            with self._http.stream(
                method, url, json=body, headers=headers, timeout=httpx.Timeout(budget)
            ) as resp:
                got_headers = True
                if encoding := _encoding(resp):
                    why = f"{shown}: compressed answer ({encoding}), which was not asked for"
                    return self._failed(started, Outcome.BAD_BODY, why, resp)
                data = bytearray()
                for chunk in resp.iter_raw():
                    data += chunk
                    if len(data) > JSON_LIMIT:
                        return self._failed(started, Outcome.BAD_BODY, "body over 1 MiB", resp)
                    if time.monotonic() > deadline:
                        raise httpx.ReadTimeout("the total deadline passed")
                return _Reply(
                    time.monotonic() - started,
                    resp.status_code,
                    resp.headers.get("content-type", ""),
                    bytes(data),
                )
        except httpx.TimeoutException:
            why = f"no complete answer from {shown} within {budget:g} s"
            return self._failed(started, Outcome.TIMEOUT, why)
        except httpx.ConnectError as exc:
            return self._local(started, shown, exc) or self._failed(
                started, Outcome.REFUSED, f"{shown}: {self._describe(exc)}"
            )
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
            # Never sent: closest to "could not reach"; the detail says it is the URL's fault.
            why = f"{shown} is not a usable http(s) URL ({self._describe(exc)})"
            return self._failed(started, Outcome.REFUSED, why)
        except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError) as exc:
            local = self._local(started, shown, exc)
            if local is not None:
                return local
            if not got_headers and _BUDGET.received == 0:
                why = f"{shown}: connection closed before an answer ({self._describe(exc)})"
                return self._failed(started, Outcome.REFUSED, why)
            why = f"{shown}: broken answer ({self._describe(exc)})"
            return self._failed(started, Outcome.BAD_BODY, why)
        except Exception as exc:  # e.g. a bad Content-Encoding: still only a bad answer
            why = f"{shown}: unusable answer ({self._describe(exc)})"
            return self._local(started, shown, exc) or self._failed(started, Outcome.BAD_BODY, why)

    def _local(self, started: float, shown: str, exc: BaseException) -> _Reply | None:
        """LOCAL_ERROR when the exception is our own lack of descriptors or memory: TabbyAPI was
        never asked, so it must not read as refused (that would count toward a restart)."""
        why = local_failure(exc)
        if not why:
            return None
        return self._failed(started, Outcome.LOCAL_ERROR, f"{shown} not probed: {why}")

    def _failed(
        self, started: float, outcome: Outcome, detail: str, resp: httpx.Response | None = None
    ) -> _Reply:
        status = None if resp is None else resp.status_code
        result = HttpResult(outcome, time.monotonic() - started, status, self._scrub(detail))
        return _Reply(result.latency_s, failure=result)

    def _status_result(self, reply: _Reply) -> HttpResult:
        """An unexpected status: UNAUTHORIZED for 401/403, HTTP_ERROR otherwise."""
        detail = f"HTTP {reply.status}"
        said = _error_detail(reply, self._redact)
        if said:
            detail += f": {said}"
        if reply.status in (401, 403):
            if self.key_problem:
                detail += f" ({self.key_problem})"
            elif not self.__key:
                detail += " (no admin key configured: set tabbyapi.admin_key_file)"
            elif self.key_source:
                detail += f" (the admin key read from {self.key_source} was rejected)"
            return _result(reply, Outcome.UNAUTHORIZED, self._scrub(detail))
        return _result(reply, Outcome.HTTP_ERROR, self._scrub(detail))

    def _choices_result(self, reply: _Reply) -> HttpResult:
        if reply.failure is not None:
            return reply.failure
        if reply.status != 200:
            return self._status_result(reply)
        body, why = _json_object(reply)
        if body is None:
            return _result(reply, Outcome.BAD_BODY, why)
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices:
            return _result(reply, Outcome.BAD_BODY, "200 without a non-empty 'choices' list")
        return _result(reply, Outcome.OK)


class _LoadProgress:
    """Folds the load's events: progress goes to the callback, the first error ends the load."""

    def __init__(self, on_progress: Callable[[int, int], None]) -> None:
        self._on_progress = on_progress
        self.done = 0
        self.total = 0
        self.ignored = 0  # events that were neither progress nor error
        self.callback_errors = 0

    def event(self, data: str) -> str | None:
        """The error message when `data` is an error event, else None."""
        try:
            event = json.loads(data)
        except ValueError:
            self.ignored += 1
            return None
        if not isinstance(event, dict):
            self.ignored += 1
            return None
        if "error" in event:
            error = event["error"]
            message = error.get("message") if isinstance(error, dict) else error
            return message if isinstance(message, str) else json.dumps(message)
        module, modules = event.get("module"), event.get("modules")
        if not isinstance(module, int) or not isinstance(modules, int):
            self.ignored += 1
            return None
        if isinstance(module, bool) or isinstance(modules, bool):
            self.ignored += 1
            return None
        if event.get("model_type", "model") == "model":
            self.done, self.total = module, modules
        try:
            self._on_progress(module, modules)
        except Exception:  # the caller's bug must not drop the stream (that cancels the load)
            self.callback_errors += 1
        return None

    def outcome(self, ok: bool, detail: str, kind: str = "") -> LoadOutcome:
        if self.callback_errors:
            detail += f" (the progress callback failed {self.callback_errors} times)"
        return LoadOutcome(ok, detail, self.done, self.total, kind=kind)

    def failed(self, error: str) -> LoadOutcome:
        """TabbyAPI's own error event: permanent when its words say retrying cannot help."""
        lowered = error.lower()
        permanent = any(marker in lowered for marker in _PERMANENT_LOAD_ERRORS)
        return self.outcome(False, error, "permanent" if permanent else "")


# TabbyAPI's load errors that no retry of the same model can change (notes/tabbyapi.md):
# "Models quantized with 'exl2' require the exllamav2 backend, which is no longer supported",
# "Backend 'exllamav2' selected, but required dependencies are not installed", a folder without
# config.json or weights. OOM, "Insufficient VRAM" and disconnects are transient.
_PERMANENT_LOAD_ERRORS = (
    "no longer supported",
    "not installed",
    "could not find",
    "no such file",
    "does not exist",
    "config.json",
)


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


def _result(reply: _Reply, outcome: Outcome, detail: str = "") -> HttpResult:
    return HttpResult(outcome, reply.latency_s, reply.status, detail)


def _json_object(reply: _Reply) -> tuple[dict[str, Any] | None, str]:
    """The body as a JSON object, or (None, why not)."""
    ctype = reply.content_type.split(";")[0].strip().lower()
    if ctype != "application/json" and not ctype.endswith("+json"):
        return None, f"HTTP {reply.status} with content type {ctype or 'none'!r}, not JSON"
    try:
        body = json.loads(reply.body)
    except ValueError:
        return None, f"HTTP {reply.status} with malformed JSON ({len(reply.body)} bytes)"
    if not isinstance(body, dict):
        return None, f"HTTP {reply.status} with JSON {type(body).__name__}, not an object"
    return body, ""


def _encoding(resp: httpx.Response) -> str:
    """The answer's content coding when it is not plain bytes ("" for identity)."""
    coding = resp.headers.get("content-encoding", "").strip().lower()
    return "" if coding in ("", "identity") else coding


def _error_detail(reply: _Reply, redact: Callable[[str], str]) -> str:
    """FastAPI's {"detail": ...} in words, or a short excerpt of a plain-text body.

    The excerpt is cut from the redacted body: a body that echoes the key must not leave the
    part of it before the cut."""
    body, _ = _json_object(reply)
    if body is None:
        text = " ".join(redact(reply.body.decode("utf-8", "replace")).split())
        return text if len(text) <= _EXCERPT_MAX else text[: _EXCERPT_MAX - 3] + "..."
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


def _issue_descriptions(issues: object) -> tuple[str, ...] | None:
    if issues is None:
        return ()
    if not isinstance(issues, list):
        return None
    out = []
    for issue in issues:
        text = issue.get("description") if isinstance(issue, dict) else issue
        out.append(text if isinstance(text, str) else json.dumps(text))
    return tuple(out)
