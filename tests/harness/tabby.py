"""The TabbyAPI simulator as a real subprocess on a free port, for tests and benchmarks.

    def test_x(tabby_sim: TabbySims) -> None:
        sim = tabby_sim.start(flavor="exl2", models={"m1": {}})
        sim.set_faults(hang=True)
        ... sim.url, sim.requests(), sim.loads() ...

Every process started is stopped (SIGTERM, then SIGKILL) when the test ends. Register the
fixture with `pytest_plugins = ["tests.harness.tabby"]` in conftest, or import it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hydra_watchdog.adapters.identity import ListenerCheck, ListenSocket
from hydra_watchdog.sim.install import lay_out
from hydra_watchdog.sim.tabby_server import write_control

API_KEY = "sim-api-key-5f2c"
ADMIN_KEY = "sim-admin-key-9d41e7"
START_TIMEOUT = 20.0  # generous: a busy 2-core machine


def trusted_listener() -> ListenerCheck:
    """The credential gate for tests of the HTTP protocol alone: the test's own server on
    127.0.0.1 is taken as TabbyAPI unchecked (the gate itself is tested in test_identity.py).
    Its socket stands for any listener of this test's uid: a connection's far end must have it."""
    mine = ListenSocket(inode=0, port=0, address="127.0.0.1", uid=os.geteuid())
    return ListenerCheck(True, "the test's own server", address="127.0.0.1", sockets=(mine,))


def free_port() -> int:
    """A port nothing listens on right now (the sim moves to port+1 if it gets taken)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_model(
    models_dir: Path, name: str, *, config: bool = True, vram: int | None = None
) -> Path:
    folder = models_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    if config:
        body: dict[str, Any] = {"model_type": "llama"}
        if vram is not None:
            body["sim_vram_bytes"] = vram
        (folder / "config.json").write_text(json.dumps(body), encoding="utf-8")
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    return folder


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class SimProcess:
    proc: subprocess.Popen[bytes]
    root: Path
    models_dir: Path
    control: Path
    request_log: Path
    port_file: Path
    output: Path
    asked_port: int
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def install_dir(self) -> Path:
        """Its install tree (tabbyapi.cmdline_patterns): it runs as `python <this>/main.py`."""
        return self.root / "tabbyapi"

    def set_faults(self, **faults: Any) -> None:
        write_control(self.control, **faults)

    def requests(self) -> list[dict[str, Any]]:
        if not self.request_log.exists():
            return []
        lines = self.request_log.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def loads(self) -> list[dict[str, Any]]:
        return [r for r in self.requests() if r["path"] == "/v1/model/load"]

    def log_text(self) -> str:
        return self.output.read_text(encoding="utf-8", errors="replace")

    def wait_listening(self, timeout: float = START_TIMEOUT) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"simulator exited {self.proc.returncode} before listening:\n{self.log_text()}"
                )
            if not self.port_file.exists():
                return False
            self.port = int(self.port_file.read_text(encoding="utf-8"))
            return port_open(self.port)

        wait_for(ready, timeout, "the simulator to listen")

    def wait_exit(self, timeout: float = START_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"simulator still running after {timeout} s") from None

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


@dataclass
class TabbySims:
    """Starts simulators under one tmp dir; stop_all() ends every one of them."""

    tmp: Path
    started: list[SimProcess] = field(default_factory=list)

    def start(
        self,
        *,
        flavor: str = "modern",
        models: Mapping[str, Mapping[str, Any]] | None = None,
        auth: bool = True,
        startup_model: str = "",
        load_seconds: float = 0.2,
        modules: int = 4,
        port: int | None = None,
        faults: Mapping[str, Any] | None = None,
        wait: bool = True,
        extra: tuple[str, ...] = (),
    ) -> SimProcess:
        root = self.tmp / f"sim{len(self.started)}"
        models_dir = root / "models"
        models_dir.mkdir(parents=True)
        for name, spec in (models if models is not None else {"m1": {}, "m2": {}}).items():
            make_model(models_dir, name, **spec)
        control = root / "control.json"
        write_control(control, **(faults or {}))
        asked = port if port is not None else free_port()
        argv = [
            *lay_out(root / "tabbyapi", flavor=flavor),
            "--port",
            str(asked),
            "--models-dir",
            str(models_dir),
            "--flavor",
            flavor,
            "--control",
            str(control),
            "--request-log",
            str(root / "requests.jsonl"),
            "--port-file",
            str(root / "port"),
            "--load-seconds",
            str(load_seconds),
            "--modules",
            str(modules),
            *extra,
        ]
        if auth:
            tokens = root / "api_tokens.yml"
            tokens.write_text(f"api_key: {API_KEY}\nadmin_key: {ADMIN_KEY}\n", encoding="utf-8")
            argv += ["--tokens", str(tokens)]
        if startup_model:
            argv += ["--startup-model", startup_model]
        output = root / "output.log"
        with output.open("wb") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        sim = SimProcess(
            proc,
            root,
            models_dir,
            control,
            root / "requests.jsonl",
            root / "port",
            output,
            asked,
        )
        self.started.append(sim)
        if wait:
            sim.wait_listening()
        return sim

    def stop_all(self) -> None:
        for sim in self.started:
            with contextlib.suppress(OSError):
                sim.stop()


@pytest.fixture
def tabby_sim(tmp_path: Path) -> Iterator[TabbySims]:
    sims = TabbySims(tmp_path)
    try:
        yield sims
    finally:
        sims.stop_all()
