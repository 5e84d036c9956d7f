"""TabbyAPI over HTTP: kept-alive connections, a hard total deadline per request, typed outcomes.

An adapter (interfaces.TabbyApi). The deadline transport lives in adapters/http_deadline.py: one
pool for every request to TabbyAPI, /health included, whose every new connection is vetted before
a byte goes over it (TabbyClient._vet: the port's listener and the connection's far end must be
the verified TabbyAPI's). A request goes to the pool directly; a model load streams through an
httpx client on it. The bounded event-stream parser of a model load in adapters/sse.py; the
LiteLLM fallback route, which is another host, has its own adapter (adapters/fallback_route.py).

Nothing here raises for anything the server or the network does: every method returns a typed
outcome (observation.Outcome) with the measured latency. The admin key goes out only in the
Authorization header of requests to TabbyAPI, and only after the listener on its port was
verified as TabbyAPI (adapters/identity.py). /health carries no key, but what it reads decides
restarts: it too goes only over connections vetted as TabbyAPI's, so a local user who binds the
port while TabbyAPI is down gets nothing, not even a say (WITHHELD: no evidence either way, see
TabbyClient.health). Every detail string is scrubbed of the key
(before it is cut to length, so no piece of the key survives a cut) and has its control
characters escaped.

Every read is bounded: a plain answer by JSON_LIMIT, a load's event stream by the SSE_* bounds
(adapters/sse.py).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from hydra_watchdog.adapters.admin_key import AdminKeySource, key_for_process
from hydra_watchdog.adapters.admin_key import read_admin_key as read_admin_key  # noqa: PLC0414
from hydra_watchdog.adapters.http_deadline import (
    JSON_LIMIT,
    DeadlineTransport,
    ListenerChangedError,
    LoadCancelledError,
    Reply,
    choices_result,
    content_encoding,
    deadline_scope,
    describe,
    error_detail,
    exchange,
    failed,
    json_object,
    new_client,
    result,
)
from hydra_watchdog.adapters.identity import ListenerCheck, ListenerGate, far_end_uid
from hydra_watchdog.adapters.sse import SseParser, StreamMalformedError
from hydra_watchdog.config import Config, redact_url
from hydra_watchdog.interfaces import LoadOutcome
from hydra_watchdog.observation import (
    Canary,
    Health,
    HttpResult,
    KeyView,
    ModelStatus,
    Outcome,
    UnitStatus,
)
from hydra_watchdog.printable import one_line, printable

_DETAIL_MAX = 300
_NO_MODEL = "No models"  # TabbyAPI: "No models are currently loaded."
# A request the gate let go: its URL pinned to the verified address, its headers, and the vet
# for a connection made for it (TabbyClient._vet).
_Authorized = tuple[str, dict[str, str], Callable[[socket.socket], str]]


@dataclass(frozen=True)
class ModelList:
    """GET /v1/model/list: every model folder with the admin key, only the loaded one without."""

    result: HttpResult
    models: tuple[str, ...] = ()


def listener_gate(cfg: Config) -> ListenerGate:
    """The gate that verifies the listener behind tabbyapi.url as TabbyAPI's (identity.py)."""
    return ListenerGate.from_config(cfg)


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
        keys: AdminKeySource | None = None,
        command: bool = False,
    ) -> None:
        """`gate` is asked right before every request that would carry the key (and its URL is
        pinned to the address it verified), and again for each new connection such a request
        opens; `on_unit` receives each cycle's unit status, which the gate judges listeners by.

        The key: `keys` (read again whenever its file changes), else `admin_key` as given.
        `command`: a command from a shell (`check`, `verify`), not the daemon: a 401 to it while
        it holds no key says nothing about TabbyAPI (the daemon's key may be one this user
        cannot read), so it is LOCAL_ERROR with how to pass the key, never a rejected key."""
        self.base_url = base_url.rstrip("/")
        self._gate = gate
        self._on_unit = on_unit
        self.health_timeout = health_timeout
        self.request_timeout = request_timeout
        self._keys = keys or AdminKeySource.fixed(admin_key or None, key_problem, key_source)
        self._command = command
        self._load_lock = threading.Lock()
        self._pins: dict[str, str] = {}  # verified address -> base URL pinned to it
        # Where TabbyAPI was last verified (the gate's address): /health goes there. None: the
        # gate is asked first.
        self._verified_at: str | None = None
        # One pool for every request: the gate vets each connection once it is made, so a
        # kept-alive one only ever reaches the verified TabbyAPI's socket.
        self._pool = DeadlineTransport(vetted=True)
        self._http = new_client(self._pool)  # a load's event stream

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        *,
        admin_key: tuple[str | None, str] | None = None,
        command: bool = False,
    ) -> TabbyClient:
        """`admin_key`: (key, problem) read elsewhere (the load helper's inherited descriptor);
        by default the configured file or credential, read again whenever it changes
        (adapters/admin_key.py). `command`: a command from a shell (see __init__), which also
        looks for the watchdog unit's credential."""
        t = cfg.tabbyapi
        if admin_key is None:
            keys = key_for_process(t.admin_key_file, os.environ, discover=command)
        else:
            keys = AdminKeySource.fixed(*admin_key)
        gate = listener_gate(cfg)
        return cls(
            t.url,
            admin_key=None,
            health_timeout=t.health_timeout,
            gate=gate.check,
            on_unit=gate.set_unit,
            keys=keys,
            command=command,
        )

    def note_unit(self, unit: UnitStatus) -> None:
        if self._on_unit is not None:
            self._on_unit(unit)

    def admin_key(self) -> KeyView:
        """The key held now (read again if its file changed), for the observation."""
        return self._keys.current()[1]

    @property
    def key_problem(self) -> str:
        return self._keys.current()[1].problem

    @property
    def key_source(self) -> str:
        return self._keys.current()[1].source

    def __repr__(self) -> str:
        key = "set" if self._keys.current()[0] else "unset"
        return f"TabbyClient({self.base_url!r}, admin_key=<{key}>)"

    def close(self) -> None:
        self._http.close()  # and the pool under it

    # --- probes ---------------------------------------------------------------------------------

    def health(self) -> Health:
        """GET /health, evidence only from the verified TabbyAPI (see _health_reply): WITHHELD
        when the port's listener, or a new connection's far end, is not TabbyAPI's."""
        reply = self._health_reply()
        if reply.failure is not None:
            return Health(reply.failure, healthy=False)
        if reply.status not in (200, 503):
            return Health(self._status_result(reply), healthy=False)
        body, why = json_object(reply)
        if body is None:
            return Health(result(reply, Outcome.BAD_BODY, why), healthy=False)
        state = body.get("status")
        if reply.status == 200 and state == "healthy":
            return Health(result(reply, Outcome.OK), healthy=True)
        if reply.status == 503 and state == "unhealthy":
            issues = _issue_descriptions(body.get("issues"))
            if issues is None:
                why = "503 'unhealthy' whose 'issues' is not a list of issues"
                return Health(result(reply, Outcome.BAD_BODY, why), healthy=False)
            detail = "unhealthy (sticky until restart): " + ("; ".join(issues) or "no issue text")
            issue_text = tuple(self._scrub(i) for i in issues)
            return Health(
                result(reply, Outcome.HTTP_ERROR, self._scrub(detail)),
                healthy=False,
                unhealthy_issues=issue_text,
            )
        why = f"HTTP {reply.status} with status {self._scrub(repr(state))}"
        return Health(result(reply, Outcome.BAD_BODY, why), healthy=False)

    def model(self) -> ModelStatus:
        return self._model(self.health_timeout)

    def _model(self, budget: float) -> ModelStatus:
        reply = self._fetch("GET", "/v1/model", budget)
        if reply.failure is not None:
            return ModelStatus(reply.failure, loaded=None, known=False)
        if reply.status in (200, 400, 503):
            body, why = json_object(reply)
            if body is None:
                return ModelStatus(result(reply, Outcome.BAD_BODY, why), None, known=False)
            if reply.status == 200:
                ident = body.get("id")
                if isinstance(ident, str) and ident:
                    return ModelStatus(result(reply, Outcome.OK), loaded=ident, known=True)
                why = "200 without a model 'id'"
                return ModelStatus(result(reply, Outcome.BAD_BODY, why), None, known=False)
            detail = body.get("detail")
            # 503 is the newer builds' "no model"; builds before 2025-04 answer 400.
            if isinstance(detail, str) and (reply.status == 503 or _NO_MODEL in detail):
                no_model = result(reply, Outcome.OK, self._scrub(detail))
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
            return result(reply, Outcome.OK)
        return self._status_result(reply)

    def list_models(self) -> ModelList:
        reply = self._fetch("GET", "/v1/model/list", self.request_timeout)
        if reply.failure is not None:
            return ModelList(reply.failure)
        if reply.status != 200:
            return ModelList(self._status_result(reply))
        body, why = json_object(reply)
        data = None if body is None else body.get("data")
        if body is None or not isinstance(data, list):
            return ModelList(result(reply, Outcome.BAD_BODY, why or "no 'data' list"))
        ids = [item.get("id") for item in data if isinstance(item, dict)]
        if len(ids) != len(data) or not all(isinstance(i, str) for i in ids):
            return ModelList(result(reply, Outcome.BAD_BODY, "a 'data' entry without an 'id'"))
        return ModelList(result(reply, Outcome.OK), tuple(str(i) for i in ids))

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
        url, headers, vet = authorized
        try:
            with (
                deadline_scope(started + timeout, cancel, vet),
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
                if encoding := content_encoding(resp):
                    why = f"event stream malformed: compressed ({self._scrub(encoding)})"
                    return LoadOutcome(False, why)
                parser = SseParser()
                for chunk in resp.iter_raw():
                    for data in parser.feed(chunk):
                        error = progress.event(data)
                        if error is not None:
                            return progress.failed(self._scrub(error) or "load failed")
                    if cancel.is_set():
                        raise LoadCancelledError
                for data in parser.end():
                    error = progress.event(data)
                    if error is not None:
                        return progress.failed(self._scrub(error) or "load failed")
        except ListenerChangedError as exc:  # connected, nothing sent
            return LoadOutcome(False, f"load not sent: {self._scrub(str(exc))}")
        except StreamMalformedError as exc:  # the `with` has closed the connection
            return progress.outcome(False, f"event stream malformed: {exc}")
        except LoadCancelledError:
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
            for chunk in () if content_encoding(resp) else resp.iter_raw():
                body += chunk
                if len(body) > JSON_LIMIT:
                    del body[JSON_LIMIT:]
                    break
        except httpx.HTTPError:
            pass  # the status alone still says why
        reply = Reply(
            time.monotonic() - started,
            resp.status_code,
            resp.headers.get("content-type", ""),
            bytes(body),
        )
        return f"load refused: {self._status_result(reply).detail}"

    # --- plumbing -------------------------------------------------------------------------------

    def _check(self) -> ListenerCheck:
        """The gate's verdict now (a gate that fails is a refusal, never a pass); an address
        verified is where /health goes from now on."""
        try:
            check = self._gate()
        except Exception as exc:  # a bug in the gate must withhold, never send
            return ListenerCheck(False, f"listener check failed ({self._describe(exc)})")
        if check.ok:
            self._verified_at = check.address
        return check

    def _authorized(self, path: str, started: float) -> _Authorized | HttpResult:
        """(URL pinned to the verified address, auth headers, the vet for a new connection), or
        why nothing may be sent: a request to TabbyAPI's API goes out only once its listener is
        verified as TabbyAPI (identity.ListenerGate), key or no key: a squatter gets neither the
        key nor a say."""
        check = self._check()
        if not check.ok:
            outcome = Outcome.REFUSED if check.refused else Outcome.WITHHELD
            then = "not sent" if check.refused else "admin key withheld"
            latency = time.monotonic() - started
            return HttpResult(outcome, latency, None, self._scrub(f"{check.detail}; {then}"))
        key = self._keys.current()[0]
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return self._pinned(check.address) + path, headers, self._vet(check, keyed=True)

    def _health_reply(self) -> Reply:
        """GET /health within health_timeout, over a connection vetted as TabbyAPI's.

        The gate is not asked for every probe: a kept-alive connection was vetted when it was
        made, and its far end is the verified TabbyAPI's socket whoever listens on the port now;
        a new one is vetted before the request goes (the gate, and its far end). It goes to the
        address TabbyAPI was last verified at (the gate is asked first while there is none).
        A failure to connect is then put to the gate: refused or unanswered where nothing else
        listens is TabbyAPI's failure (the kernel's word, no impostor involved), and a
        TabbyAPI found listening (again, or at `localhost`'s other address) is asked once more;
        where another listener holds the port, WITHHELD: its say is no evidence either way."""
        started = time.monotonic()
        shown = self._shown("/health")
        address = self._verified_at
        if address is None:
            first = self._check()
            if not first.ok and not (first.refused and first.address):
                return self._not_sent(shown, first, started)
            address = first.address
        reply = self._health_at(address, shown, started)
        if reply.failure is None or not reply.unconnected:
            return reply
        check = self._check()
        if not check.ok and not check.refused:
            return self._not_sent(shown, check, started)
        if check.ok and (check.address != address or reply.failure.outcome is Outcome.REFUSED):
            return self._health_at(check.address, shown, started)
        return reply

    def _health_at(self, address: str, shown: str, started: float) -> Reply:
        return exchange(
            self._pool,
            "GET",
            self._pinned(address) + "/health",
            shown=shown,
            headers={},
            body=None,
            started=started,
            budget=self.health_timeout,
            scrub=self._scrub,
            vet=self._vet(None, keyed=False),
        )

    def _not_sent(self, shown: str, check: ListenerCheck, started: float) -> Reply:
        """The gate's refusal as a /health failure: REFUSED where nothing listens, else
        WITHHELD (the port's listener is not verified as TabbyAPI)."""
        outcome = Outcome.REFUSED if check.refused else Outcome.WITHHELD
        return failed(started, outcome, f"{shown} not sent: {check.detail}", self._scrub)

    def _pinned(self, address: str) -> str:
        """The base URL with its host replaced by the verified address (kept per address)."""
        pinned = self._pins.get(address)
        if pinned is None:
            try:
                pinned = str(httpx.URL(self.base_url).copy_with(host=address)).rstrip("/")
            except (httpx.InvalidURL, TypeError, ValueError):
                pinned = self.base_url  # unusable anyway: the request reports the URL's fault
            self._pins[address] = pinned
        return pinned

    def _vet(
        self, verified: ListenerCheck | None, *, keyed: bool
    ) -> Callable[[socket.socket], str]:
        """The check of a connection just made, before a byte goes over it: the gate again,
        which must verify the very address the connection went to (and, for a request that
        `verified` let go, the very same listening sockets), and the far end of this connection,
        which the kernel made from a listener and gave that listener's uid, must have the uid
        of the sockets verified. Anything else (another listener, a far end of another user,
        one that cannot be seen, a failed check) keeps the request, and the key, from that
        connection."""

        def vet(conn: socket.socket) -> str:
            why = self._not_tabbyapi(verified, conn)
            return f"{why}; admin key withheld" if why and keyed else why

        return vet

    def _not_tabbyapi(self, verified: ListenerCheck | None, conn: socket.socket) -> str:
        """Why `conn` is not a connection to the verified TabbyAPI ("" when it is)."""
        again = self._check()
        if again.refused:  # connected, yet nothing listens: its taker has let go of the port
            far = far_end_uid(conn)
            taker = "cannot be seen" if far is None else f"belongs to uid {far}"
            return f"{again.detail} now; the far end of the new connection {taker}"
        if not again.ok:
            return again.detail or "listener check refused"
        try:
            peer = str(conn.getpeername()[0]).removeprefix("::ffff:")
        except OSError:
            peer = ""
        changed = verified is not None and (
            # as sets: the same sockets, whatever order the kernel lists them in
            again.address != verified.address or set(again.sockets) != set(verified.sockets)
        )
        if changed or peer != again.address:
            return "the port's listener changed while connecting"
        uids = {s.uid for s in again.sockets}
        far = far_end_uid(conn)
        if far is None or far not in uids:
            seen = "cannot be seen" if far is None else f"belongs to uid {far}"
            return f"the far end of the new connection {seen}, not {sorted(uids)}"
        return ""

    def _redact(self, text: str) -> str:
        for key in self._keys.seen():  # the key sent, and those held before it
            text = text.replace(key, "***")
        return text

    def _scrub(self, text: str) -> str:
        """Text from the server or the network made fit for a detail: the key replaced first
        (a cut made before could leave a piece of it), control characters escaped, then cut."""
        return one_line(self._redact(text), _DETAIL_MAX)

    def _describe(self, exc: BaseException) -> str:
        return describe(exc, self._scrub)

    def _shown(self, path: str) -> str:
        """The URL as a detail may name it (credentials redacted)."""
        try:
            return redact_url(self.base_url + path)
        except ValueError:  # e.g. an unclosed "[" of an IPv6 host: the request will say more
            return "the configured URL"

    def _fetch(self, method: str, path: str, budget: float, *, body: object = None) -> Reply:
        """One request to TabbyAPI's API within `budget` seconds in total, the body read up to
        JSON_LIMIT bytes; sent only once the gate let it go (_authorized)."""
        started = time.monotonic()
        authorized = self._authorized(path, started)
        if isinstance(authorized, HttpResult):
            return Reply(authorized.latency_s, failure=authorized)
        url, headers, vet = authorized
        return exchange(
            self._pool,
            method,
            url,
            shown=self._shown(path),
            headers=headers,
            body=body,
            started=started,
            budget=budget,
            scrub=self._scrub,
            vet=vet,
        )

    def _status_result(self, reply: Reply) -> HttpResult:
        """An unexpected status: UNAUTHORIZED for 401/403, HTTP_ERROR otherwise."""
        detail = f"HTTP {reply.status}"
        said = error_detail(reply, self._redact)
        if said:
            detail += f": {said}"
        if reply.status in (401, 403):
            key, view = self._keys.current()
            if not key and self._command:
                # This command's own lack, not TabbyAPI's verdict on the daemon's key.
                how = self._keys.location.hint or "run this command as root, as the daemon runs"
                why = f"{view.problem}: {how}" if view.problem else how
                # the server's words are cut, never how to pass the key (ours, said whole)
                said = f"{self._scrub(detail)}; not checked: {printable(why)}"
                return result(reply, Outcome.LOCAL_ERROR, said)
            if view.problem:
                detail += f" ({view.problem})"
            elif not key:
                detail += f" ({self._keys.location.hint or 'no admin key configured'})"
            elif view.source:
                detail += f" (the admin key read from {view.source} was rejected)"
            return result(reply, Outcome.UNAUTHORIZED, self._scrub(detail))
        return result(reply, Outcome.HTTP_ERROR, self._scrub(detail))

    def _choices_result(self, reply: Reply) -> HttpResult:
        return choices_result(reply, self._status_result)


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
        except (ValueError, RecursionError):  # garbage, or nested deeper than json recurses
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


def _issue_descriptions(issues: object) -> tuple[str, ...] | None:
    """The issues' words; None when `issues` is not a list of them (one nested too deeply for
    json to write again included)."""
    if issues is None:
        return ()
    if not isinstance(issues, list):
        return None
    out = []
    for issue in issues:
        text = issue.get("description") if isinstance(issue, dict) else issue
        try:
            out.append(text if isinstance(text, str) else json.dumps(text))
        except (ValueError, RecursionError):
            return None
    return tuple(out)
