"""A TabbyAPI stand-in: a real HTTP server with TabbyAPI's endpoints, bodies and failure modes.

Run it as `python -m hydra_watchdog.sim.tabby_server --port 5000 --models-dir DIR ...`. It speaks
the API of ../shared/notes/tabbyapi.md in two flavours: `exl2` (the builds hydra-ai runs: 400 for
"no model", an empty load stream when the model is already loaded, no pings, a load cancelled
when its client disconnects, no global load lock, so a second concurrent load OOMs) and `modern`
(503 for "no model", a 1/1 processing+finished pair, `: ping` comments, a global load lock).

Faults are switched while it runs through a JSON control file (see `Faults`), re-read on every
request and by a watcher thread for the process-level ones (exit, refuse). Startup mirrors
TabbyAPI: `--startup-model` loads before the port opens (exit 1 when that fails), a busy port
moves it to port+1 with only a warning, and when both are busy it exits 0.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import select
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

GIB = 1 << 30
NO_MODEL = "No models are currently loaded."
NO_MODEL_LOGGED = "ERROR:    Sent to request: "  # how TabbyAPI's log line starts
NO_MODEL_PATH = "Could not find the model path for load. Check model name or config.yml?"
NO_MODEL_NAME = "A model name was not provided for load."
_TICK = 0.05  # seconds: how often long waits look at faults and the client


@dataclass(frozen=True)
class Faults:
    """The control file's keys. Each is read on every request, so a test flips them live."""

    exit_code: int | None = None  # the process exits with this code
    exit_error: str = ""  # ... after a traceback ending in this line (e.g. "RuntimeError: ...")
    refuse: bool = False  # the listening socket is closed: connections are refused
    hang: bool = False  # requests are accepted but never answered
    slow_seconds: float = 0.0  # every answer is delayed this long
    trickle_bytes_per_s: float = 0.0  # answers are dribbled at this rate (0: at once)
    sticky_503: bool = False  # a fatal generation error: /health 503 until the process restarts
    load_error: str = ""  # loads fail half-way with this error event (e.g. OOM text)
    generation_hang: bool = False  # completions never return; /health stays 200
    unload_error: bool = False  # unload answers 500 and leaves the model loaded
    load_seconds: float | None = None  # overrides --load-seconds
    modules: int | None = None  # overrides --modules
    ping_seconds: float | None = None  # modern flavour's ping period (TabbyAPI: 15 s)
    load_stream: str = ""  # a hostile load stream (a key of LOAD_STREAMS) until the client leaves
    echo_auth_at: int | None = None  # every answer: a plain-text 500 whose character N starts
    # the bearer token the request sent (puts the key where a client cuts its error excerpt)
    only_pid: int | None = None  # the faults hold for this process only (a fault like #428 is
    # the process's: the one a restart brings up is fine, however late the file is cleared)


_FAULT_TYPES: dict[str, tuple[type, ...]] = {
    "exit_code": (int,),
    "exit_error": (str,),
    "only_pid": (int,),
    "refuse": (bool,),
    "hang": (bool,),
    "slow_seconds": (int, float),
    "trickle_bytes_per_s": (int, float),
    "sticky_503": (bool,),
    "load_error": (str,),
    "generation_hang": (bool,),
    "unload_error": (bool,),
    "load_seconds": (int, float),
    "modules": (int,),
    "ping_seconds": (int, float),
    "load_stream": (str,),
    "echo_auth_at": (int,),
}

# Load streams no TabbyAPI sends, each endless: the bytes sent once, then the bytes repeated.
LOAD_STREAMS: dict[str, tuple[bytes, bytes]] = {
    # data lines that never end their event with a blank line (issue 10: 1.6 GB in 10 s)
    "endless_data": (b"", b"data: " + b"x" * 1000 + b"\n"),
    # one data line that never ends
    "giant_line": (b"data: ", b"x" * 4096),
    # tiny complete events, millions of them
    "tiny_events": (b"", b"data: {}\n\n"),
    # events each within the line and event bounds (3 lines of 60 KB), but without end in total
    "big_events": (b"", (b"data: " + b"y" * 60_000 + b"\n") * 3 + b"\n"),
}


