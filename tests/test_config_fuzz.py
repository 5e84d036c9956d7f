"""Config fuzz: whatever a file holds, `check-config` and `run` agree.

Generated configs (valid tables with mutated values, TOML text written from them, raw bytes) end
in a Config or a ConfigError, never another exception; and every Config accepted is one the
daemon can build its parts from and run a decision on. The CLI exits 78 on a bad file, naming
the key, with no traceback.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import socket
import subprocess
import sys
import tomllib
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from hydra_watchdog.act.executor import Executor
from hydra_watchdog.adapters.fallback_route import LiteLlmRoute
from hydra_watchdog.adapters.gpu import NvmlGpu
from hydra_watchdog.adapters.gpu_reset import NvidiaSmiReset
from hydra_watchdog.adapters.host import HostProbe
from hydra_watchdog.adapters.process_control import PidfdControl
from hydra_watchdog.adapters.procs import ProcScanner
from hydra_watchdog.adapters.systemd import SystemctlUnit
from hydra_watchdog.adapters.tabby import TabbyClient, read_admin_key
from hydra_watchdog.config import (
    SECTIONS,
    Config,
    ConfigError,
    load_config,
    parse_config,
    render_config,
    schema,
)
from hydra_watchdog.daemon import Daemon
from hydra_watchdog.interfaces import Adapters
from hydra_watchdog.observe import Observer
from hydra_watchdog.policy import decide
from hydra_watchdog.policy_state import PolicyState
from hydra_watchdog.report.metrics import parse_listen
from hydra_watchdog.report.status_build import stale_after
from tests import policy_kit as kit
from tests.harness.lines import unwrapped
from tests.test_config import DEVICE_FIELDS, raw_value

# --- what the daemon builds from a config ------------------------------------------------------


class _QuietNotify:
    """sd_notify stand-in: there is no service manager to tell in a test."""

    def ready(self) -> bool:
        return False

    def status(self, line: str) -> bool:
        return False

    def watchdog(self) -> bool:
        return False

    def stopping(self) -> bool:
        return False

    def watchdog_interval(self) -> float | None:
        return None


def _exists(*parts: str) -> bool:
    with contextlib.suppress(ValueError, OSError):
        return os.path.lexists(os.path.join(*parts))
    return True  # an unusable path: treat as present so it is not walked


@functools.cache
def shared_tabby() -> TabbyClient:
    # An httpx client costs ~50 ms (its TLS context) and depends on no config value; the
    # config-dependent half of TabbyClient.from_config (the admin key file) runs per config.
    return TabbyClient.from_config(Config())


def exercise(cfg: Config, scratch: Path, *, full: bool = False) -> None:
    """Build what `run` builds from `cfg` (no root, no systemd, no GPU needed) and take a few
    decisions with it; any exception here is a config `check-config` should have refused.
    `full` also builds the TabbyAPI client and the Daemon itself."""
    text = render_config(cfg)
    again = parse_config(tomllib.loads(text), source=cfg.source)
    assert again.tabbyapi.unit == cfg.tabbyapi.unit and again.model == cfg.model

    for url in (cfg.tabbyapi.url, cfg.fallback_route.url):
        if url:
            httpx.URL(url + "/v1/model")  # the client accepts every URL the config does
    if cfg.metrics.listen:
        parse_listen(cfg.metrics.listen)
    read_admin_key(cfg.tabbyapi.admin_key_file, {})

    tabby = TabbyClient.from_config(cfg) if full else shared_tabby()
    gpu = NvmlGpu.from_config(cfg)
    try:
        scanner = ProcScanner.from_config(cfg)
        assert 0 < scanner.port < 65536
        host = HostProbe.from_config(cfg)
        m = cfg.model
        # Only look at folders that are not there: a real one would be walked for its size.
        if not any(_exists(m.models_dir, n) for n in (m.name, m.fallback) if n):
            host.check(libraries=False)
        adapters = Adapters(
            tabby=tabby,
            gpu=gpu,
            units=SystemctlUnit(cfg.tabbyapi.unit),
            scanner=scanner,
            host=host,
            fallback=LiteLlmRoute(),
            processes=PidfdControl(),
            reset=NvidiaSmiReset(),
        )
        Observer.from_adapters(cfg, adapters).close()
        Executor(cfg, adapters, dry_run=True)
        assert math.isfinite(stale_after(cfg))
        deque(maxlen=cfg.watchdog.events_kept)  # the daemon's event memory

        if full:  # the daemon itself, its state in scratch space rather than where cfg says
            local = dataclasses.replace(
                cfg,
                watchdog=dataclasses.replace(
                    cfg.watchdog, state_dir=str(scratch / "state"), runtime_dir=str(scratch / "run")
                ),
            )
            daemon = Daemon(
                local,
                adapters=adapters,
                decide=decide,
                notifier=_QuietNotify(),
                emit=lambda _event: None,
            )
            os.close(daemon._wake_r)
            os.close(daemon._wake_w)

        # A few decisions on this config: no model (VRAM arithmetic), then down.
        state, now = PolicyState(), 1000.0
        for observation in (
            kit.obs(now, model=kit.model(None)),
            kit.obs(now + cfg.watchdog.interval, health=kit.refused()),
            kit.obs(now + 2 * cfg.watchdog.interval, health=kit.refused()),
        ):
            state, _ = decide(state, observation, observation.at, cfg)
    finally:
        if full:
            tabby.close()


# --- generated configs -------------------------------------------------------------------------


def _nested(depth: int, leaf: object) -> object:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


_STRINGS = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "١٢s",
            "５m",
            "1e3",
            "12 s",
            "*.service",
            "-x.service",
            "a b.service",
            "../m",
            "..",
            "m\x00",
            "/a\x00b",
            "http://u:p@127.0.0.1:5000",
            "http://127.0.0.1:5000/?q=1",
            "http://127.0.0.1:5000/#f",
            "http://127.0.0.1:0",
            "http://[::1]:5000",
            "\x00:9835",
            "[::1]:9835",
            "7d",
            "8d",
            "2h",
            "1h",
        ]
    ),
)
_WILD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([2**63 - 1, -(2**63), 2**64, 10**100, 0, -1, 2**32]),
    st.floats(),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324]),
    _STRINGS,
    st.lists(st.integers() | st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    st.builds(_nested, st.integers(0, 2000), st.just("x")),
)


_EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"
_BASES: tuple[dict[str, Any], ...] = (
    {},
    tomllib.loads(_EXAMPLE.read_text(encoding="utf-8")),
    {k: dict(v) for k, v in kit.BASE.items()},
)
_SECTIONS = list(SECTIONS)  # the config's own list: its bookkeeping fields are not sections
_SCOPES = {**schema(), "gpu.device": dict(DEVICE_FIELDS)}


@st.composite
def mutated_configs(draw: st.DrawFn, *, wild: bool = True) -> dict[str, Any]:
    """A valid config with a few values replaced: by other valid values, or (`wild`) by wrong
    types, extreme or odd values, deep nesting, unknown keys or sections."""
    data: dict[str, Any] = copy.deepcopy(draw(st.sampled_from(_BASES)))
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.sampled_from([*_SECTIONS, "gpu.device", *(["?section"] if wild else [])]))
        if where == "?section":
            data[draw(st.text(min_size=1, max_size=8))] = draw(_WILD)
            continue
        fields = _SCOPES[where]
        known = sorted(k for k, f in fields.items() if f.metadata["kind"] != "devices")
        key = draw(st.sampled_from(known) | st.text(max_size=8) if wild else st.sampled_from(known))
        valid = raw_value(fields[key].metadata) if key in known else _WILD
        value = draw(valid | _WILD if wild else valid)
        if where == "gpu.device":
            if isinstance(data.setdefault("gpu", {}), dict):
                identity = {} if key in ("index", "uuid") else {"index": 0}
                data["gpu"]["device"] = [{**identity, key: value}]
        elif wild and draw(st.integers(0, 19)) == 0:
            data[where] = value  # the section itself is not a table
        elif isinstance(data.setdefault(where, {}), dict):
            data[where][key] = value
    return data


def _toml_key(key: str) -> str:
    return json.dumps(key, ensure_ascii=False)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # TOML spells nan, inf and -inf as Python does
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # close to a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return '""'


def to_toml(data: dict[str, Any]) -> str:
    lines = []
    for name, table in data.items():
        if isinstance(table, dict):
            lines.append(f"[{_toml_key(name)}]")
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
        else:
            lines.insert(0, f"{_toml_key(name)} = {_toml_value(table)}")
    return "\n".join(lines) + "\n"


@st.composite
def config_files(draw: st.DrawFn) -> bytes:
    """TOML written from a mutated config, sometimes with bytes spliced in; or raw bytes."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.binary(max_size=300))
    if kind == 1:  # nesting as text, beyond what the structured data reaches
        depth = draw(st.integers(1, 5000))
        opener, closer = draw(st.sampled_from([("[", "]"), ("{a=", "}")]))
        return f"[watchdog]\ninterval = {opener * depth}1{closer * depth}\n".encode()
    try:
        text = to_toml(draw(mutated_configs())).encode("utf-8", "surrogatepass")
    except RecursionError:  # a value nested deeper than this writer goes: kind 1 covers that
        text = b"[model]\nname = " + b"[" * 3000 + b"]" * 3000 + b"\n"
    if kind == 2 and text:
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.binary(min_size=1, max_size=8)) + text[at:]
    return text