def parse_faults(data: object) -> tuple[Faults, tuple[str, ...]]:
    """Faults from the control file's JSON, and a warning per key that was ignored."""
    if not isinstance(data, dict):
        return Faults(), ("the control file is not a JSON object",)
    defaults = Faults()
    values: dict[str, Any] = {}
    warnings: list[str] = []
    for key, value in data.items():
        types = _FAULT_TYPES.get(key)
        if types is None:
            warnings.append(f"unknown fault {key!r} ignored")
            continue
        optional = getattr(defaults, key) is None
        right_type = isinstance(value, types) and (bool in types or not isinstance(value, bool))
        if key == "load_stream" and right_type and value and value not in LOAD_STREAMS:
            warnings.append(f"fault load_stream={value!r} is not one of {sorted(LOAD_STREAMS)}")
        elif right_type or (value is None and optional):
            values[key] = value
        else:
            warnings.append(f"fault {key!r}={value!r} has the wrong type; ignored")
    return Faults(**values), tuple(warnings)


def read_control(path: Path | None) -> Faults:
    """The faults in force: none when there is no control file or it is unreadable."""
    if path is None:
        return Faults()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return Faults()
    return parse_faults(data)[0]


def write_control(path: Path | str, **faults: Any) -> None:
    """Replace the control file atomically with `faults` (keys of `Faults`)."""
    unknown = set(faults) - set(_FAULT_TYPES)
    if unknown:
        raise TypeError(f"unknown faults: {', '.join(sorted(unknown))}")
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".control-")
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(faults, out)
    os.replace(tmp, target)


def read_tokens(path: Path) -> tuple[str | None, str | None]:
    """(api_key, admin_key) from an api_tokens.yml-like file of `key: value` lines."""
    keys: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        name, sep, value = line.partition(":")
        if sep:
            keys[name.strip()] = value.strip().strip("'\"")
    return keys.get("api_key") or None, keys.get("admin_key") or None


@dataclass(frozen=True)
class Options:
    host: str = "127.0.0.1"
    port: int = 5000
    models_dir: Path = Path("models")
    api_key: str | None = None
    admin_key: str | None = None  # both None: auth disabled, every request is admin
    flavor: str = "modern"
    control: Path | None = None
    request_log: Path | None = None
    startup_model: str = ""
    load_seconds: float = 1.0
    modules: int = 8
    nvml_state: Path | None = None
    port_file: Path | None = None

    @property
    def modern(self) -> bool:
        return self.flavor == "modern"


class LoadFailedError(Exception):
    """A startup load failed; main() exits 1 like TabbyAPI."""


# An item of a load: an SSE event, or None for "time passes" (lets the caller ping and look
# for a disconnected client).
LoadItem = dict[str, Any] | None


class Node:
    """The simulated TabbyAPI's state: the loaded model, sticky issues, faults, the request log."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.lock = threading.Lock()
        self.load_lock = threading.Lock()  # modern flavour's global load lock
        self.loaded: str | None = None
        self.loading = 0
        self.issues: list[dict[str, str]] = []
        self.created = int(time.time())
        # exl2 build: a completion sent while no model is loaded takes its load lock and never
        # gives it back; every completion after that hangs until the process restarts.
        self.lock_leaked = False
        self._log_lock = threading.Lock()

    def faults(self) -> Faults:
        faults = read_control(self.opts.control)
        if faults.only_pid is not None and faults.only_pid != os.getpid():
            return Faults()
        if faults.sticky_503:
            self.record_issue("RuntimeError: CUDA error: an illegal memory access was encountered")
        return faults

    def record_issue(self, description: str) -> None:
        with self.lock:
            if not self.issues:  # like TabbyAPI: recorded once, never cleared
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
                self.issues.append({"time": stamp, "description": description})

    def log(self, **fields: Any) -> None:
        if self.opts.request_log is None:
            return
        line = json.dumps(fields) + "\n"
        with self._log_lock, self.opts.request_log.open("a", encoding="utf-8") as out:
            out.write(line)

    def model_dir(self, name: str) -> Path:
        return self.opts.models_dir / name

    def vram_need(self, name: str) -> int:
        try:
            config = json.loads((self.model_dir(name) / "config.json").read_text("utf-8"))
            need = config.get("sim_vram_bytes", GIB)
            return int(need) if isinstance(need, int | float) else GIB
        except (OSError, ValueError, AttributeError):
            return GIB

    def quant_method(self, name: str) -> str:
        """The folder's config.json quantization_config.quant_method ("" unquantized)."""
        try:
            config = json.loads((self.model_dir(name) / "config.json").read_text("utf-8"))
            method = config.get("quantization_config", {}).get("quant_method", "")
            return method if isinstance(method, str) else ""
        except (OSError, ValueError, AttributeError):
            return ""

    def _nvml(self) -> Any:
        return importlib.import_module("hydra_watchdog.sim.nvml_state")

    def _auto_split(self, need: int) -> tuple[list[tuple[int, int]], int]:
        """ExLlamaV2's gpu_split_auto: fill the GPUs in index order. ([], total free) when the
        model does not fit on all of them together."""
        nvml = self._nvml()
        path = self.opts.nvml_state
        state = nvml.read_state(path)
        free = [(d.index, nvml.free_bytes(path, d.index)) for d in state.devices]
        total = sum(f for _, f in free)
        if total < need:
            return [], total
        split, left = [], need
        for gpu, avail in free:
            share = min(avail, left)
            if share > 0:
                split.append((gpu, share))
                left -= share
        return split, total

    def _release_vram(self) -> None:
        if self.opts.nvml_state is not None:
            self._nvml().remove_process(self.opts.nvml_state, os.getpid())

    def unload(self) -> None:
        with self.lock:
            was, self.loaded = self.loaded, None
        if was is not None:
            self._release_vram()

    def load(self, name: str, faults: Faults) -> Generator[LoadItem, None, None]:
        """The events of one load; closing the generator early cancels the load."""
        if self.opts.modern:
            while not self.load_lock.acquire(timeout=_TICK):
                yield None  # queued behind the load in flight
        with self.lock:
            concurrent = self.loading > 0
            self.loading += 1
        try:
            yield from self._load(name, faults, concurrent)
        finally:
            with self.lock:
                self.loading -= 1
            if self.opts.modern:
                self.load_lock.release()

    def _load(self, name: str, faults: Faults, concurrent: bool) -> Iterator[LoadItem]:
        if self.loaded == name:
            if self.opts.modern:
                yield _progress(1, 1, "processing")
                yield _progress(1, 1, "finished")
            return  # exl2-era builds send an empty stream
        self.unload()  # a swap: the old model goes first, even when the new one then fails
        folder = self.model_dir(name)
        if not (folder / "config.json").is_file():
            yield _error(f"No config.json found in model directory {folder}")
            return
        method = self.quant_method(name)
        if self.opts.modern and method in ("exl2", "gptq"):  # today's build: ExLlamaV3 only
            yield _error(
                f"Models quantized with '{method}' require the exllamav2 backend, which is no "
                "longer supported. Please use an exl3 or unquantized model."
            )
            return
        need = self.vram_need(name)
        split: list[tuple[int, int]] = []
        if self.opts.nvml_state is not None:
            split, free = self._auto_split(need)
            if not split:
                yield _error(_oom_text(need, free))
                return
        modules = max(1, faults.modules or self.opts.modules)
        seconds = self.opts.load_seconds if faults.load_seconds is None else faults.load_seconds
        step = max(0.0, seconds) / modules
        for module in range(1, modules + 1):
            yield from _wait(step)
            live = read_control(self.opts.control)
            if (live.load_error or faults.load_error) and module > modules // 2:
                yield _error(live.load_error or faults.load_error)
                return
            if concurrent and module > modules // 2:
                # No load lock in exl2-era builds: two loads at once run the card out of memory.
                yield _error(_oom_text(need, 0))
                return
            yield _progress(module, modules, "processing")
        for gpu, share in split:
            self._nvml().set_process(self.opts.nvml_state, gpu, os.getpid(), share)
        with self.lock:
            self.loaded = name
        yield _progress(modules, modules, "finished")


def _progress(module: int, modules: int, status: str) -> dict[str, Any]:
    return {"model_type": "model", "module": module, "modules": modules, "status": status}


def _error(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "trace": None}}


def _oom_text(need: int, free: int) -> str:
    return (
        f"CUDA out of memory. Tried to allocate {need / GIB:.2f} GiB. "
        f"The GPUs have {free / GIB:.2f} GiB free in total."
    )