# --- the properties ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("fuzz")


FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(mutated_configs())
def test_mutated_configs_are_refused_or_usable(scratch: Path, data: dict[str, Any]) -> None:
    try:
        cfg = parse_config(data)
    except ConfigError as exc:
        assert str(exc).startswith(f"{exc.key}: ")
        assert len(str(exc)) < 600  # a quoted value is cut (config._show): readable, whatever
        return
    exercise(cfg, scratch)


@FUZZ
@given(config_files())
def test_config_files_are_refused_or_usable(scratch: Path, content: bytes) -> None:
    path = scratch / "fuzz.toml"
    path.write_bytes(content)
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        assert str(exc)
        return
    exercise(cfg, scratch)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_configs(wild=False))
def test_accepted_configs_build_the_client_and_the_daemon(
    scratch: Path, data: dict[str, Any]
) -> None:
    try:
        cfg = parse_config(data)
    except ConfigError:
        reject()
    exercise(cfg, scratch, full=True)


# --- the CLI ---------------------------------------------------------------------------------


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hydra_watchdog", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ('[tabbyapi]\nunit = "*.service"\n', "tabbyapi.unit"),
        ('[tabbyapi]\nunit = "-tabbyapi.service"\n', "tabbyapi.unit"),
        ('[tabbyapi]\nurl = "http://127.0.0.1:5000/?x=1"\n', "tabbyapi.url"),
        ('[watchdog]\ninterval = "١٢s"\n', "watchdog.interval"),
        ('[watchdog]\ninterval = "2h"\n', "watchdog.interval"),
        ('[model]\nname = "../../etc"\n', "model.name"),
        ('[watchdog]\nstate_dir = "/var/lib/\\u0000x"\n', "watchdog.state_dir"),
        ("[watchdog]\ninterval = " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
        ('[tabbyapi]\ncmdline_patterns = ["/opt/tabbyapi/.."]\n', "tabbyapi.cmdline_patterns"),
        ('[tabbyapi]\nuser = "hw-no-such-user"\n', "tabbyapi.user"),
        ('[metrics]\nlisten = "127.0.0.1:5000"\n', "metrics.listen"),
        ('[tabbyapi]\nunit = "hydra-watchdog.service"\n', "tabbyapi.unit"),
        ('[watchdog]\nstate_dir = "/run/hydra-watchdog"\n', "watchdog.state_dir"),
        ('[tabbyapi]\nurl = "http://[::1%25lo]:5000"\n', "tabbyapi.url"),
        ('[tabbyapi]\nurl = "http://127.0.0.1:5000/v1"\n', "tabbyapi.url"),
    ],
    ids=[
        "glob", "option", "query", "arabic", "2h", "dotdot", "nul", "deep",
        "tree parent", "no such user", "metrics on the port", "own unit", "state is runtime",
        "zone id", "path",
    ],
)  # fmt: skip
def test_check_config_exits_78_naming_the_key(tmp_path: Path, body: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body, encoding="utf-8")
    out = check_config(path)
    assert out.returncode == 78, out.stderr
    assert key in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_check_config_file_only_leaves_the_machine_out(tmp_path: Path) -> None:
    """A NixOS build checks the file in a sandbox that has no TabbyAPI user: --file-only."""
    path = tmp_path / "user.toml"
    path.write_text('[tabbyapi]\nuser = "hw-no-such-user"\n', encoding="utf-8")
    out = subprocess.run(
        [sys.executable, "-m", "hydra_watchdog", "check-config", "--config", str(path),
         "--file-only"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert 'user = "hw-no-such-user"' in out.stdout


def test_run_refuses_what_check_config_refuses(tmp_path: Path) -> None:
    """`run` validates as `check-config` does: exit 78 before any cycle. (Should the refusal
    fail, the one cycle that follows acts on nothing: a dry run, scratch folders, a closed port
    and no GPU library.)"""
    path = tmp_path / "bad.toml"
    path.write_text(
        f'[watchdog]\nstate_dir = "{tmp_path}/state"\nruntime_dir = "{tmp_path}/run"\n'
        "dry_run = true\n"
        f'[tabbyapi]\nuser = "hw-no-such-user"\nurl = "http://127.0.0.1:{_closed_port()}"\n'
        f'venv = ""\n[gpu]\nnvml_library = "{tmp_path}/no-libnvidia-ml.so"\n',
        encoding="utf-8",
    )
    out = subprocess.run(
        [sys.executable, "-m", "hydra_watchdog", "run", "--once", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 78, out.stderr
    assert "tabbyapi.user: 'hw-no-such-user' is no user on this machine" in unwrapped(out.stderr)