def _exit(faults: Faults) -> None:
    """The process ends (exit_code), as a crash: a traceback first when exit_error says one."""
    if faults.exit_error:
        frames = (
            "Traceback (most recent call last):",
            '  File "/opt/tabbyapi/main.py", line 187, in <module>',
            "    entrypoint()",
            faults.exit_error,
        )
        print("\n".join(frames), file=sys.stderr, flush=True)
    os._exit(faults.exit_code if faults.exit_code is not None else 1)


def _wait(seconds: float) -> Iterator[None]:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(left, _TICK))
        yield None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "uvicorn"
    sys_version = ""
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request log (--request-log) replaces http.server's stderr lines

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    # --- dispatch -------------------------------------------------------------------------------

    def _handle(self, method: str) -> None:
        node = self.server.node
        self._faults = node.faults()
        self._status = 0
        self._result = ""
        self._model: str | None = node.loaded
        started = time.time()
        self._logged = False
        self._request = (started, method, self.path.split("?", 1)[0])
        body = self._read_body()
        faults = self._faults
        if faults.exit_code is not None:
            _exit(faults)
        if faults.refuse or faults.hang:
            # refuse: the watcher is about to close the port; hang: never answer.
            if faults.hang:
                self._wait_for_disconnect()
            self.close_connection = True
            return
        if faults.slow_seconds > 0:
            time.sleep(faults.slow_seconds)
        path = self._request[2]
        routes = {
            ("GET", "/health"): self._health,
            ("GET", "/v1/model"): self._model_card,
            ("GET", "/v1/model/list"): self._model_list,
            ("GET", "/v1/models"): self._model_list,
            ("POST", "/v1/model/load"): self._load,
            ("POST", "/v1/model/unload"): self._unload,
            ("POST", "/v1/completions"): self._completion,
            ("POST", "/v1/chat/completions"): self._chat_completion,
            ("GET", "/v1/auth/permission"): self._permission,
        }
        route = routes.get((method, path))
        if faults.echo_auth_at is not None:
            route = self._echo_auth
        try:
            if route is not None:
                route(body)
            elif any(p == path for _, p in routes):
                self._json(405, {"detail": "Method Not Allowed"})
            else:
                self._json(404, {"detail": "Not Found"})
        except OSError:
            self.close_connection = True  # the client went away mid-answer
            self._result = self._result or "client gone"
        self._log_request()

    def _log_request(self) -> None:
        """One line of the request log per answered request. A whole answer (_send) is logged
        before its bytes go out, so a client that read it finds its line; a stream's, once its
        outcome is known."""
        if self._logged or not self._status:
            return
        self._logged = True
        started, method, path = self._request
        self.server.node.log(
            time=started,
            method=method,
            path=path,
            status=self._status,
            model=self._model,
            result=self._result,
        )

    def _read_body(self) -> object:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        raw = self.rfile.read(length) if length > 0 else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return _BadJson()

    # --- auth -----------------------------------------------------------------------------------

    def _bearer(self) -> str | None:
        value = self.headers.get("Authorization", "")
        return value[7:].strip() if value.lower().startswith("bearer ") else None

    def _permission_of(self, header: str) -> str | None:
        """ "admin"/"api" for a good key, None for none given, "" for a bad one."""
        opts = self.server.node.opts
        if opts.api_key is None and opts.admin_key is None:
            return "admin"
        key = self.headers.get(header) or self._bearer()
        if key is None:
            return None
        if key == opts.admin_key:
            return "admin"
        return "api" if key == opts.api_key else ""

    def _api_ok(self) -> bool:
        permission = self._permission_of("x-api-key")
        if permission:
            return True
        msg = "Please provide an API key" if permission is None else "Invalid API key"
        self._json(401, {"detail": msg})
        return False

    def _admin_ok(self) -> bool:
        permission = self._permission_of("x-admin-key")
        if permission == "admin":
            return True
        msg = "Please provide an admin key" if permission is None else "Invalid admin key"
        self._json(401, {"detail": msg})
        return False

    # --- endpoints ------------------------------------------------------------------------------

    def _health(self, _body: object) -> None:
        node = self.server.node
        with node.lock:
            issues = list(node.issues)
        if issues:
            self._json(503, {"status": "unhealthy", "issues": issues})
        else:
            self._json(200, {"status": "healthy", "issues": []})

    def _no_model(self) -> None:
        # TabbyAPI logs every such answer at ERROR level: a probe each cycle while no model is
        # loaded is an ERROR line each cycle in the operator's log (notes/tabbyapi.md).
        print(f"{NO_MODEL_LOGGED}{NO_MODEL}", flush=True)
        self._json(503 if self.server.node.opts.modern else 400, {"detail": NO_MODEL})

    def _model_card(self, _body: object) -> None:
        if not self._api_ok():
            return
        node = self.server.node
        if node.loaded is None:
            self._no_model()
            return
        self._json(200, self._card(node.loaded, with_parameters=True))

    def _card(self, name: str, *, with_parameters: bool) -> dict[str, Any]:
        parameters = None
        if with_parameters:
            parameters = {
                "max_seq_len": 8192,
                "cache_size": 16384,
                "cache_mode": "Q4",
                "rope_scale": 1.0,
                "rope_alpha": 1.0,
                "max_batch_size": 256,
                "chunk_size": 2048,
                "prompt_template": None,
                "prompt_template_content": None,
                "use_vision": False,
                "draft": None,
            }
        return {
            "id": name,
            "object": "model",
            "created": self.server.node.created,
            "owned_by": "tabbyAPI",
            "logging": None,
            "parameters": parameters,
        }

    def _model_list(self, _body: object) -> None:
        permission = self._permission_of("x-api-key")
        if not permission:
            self._api_ok()  # answers the 401
            return
        node = self.server.node
        if permission == "admin":
            try:
                names = sorted(p.name for p in node.opts.models_dir.iterdir() if p.is_dir())
            except OSError:
                self._plain(500, "Internal Server Error")
                return
        else:
            names = [node.loaded] if node.loaded else []
        data = [self._card(n, with_parameters=False) for n in names]
        self._json(200, {"object": "list", "data": data})

    def _load(self, body: object) -> None:
        if not self._admin_ok():
            return
        if self._faults.load_stream:
            self._hostile_load(self._faults.load_stream)
            return
        name = body.get("model_name") if isinstance(body, dict) else None
        if not isinstance(name, str):
            missing = {
                "type": "missing",
                "loc": ["body", "model_name"],
                "msg": "Field required",
                "input": body if isinstance(body, dict) else None,
            }
            self._json(422, {"detail": [missing]})
            return
        self._model = name
        if not name:
            self._json(400, {"detail": NO_MODEL_NAME})
            return
        node = self.server.node
        if "/" in name or name in (".", "..") or not node.model_dir(name).is_dir():
            self._json(400, {"detail": NO_MODEL_PATH})
            return
        already = node.loaded == name
        self._stream_load(node.load(name, self._faults), "already loaded" if already else "")

    def _stream_load(self, items: Generator[LoadItem, None, None], note: str) -> None:
        node = self.server.node
        self._start_chunked(200, "text/event-stream; charset=utf-8")
        modern = node.opts.modern
        ping_every = self._faults.ping_seconds or 15.0
        last_ping = time.monotonic()
        attached = True
        self._result = note or "stream ended"
        for item in items:
            if attached and self._client_gone():
                attached = False
            if not attached and not modern:
                items.close()  # older builds cancel the load with the request
                self._result = "cancelled: client disconnected"
                self.close_connection = True
                return
            if item is None:
                if attached and modern and time.monotonic() - last_ping >= ping_every:
                    last_ping = time.monotonic()
                    attached = self._try_chunk(b": ping\r\n\r\n")
                continue
            if "error" in item:
                self._result = "error: " + str(item["error"]["message"])
            elif item.get("status") == "finished" and not note:
                self._result = "loaded"
            if attached:
                attached = self._try_chunk(b"data: " + json.dumps(item).encode() + b"\r\n\r\n")
        if not attached:
            self._result += " (client gone)"
            self.close_connection = True
            return
        self._log_request()  # its outcome is known: logged before the end the client waits for
        self._try_chunk(b"")

    def _hostile_load(self, mode: str) -> None:
        """Send LOAD_STREAMS[mode] until the client closes the connection (or we stop)."""
        first, unit = LOAD_STREAMS[mode]
        chunk = unit * max(1, (64 << 10) // len(unit))
        self._start_chunked(200, "text/event-stream; charset=utf-8")
        self.close_connection = True
        sent = len(first)
        attached = self._try_chunk(first) if first else True
        while attached and not self.server.stopping.is_set():
            attached = self._try_chunk(chunk)
            sent += len(chunk) if attached else 0
        self._result = f"{mode}: " + ("client gone" if not attached else "server stopping")
        self._result += f" after {sent} bytes"

    def _echo_auth(self, _body: object) -> None:
        at = self._faults.echo_auth_at or 0
        token = self._bearer() or self.headers.get("x-admin-key") or ""
        self._plain(500, "." * at + token + " <- the key you sent")

    def _unload(self, _body: object) -> None:
        if not self._admin_ok():
            return
        node = self.server.node
        if node.loaded is None:
            self._no_model()
            return
        if self._faults.unload_error:
            self._plain(500, "Internal Server Error")
            return
        node.unload()
        self._json(200, None)

    def _generation_guard(self) -> bool:
        if not self._api_ok():
            return False
        node = self.server.node
        if node.loaded is None:
            if not node.opts.modern:
                node.lock_leaked = True  # observed on the real exl2 build (notes/tabbyapi.md)
            self._no_model()
            return False
        if self._faults.generation_hang or node.lock_leaked:
            self._wait_for_disconnect()  # tabbyAPI#428: never answers
            self.close_connection = True
            return False
        return True

    def _completion(self, _body: object) -> None:
        if self._generation_guard():
            choice = {"index": 0, "finish_reason": "length", "text": " Hello", "logprobs": None}
            self._json(200, self._generation("text_completion", choice))

    def _chat_completion(self, _body: object) -> None:
        if self._generation_guard():
            message = {"role": "assistant", "content": "Hello"}
            choice = {"index": 0, "finish_reason": "length", "message": message}
            self._json(200, self._generation("chat.completion", choice))

    def _generation(self, kind: str, choice: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "choices": [choice],
            "created": int(time.time()),
            "model": self.server.node.loaded,
            "object": kind,
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    def _permission(self, _body: object) -> None:
        permission = self._permission_of("x-api-key")
        if permission is None:
            self._json(401, {"detail": "Please provide an API key"})
        elif not permission:
            self._json(401, {"detail": "Invalid API key"})
        else:
            self._json(200, {"permission": permission})

    # --- writing --------------------------------------------------------------------------------

    def _json(self, status: int, body: object) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def _plain(self, status: int, text: str) -> None:
        self._send(status, text.encode(), "text/plain; charset=utf-8")

    def _head(self, status: int, headers: Sequence[tuple[str, str]]) -> bytes:
        self._status = status
        self._result = self._result or HTTPStatus(status).phrase
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "server: uvicorn"]
        lines += [f"{k}: {v}" for k, v in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        head = self._head(status, [("content-type", ctype), ("content-length", str(len(body)))])
        self._log_request()
        self._write(head + body)

    def _start_chunked(self, status: int, ctype: str) -> None:
        head = self._head(status, [("content-type", ctype), ("transfer-encoding", "chunked")])
        self._write(head)

    def _try_chunk(self, data: bytes) -> bool:
        """Send one chunk (b"" ends the body); False when the client is gone."""
        try:
            self._write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        except OSError:
            return False
        return True

    def _write(self, data: bytes) -> None:
        rate = self._faults.trickle_bytes_per_s
        if rate <= 0:
            self.wfile.write(data)
            self.wfile.flush()
            return
        piece = max(1, int(rate * _TICK))
        for start in range(0, len(data), piece):
            self.wfile.write(data[start : start + piece])
            self.wfile.flush()
            time.sleep(piece / rate)

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    def _wait_for_disconnect(self) -> None:
        while not self.server.stopping.is_set():
            if self._client_gone():
                return
            time.sleep(_TICK)


class _BadJson:
    """A request body that is not JSON (FastAPI answers 422)."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], node: Node, stopping: threading.Event) -> None:
        self.node = node
        self.stopping = stopping
        super().__init__(address, _Handler)


def _bind(opts: Options, node: Node, stopping: threading.Event) -> _Server | None:
    """Bind the port, or port+1 when it is busy (TabbyAPI's quiet fallback); None: both busy."""
    for port in (opts.port, opts.port + 1):
        try:
            return _Server((opts.host, port), node, stopping)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            print(f"WARNING: Port {port} is currently in use.", file=sys.stderr, flush=True)
    return None


class Simulator:
    """The process: startup load, the listening socket (closed while `refuse`), the watcher."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.node = Node(opts)
        self.stopping = threading.Event()
        self._server: _Server | None = None
        self._serving = threading.Event()

    def startup_load(self) -> None:
        name = self.opts.startup_model
        if not self.node.model_dir(name).is_dir():
            raise LoadFailedError(NO_MODEL_PATH)
        for item in self.node.load(name, self.node.faults()):
            if item is not None and "error" in item:
                raise LoadFailedError(str(item["error"]["message"]))

    def watch(self) -> None:
        """Process-level faults, applied even when no request comes in."""
        while not self.stopping.wait(_TICK):
            faults = self.node.faults()
            if faults.exit_code is not None:
                _exit(faults)
            server = self._server
            if faults.refuse and server is not None and self._serving.is_set():
                server.shutdown()

    def serve(self, server: _Server) -> int:
        self._server = server
        port = server.server_address[1]
        if self.opts.port_file is not None:
            tmp = self.opts.port_file.with_suffix(".tmp")
            tmp.write_text(f"{port}\n", encoding="utf-8")
            os.replace(tmp, self.opts.port_file)
        print(f"INFO: Uvicorn running on http://{self.opts.host}:{port}", flush=True)
        threading.Thread(target=self.watch, name="faults", daemon=True).start()
        while True:
            self._serving.set()
            server.serve_forever(poll_interval=_TICK)
            self._serving.clear()
            server.server_close()  # connections are refused from here on
            while read_control(self.opts.control).refuse:
                time.sleep(_TICK)
            server = self._rebind(port)
            self._server = server

    def _rebind(self, port: int) -> _Server:
        while True:
            try:
                return _Server((self.opts.host, port), self.node, self.stopping)
            except OSError as exc:  # someone took the port meanwhile: keep trying, like a restart
                print(f"WARNING: cannot rebind port {port}: {exc}", file=sys.stderr, flush=True)
                time.sleep(0.2)


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m hydra_watchdog.sim.tabby_server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--tokens", type=Path, help="api_tokens.yml-like key file (none: no auth)")
    parser.add_argument("--flavor", choices=("exl2", "modern"), default="exl2")
    parser.add_argument("--control", type=Path, help="JSON fault file, re-read on every request")
    parser.add_argument("--request-log", type=Path, help="one JSON line per request answered")
    parser.add_argument("--startup-model", default="", help="load this before opening the port")
    parser.add_argument("--load-seconds", type=float, default=1.0)
    parser.add_argument("--modules", type=int, default=8)
    parser.add_argument("--nvml-state", type=Path, help="register VRAM with the NVML simulator")
    parser.add_argument("--port-file", type=Path, help="write the port actually bound here")
    args = parser.parse_args(argv)
    api_key = admin_key = None
    if args.tokens is not None:
        api_key, admin_key = read_tokens(args.tokens)
    return Options(
        host=args.host,
        port=args.port,
        models_dir=args.models_dir,
        api_key=api_key,
        admin_key=admin_key,
        flavor=args.flavor,
        control=args.control,
        request_log=args.request_log,
        startup_model=args.startup_model,
        load_seconds=args.load_seconds,
        modules=args.modules,
        nvml_state=args.nvml_state,
        port_file=args.port_file,
    )


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    sim = Simulator(opts)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if opts.startup_model:
        print(f"INFO: Loading model {opts.startup_model}", flush=True)
        try:
            sim.startup_load()
        except LoadFailedError as exc:
            print(f"ERROR: {exc}", file=sys.stderr, flush=True)
            return 1
    server = _bind(opts, sim.node, sim.stopping)
    if server is None:
        print("ERROR: both ports are busy; exiting", file=sys.stderr, flush=True)
        return 0
    try:
        return sim.serve(server)
    finally:
        sim.stopping.set()


if __name__ == "__main__":
    sys.exit(main())
