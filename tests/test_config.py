"""The configuration schema: the documented example, defaults, rejections and the rendered form."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import math
import os
import posixpath
import re
import string
import tomllib
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from hydra_watchdog.act.load_launch import UNIT_PREFIX
from hydra_watchdog.config import (
    DEFAULT_CONFIG_PATH,
    MAX_DURATION,
    OWN_UNIT,
    OWN_UNIT_PREFIX,
    Config,
    ConfigError,
    GpuDevice,
    check_host,
    load_config,
    parse_config,
    redact_url,
    render_config,
    schema,
)
from hydra_watchdog.durations import ACCEPTED as DURATION_ACCEPTED
from hydra_watchdog.durations import parse_duration

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"
DEVICE_SCOPE = "gpu.device"
DEVICE_FIELDS = {f.name: f for f in dataclasses.fields(GpuDevice)}
CROSS_KEYS = {
    "tabbyapi.slow_threshold",
    "restart_loop.backoff_initial",
    "model.fallback",
    "tabbyapi.unit",
    "metrics.listen",
    "watchdog.state_dir",
}


def scoped_schema() -> dict[str, dict[str, dataclasses.Field[Any]]]:
    """schema() plus the keys of a [[gpu.device]] table, as scope -> key -> field."""
    return {**schema(), DEVICE_SCOPE: dict(DEVICE_FIELDS)}


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --- the example file, read as a document -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
    """One option as the example file shows it: set or commented out, with its comment block."""

    scope: str
    key: str
    commented: bool
    value: str
    doc: tuple[str, ...]


_HEADER = re.compile(r"^\[\[?(?P<name>[a-z_.]+)\]\]?$")
_KEY_LINE = re.compile(r"^(?P<hash>#\s*)?(?P<key>[a-z_]+)\s*=\s*(?P<value>.+)$")


def example_entries(text: str) -> list[Entry]:
    """The first appearance of each option, in file order.

    A commented-out option counts when its name belongs to the section it sits in; the comment
    lines directly above it (no blank line between) are its documentation. The `[[gpu.device]]`
    header stands for the `gpu.device` option itself.
    """
    known = scoped_schema()
    entries: list[Entry] = []
    seen: set[tuple[str, str]] = set()
    scope: str | None = None
    doc: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        header = _HEADER.match(line)
        if header:
            name = header.group("name")
            if name == DEVICE_SCOPE and ("gpu", "device") not in seen:
                seen.add(("gpu", "device"))
                entries.append(Entry("gpu", "device", False, "", tuple(doc)))
            scope, doc = name, []
            continue
        match = _KEY_LINE.match(line)
        if scope is not None and match and match.group("key") in known.get(scope, {}):
            ident = (scope, match.group("key"))
            if ident not in seen:
                seen.add(ident)
                entries.append(
                    Entry(
                        scope,
                        match.group("key"),
                        bool(match.group("hash")),
                        match.group("value"),
                        tuple(doc),
                    )
                )
            doc = []
        elif line.startswith("#"):
            doc.append(line.lstrip("#").strip())
        else:
            doc = []
    return entries


def parse_in_scope(scope: str, key: str, raw: object) -> Any:
    """The typed value of one option, parsed by the real schema with everything else default."""
    if scope == DEVICE_SCOPE:
        table: dict[str, object] = {key: raw}
        if key not in ("index", "uuid"):
            table["index"] = 0  # a device needs exactly one identity
        cfg = parse_config({"gpu": {"device": [table]}})
        return getattr(cfg.gpu.device[0], key)
    cfg = parse_config({scope: {key: raw}})
    return getattr(getattr(cfg, scope), key)


@pytest.fixture(scope="module")
def example_text() -> str:
    return EXAMPLE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def entries(example_text: str) -> list[Entry]:
    return example_entries(example_text)


def test_example_loads_and_mirrors_hydra_ai() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.source == str(EXAMPLE)
    assert cfg.gpu.device == (
        GpuDevice(index=0, power_limit_watts=450.0),  # RTX 5090, the runbook's 450 W
        GpuDevice(index=1, power_limit_watts=300.0),  # RTX 4090, the runbook's 300 W
    )
    assert cfg.tabbyapi.url == "http://127.0.0.1:5000"
    assert cfg.tabbyapi.unit == "tabbyapi.service"
    assert cfg.model.models_dir == "/mnt/models"
    assert cfg.model.fallback == ""  # shown commented out
    assert cfg.restart_loop.max_restarts == 3
    assert cfg.restart_loop.window == 600.0
    assert cfg.restart_loop.escalate_after == 1800.0
    assert cfg.tabbyapi.slow_threshold == 2.0


def test_example_differs_from_the_defaults_only_in_the_hydra_ai_examples() -> None:
    cfg, default = load_config(EXAMPLE), Config()
    differing = {
        f"{section}.{key}"
        for section, keys in schema().items()
        for key in keys
        if getattr(getattr(cfg, section), key) != getattr(getattr(default, section), key)
    }
    assert differing == {"model.vram_required_gib", "gpu.device"}


def test_example_shows_every_schema_key(example_text: str, entries: list[Entry]) -> None:
    shown = {(e.scope, e.key) for e in entries}
    expected = {(scope, key) for scope, keys in scoped_schema().items() for key in keys}
    assert sorted(expected - shown) == [], "options missing from config.example.toml"
    assert sorted(shown - expected) == []

    # The line reader agrees with TOML about which options are set and which are commented out.
    data = tomllib.loads(example_text)
    assert set(data) == set(schema()), "every section has its table"
    for scope in schema():
        set_here = {e.key for e in entries if e.scope == scope and not e.commented}
        assert set(data[scope]) == set_here, scope
    device_keys = {k for table in data["gpu"]["device"] for k in table}
    assert device_keys == {e.key for e in entries if e.scope == DEVICE_SCOPE and not e.commented}
    assert {(e.scope, e.key) for e in entries if e.commented} >= {
        ("model", "fallback"),
        (DEVICE_SCOPE, "uuid"),
    }


def test_example_follows_the_schema_order(entries: list[Entry]) -> None:
    order = [(scope, key) for scope, keys in scoped_schema().items() for key in keys]
    # [[gpu.device]] tables come at the end of [gpu], so their keys sort right after gpu.device.
    position: dict[tuple[str, str], float] = {ident: i for i, ident in enumerate(order)}
    device_at = position[("gpu", "device")]
    for i, key in enumerate(DEVICE_FIELDS):
        position[(DEVICE_SCOPE, key)] = device_at + (i + 1) / 100
    seen = [position[(e.scope, e.key)] for e in entries]
    assert seen == sorted(seen)


_DOC_LINE = re.compile(r"^default: (?P<default>.+?); unit: (?P<unit>\S.*)$")


def test_every_option_documents_why_its_default_and_unit(entries: list[Entry]) -> None:
    fields = scoped_schema()
    for entry in entries:
        where = f"{entry.scope}.{entry.key}"
        doc_lines = [_DOC_LINE.match(line) for line in entry.doc]
        stated = [m for m in doc_lines if m]
        assert len(stated) == 1, f"{where}: needs one 'default: X; unit: Y' comment line"
        why = [line for line, m in zip(entry.doc, doc_lines, strict=True) if not m and line]
        assert why, f"{where}: needs a comment saying why the option exists"

        text = stated[0].group("default")
        want = fields[entry.scope][entry.key].default
        if text == "unset":
            assert want is None, f"{where}: documented as unset, but defaults to {want!r}"
            continue
        raw = tomllib.loads(f"v = {text}")["v"]
        assert parse_in_scope(entry.scope, entry.key, raw) == want, (
            f"{where}: documented default {text} is not the schema's {want!r}"
        )


def test_commented_out_examples_are_valid_values(entries: list[Entry]) -> None:
    commented = [e for e in entries if e.commented]
    assert commented
    for entry in commented:
        raw = tomllib.loads(f"v = {entry.value}")["v"]
        value = parse_in_scope(entry.scope, entry.key, raw)
        assert value not in (None, ""), f"{entry.scope}.{entry.key}: example shows no value"


def test_every_url_in_the_example_is_on_loopback(example_text: str) -> None:
    urls = re.findall(r"https?://[^\s\"')]+", example_text)
    assert len(urls) >= 2  # tabbyapi.url and the commented LiteLLM route at least
    for url in urls:
        host = urllib.parse.urlsplit(url).hostname
        assert host is not None and is_loopback_host(host), url


# --- defaults -----------------------------------------------------------------------------------

_ADDRESS_KINDS = {"local_url", "url_or_empty", "listen_or_empty"}


def test_every_default_address_points_at_loopback() -> None:
    checked = 0
    for scope, fields in scoped_schema().items():
        for key, f in fields.items():
            if f.metadata["kind"] not in _ADDRESS_KINDS or f.default == "":
                continue
            assert isinstance(f.default, str), f"{scope}.{key}"
            if f.metadata["kind"] == "listen_or_empty":
                host = f.default.rpartition(":")[0]
            else:
                host = urllib.parse.urlsplit(f.default).hostname or ""
            assert is_loopback_host(host), f"{scope}.{key} = {f.default!r}"
            checked += 1
    assert checked >= 2  # tabbyapi.url and metrics.listen
    assert Config().tabbyapi.url == "http://127.0.0.1:5000"
    assert Config().tabbyapi.port == 5000


def test_defaults_are_the_issue_s_public_values() -> None:
    cfg = parse_config({})
    assert cfg == Config()
    assert Path("/etc/hydra-watchdog/config.toml") == DEFAULT_CONFIG_PATH
    assert cfg.metrics.listen == "127.0.0.1:9835"
    assert cfg.fallback_route.url == ""
    assert cfg.gpu_reset.enabled is False
    assert cfg.restart_loop.window == 600.0
    assert cfg.restart_loop.escalate_after == 1800.0


# --- rejections -------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
MAIN_MODEL = Config().model.name

# (data, the key the error names, fragments the message must hold: the bad value and what is
# accepted). Each row is one way a hand-written or generated config goes wrong.
INVALID: list[tuple[str, dict[str, Any], str, list[str]]] = [
    (
        "bad duration",
        {"watchdog": {"interval": "5 minutes"}},
        "watchdog.interval",
        ["'5 minutes'", DURATION_ACCEPTED],
    ),
    ("duration unit typo", {"orphans": {"term_grace": "10sec"}}, "orphans.term_grace", ["10sec"]),
    ("duration below min", {"watchdog": {"interval": "10ms"}}, "watchdog.interval", ["50ms"]),
    ("negative duration", {"tabbyapi": {"startup_grace": -1}}, "tabbyapi.startup_grace", ["-1"]),
    ("negative duration text", {"orphans": {"term_grace": "-5s"}}, "orphans.term_grace", ["-5s"]),
    (
        "bool as string",
        {"watchdog": {"dry_run": "yes"}},
        "watchdog.dry_run",
        ["'yes'", "true or false"],
    ),
    ("bool as int", {"gpu_reset": {"enabled": 1}}, "gpu_reset.enabled", ["1", "true or false"]),
    (
        "float for int",
        {"watchdog": {"events_kept": 2.5}},
        "watchdog.events_kept",
        ["2.5", "integer"],
    ),
    (
        "string for int",
        {"tabbyapi": {"slow_probes": "3"}},
        "tabbyapi.slow_probes",
        ["'3'", "integer"],
    ),
    (
        "bool for int",
        {"restart_loop": {"max_restarts": True}},
        "restart_loop.max_restarts",
        ["True", "integer"],
    ),
    (
        "string for number",
        {"model": {"vram_required_gib": "48"}},
        "model.vram_required_gib",
        ["'48'", "a number"],
    ),
    (
        "negative int",
        {"restart_loop": {"max_restarts": -1}},
        "restart_loop.max_restarts",
        ["-1", "minimum 1"],
    ),
    (
        "zero probes",
        {"tabbyapi": {"failures_before_down": 0}},
        "tabbyapi.failures_before_down",
        ["0", "minimum 1"],
    ),
    (
        "negative float",
        {"model": {"estimate_overhead_gib": -0.5}},
        "model.estimate_overhead_gib",
        ["-0.5", "minimum 0"],
    ),
    ("nan", {"model": {"vram_required_gib": NAN}}, "model.vram_required_gib", ["nan", "finite"]),
    (
        "inf watts",
        {"gpu": {"device": [{"index": 0, "power_limit_watts": INF}]}},
        "gpu.device[0].power_limit_watts",
        ["inf", "finite"],
    ),
    ("int for string", {"model": {"name": 70}}, "model.name", ["70", "not a string"]),
    (
        "relative path",
        {"watchdog": {"state_dir": "var/lib/hydra"}},
        "watchdog.state_dir",
        ["'var/lib/hydra'", "absolute path"],
    ),
    (
        "relative key file",
        {"tabbyapi": {"admin_key_file": "admin_key"}},
        "tabbyapi.admin_key_file",
        ["'admin_key'", "absolute path (or empty)"],
    ),
    (
        "unit without suffix",
        {"tabbyapi": {"unit": "tabbyapi"}},
        "tabbyapi.unit",
        ["'tabbyapi'", "'tabbyapi.service'"],
    ),
    (
        "patterns as string",
        {"tabbyapi": {"cmdline_patterns": "/opt/tabbyapi"}},
        "tabbyapi.cmdline_patterns",
        ["'/opt/tabbyapi'", "list of absolute paths"],
    ),
    (
        "empty pattern",
        {"tabbyapi": {"cmdline_patterns": ["/opt/tabbyapi", ""]}},
        "tabbyapi.cmdline_patterns",
        ["''", "not an absolute path"],
    ),
    (
        "no patterns",
        {"tabbyapi": {"cmdline_patterns": []}},
        "tabbyapi.cmdline_patterns",
        ["[]", "non-empty list"],
    ),
    (
        "bare word pattern",
        {"tabbyapi": {"cmdline_patterns": ["python"]}},
        "tabbyapi.cmdline_patterns",
        ["'python'", "not an absolute path", "any command line"],
    ),
    (
        "blank pattern",
        {"tabbyapi": {"cmdline_patterns": [" "]}},
        "tabbyapi.cmdline_patterns",
        ["' '", "not an absolute path"],
    ),
    (
        "root as install tree",
        {"tabbyapi": {"cmdline_patterns": ["/opt/tabbyapi", "/"]}},
        "tabbyapi.cmdline_patterns",
        ["'/'", "not a usable install directory"],
    ),
    (
        "user with a space",
        {"tabbyapi": {"user": "tabby api"}},
        "tabbyapi.user",
        ["'tabby api'", "user name"],
    ),
    (
        "unknown key",
        {"tabbyapi": {"health_timout": "5s"}},
        "tabbyapi.health_timout",
        ["unknown key", "did you mean 'health_timeout'?", "known here:"],
    ),
    (
        "unknown key, no near name",
        {"watchdog": {"zzz": 1}},
        "watchdog.zzz",
        ["unknown key", "known here: dry_run, events_kept, interval"],
    ),
    (
        "unknown device key",
        {"gpu": {"device": [{"index": 0, "power_limit": 450}]}},
        "gpu.device[0].power_limit",
        ["did you mean 'power_limit_watts'?"],
    ),
    (
        "unknown section",
        {"tabby": {"url": "http://127.0.0.1:5000"}},
        "tabby",
        ["unknown", "did you mean 'tabbyapi'?"],
    ),
    (
        "unknown section, no near name",
        {"alerts": {}},
        "alerts",
        ["unknown", "known here:", "fallback_route", "restart_loop"],
    ),
    ("section not a table", {"metrics": "127.0.0.1:9835"}, "metrics", ["is not a table"]),
    (
        "runbook's LAN address",
        {"tabbyapi": {"url": "http://192.0.2.250:5000"}},
        "tabbyapi.url",
        ["'http://192.0.2.250:5000'", "loopback", "127.0.0.0/8"],
    ),
    (
        "hostname",
        {"tabbyapi": {"url": "http://hydra-ai:5000"}},
        "tabbyapi.url",
        ["'http://hydra-ai:5000'", "loopback"],
    ),
    (
        "no scheme",
        {"tabbyapi": {"url": "127.0.0.1:5000"}},
        "tabbyapi.url",
        ["'127.0.0.1:5000'", "an http:// URL"],
    ),
    (
        "bad scheme",
        {"tabbyapi": {"url": "ftp://127.0.0.1/"}},
        "tabbyapi.url",
        ["'ftp://127.0.0.1/'", "an http:// URL"],
    ),
    (
        "https",  # the client speaks no TLS: every probe would fail, and restart TabbyAPI
        {"tabbyapi": {"url": "https://127.0.0.1:5000"}},
        "tabbyapi.url",
        ["'https://127.0.0.1:5000'", "https:// is not supported", "use http://"],
    ),
    (
        "https route",
        {"fallback_route": {"url": "https://127.0.0.1:4000"}},
        "fallback_route.url",
        ["https:// is not supported"],
    ),
    (
        "bad port",
        {"tabbyapi": {"url": "http://127.0.0.1:99999"}},
        "tabbyapi.url",
        ["'http://127.0.0.1:99999'", "invalid port"],
    ),
    (
        "unclosed IPv6",
        {"tabbyapi": {"url": "http://[::1:5000"}},
        "tabbyapi.url",
        ["'http://[::1:5000'", "an http:// URL"],
    ),
    (
        "url not a string",
        {"tabbyapi": {"url": 5000}},
        "tabbyapi.url",
        ["5000", "an http:// URL"],
    ),
    (
        "route not a URL",
        {"fallback_route": {"url": "litellm:4000"}},
        "fallback_route.url",
        ["'litellm:4000'", "an http:// URL"],
    ),
    (
        "listen port only",
        {"metrics": {"listen": "9835"}},
        "metrics.listen",
        [repr("9835"), "'host:port' like '127.0.0.1:9835'"],
    ),
    (
        "listen no host",
        {"metrics": {"listen": ":9835"}},
        "metrics.listen",
        [repr(":9835"), "'host:port' like '127.0.0.1:9835'"],
    ),
    (
        "listen no port",
        {"metrics": {"listen": "127.0.0.1:"}},
        "metrics.listen",
        [repr("127.0.0.1:"), "'host:port' like '127.0.0.1:9835'"],
    ),
    (
        "listen port 0",
        {"metrics": {"listen": "127.0.0.1:0"}},
        "metrics.listen",
        [repr("127.0.0.1:0"), "'host:port' like '127.0.0.1:9835'"],
    ),
    (
        "listen big port",
        {"metrics": {"listen": "127.0.0.1:65536"}},
        "metrics.listen",
        [repr("127.0.0.1:65536"), "'host:port' like '127.0.0.1:9835'"],
    ),
    (
        "listen name port",
        {"metrics": {"listen": "127.0.0.1:http"}},
        "metrics.listen",
        [repr("127.0.0.1:http"), "'host:port' like '127.0.0.1:9835'"],
    ),
    (
        "listen odd digit",
        {"metrics": {"listen": "127.0.0.1:\u00b2"}},
        "metrics.listen",
        [repr("127.0.0.1:\u00b2"), "'host:port' like '127.0.0.1:9835'"],
    ),
    ("listen as int", {"metrics": {"listen": 9835}}, "metrics.listen", ["9835", "a string like"]),
    (
        "device both ids",
        {"gpu": {"device": [{"index": 0, "uuid": "GPU-1234"}]}},
        "gpu.device[0]",
        ["exactly one of 'index' or 'uuid'"],
    ),
    (
        "device no id",
        {"gpu": {"device": [{"index": 0}, {"power_limit_watts": 300}]}},
        "gpu.device[1]",
        ["exactly one of 'index' or 'uuid'"],
    ),
    (
        "duplicate index",
        {"gpu": {"device": [{"index": 0}, {"index": 1}, {"index": 0}]}},
        "gpu.device[2]",
        ["'0'", "listed twice"],
    ),
    (
        "duplicate uuid",
        {"gpu": {"device": [{"uuid": "GPU-a"}, {"uuid": "GPU-a"}]}},
        "gpu.device[1]",
        ["'GPU-a'", "listed twice"],
    ),
    (
        "device not a table",
        {"gpu": {"device": [0]}},
        "gpu.device[0]",
        ["0 is not a table"],
    ),
    (
        "devices not tables",
        {"gpu": {"device": {"index": 0}}},
        "gpu.device",
        ["[[gpu.device]] tables"],
    ),
    (
        "slow equals timeout",
        {"tabbyapi": {"slow_threshold": "5s"}},
        "tabbyapi.slow_threshold",
        ["5s", "tabbyapi.health_timeout (5s)"],
    ),
    (
        "timeout below slow",
        {"tabbyapi": {"health_timeout": "1s"}},
        "tabbyapi.slow_threshold",
        ["2s", "tabbyapi.health_timeout (1s)"],
    ),
    (
        "backoff inverted",
        {"restart_loop": {"backoff_initial": "20m"}},
        "restart_loop.backoff_initial",
        ["20m", "restart_loop.backoff_max (15m)"],
    ),
    (
        "fallback is main",
        {"model": {"fallback": MAIN_MODEL}},
        "model.fallback",
        [repr(MAIN_MODEL), "the main model"],
    ),
]


@pytest.mark.parametrize(
    ("data", "key", "fragments"), [row[1:] for row in INVALID], ids=[row[0] for row in INVALID]
)
def test_invalid_config_names_key_value_and_what_is_accepted(
    data: dict[str, Any], key: str, fragments: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    message = str(caught.value)
    assert caught.value.key == key
    assert message.startswith(f"{key}: ")
    for fragment in fragments:
        assert fragment in message


def _nested(depth: int) -> object:
    value: object = "x"
    for _ in range(depth):
        value = {"a": value}
    return value


# Issue 10: what `run` would crash on (or misuse) is refused up front, naming the key.
UNSAFE: list[tuple[str, dict[str, Any], str, list[str]]] = [
    ("unit glob", {"tabbyapi": {"unit": "*.service"}}, "tabbyapi.unit", ["'*.service'", "globs"]),
    ("unit glob ?", {"tabbyapi": {"unit": "tabby?.service"}}, "tabbyapi.unit", ["no globs"]),
    ("unit glob [", {"tabbyapi": {"unit": "tabby[12].service"}}, "tabbyapi.unit", ["globs"]),
    ("unit option", {"tabbyapi": {"unit": "--all.service"}}, "tabbyapi.unit", ["leading '-'"]),
    ("unit space", {"tabbyapi": {"unit": "tabby api.service"}}, "tabbyapi.unit", ["spaces"]),
    ("unit newline", {"tabbyapi": {"unit": "a.service\nb.service"}}, "tabbyapi.unit", ["\\n"]),
    ("unit path", {"tabbyapi": {"unit": "../x.service"}}, "tabbyapi.unit", ["'../x.service'"]),
    ("unit template", {"tabbyapi": {"unit": "tabby@.service"}}, "tabbyapi.unit", ["@instance"]),
    ("unit too long", {"tabbyapi": {"unit": "a" * 250 + ".service"}}, "tabbyapi.unit", ["255"]),
    ("unit empty", {"tabbyapi": {"unit": ""}}, "tabbyapi.unit", ["'tabbyapi.service'"]),
    ("url port 0", {"tabbyapi": {"url": "http://127.0.0.1:0"}}, "tabbyapi.url", ["1-65535"]),
    ("url space", {"tabbyapi": {"url": "http://127.0.0.1:5000/ x"}}, "tabbyapi.url", ["spaces"]),
    ("url newline", {"fallback_route": {"url": "http://127.0.0.1/\n"}}, "fallback_route.url", []),
    ("url non-ascii", {"tabbyapi": {"url": "http://127.0.0.1:５０００"}}, "tabbyapi.url", []),
    ("arabic digits", {"watchdog": {"interval": "١٢s"}}, "watchdog.interval", ["'١٢s'"]),
    ("fullwidth digits", {"orphans": {"term_grace": "５"}}, "orphans.term_grace", ["'５'"]),
    ("exponent text", {"tabbyapi": {"startup_grace": "1e3"}}, "tabbyapi.startup_grace", []),
    ("interval 2h", {"watchdog": {"interval": "2h"}}, "watchdog.interval", ["'2h'", "maximum 1h"]),
    ("interval secs", {"watchdog": {"interval": 3601}}, "watchdog.interval", ["maximum 1h"]),
    ("grace 8d", {"tabbyapi": {"startup_grace": "8d"}}, "tabbyapi.startup_grace", ["maximum 7d"]),
    ("window huge", {"restart_loop": {"window": 2**63 - 1}}, "restart_loop.window", ["7d"]),
    (
        "timeout 1e300",
        {"fallback_route": {"timeout": 1e300}},
        "fallback_route.timeout",
        ["maximum 7d"],
    ),
    ("model up", {"model": {"name": "../other"}}, "model.name", ["'../other'", "folder name"]),
    ("model slash", {"model": {"name": "org/model"}}, "model.name", ["no '/'"]),
    ("model dotdot", {"model": {"name": ".."}}, "model.name", ["'..'"]),
    ("model dot", {"model": {"name": "."}}, "model.name", ["'.'"]),
    ("model nul", {"model": {"name": "m\x00x"}}, "model.name", ["U+0000"]),
    ("model newline", {"model": {"name": "m\nx"}}, "model.name", ["U+000A"]),
    ("model too long", {"model": {"name": "é" * 128}}, "model.name", ["255 bytes"]),
    ("fallback up", {"model": {"fallback": "../../etc"}}, "model.fallback", ["folder name"]),
    ("state nul", {"watchdog": {"state_dir": "/var/\x00x"}}, "watchdog.state_dir", ["U+0000"]),
    ("runtime esc", {"watchdog": {"runtime_dir": "/run/\x1b[2J"}}, "watchdog.runtime_dir", []),
    ("key nul", {"tabbyapi": {"admin_key_file": "/k\x00"}}, "tabbyapi.admin_key_file", []),
    ("venv nul", {"tabbyapi": {"venv": "/opt/\x00"}}, "tabbyapi.venv", ["U+0000"]),
    ("nvml nul", {"gpu": {"nvml_library": "/lib\x00.so"}}, "gpu.nvml_library", ["U+0000"]),
    ("models nul", {"model": {"models_dir": "/mnt\x00"}}, "model.models_dir", ["U+0000"]),
    ("path too long", {"model": {"models_dir": "/" + "a" * 4095}}, "model.models_dir", ["4095"]),
    ("route model nl", {"fallback_route": {"model": "t\n"}}, "fallback_route.model", ["U+000A"]),
    (
        "uuid nul",
        {"gpu": {"device": [{"uuid": "GPU-\x00"}]}},
        "gpu.device[0].uuid",
        ["U+0000"],
    ),
    (
        "index wraps",
        {"gpu": {"device": [{"index": 2**32}]}},
        "gpu.device[0].index",
        ["maximum 255"],
    ),
    (
        "watts huge",
        {"gpu": {"device": [{"index": 0, "power_limit_watts": 1e308}]}},
        "gpu.device[0].power_limit_watts",
        ["maximum 10000.0"],
    ),
    ("vram huge", {"model": {"vram_required_gib": 1e308}}, "model.vram_required_gib", ["65536"]),
    (
        "overhead huge",
        {"model": {"estimate_overhead_gib": 1e20}},
        "model.estimate_overhead_gib",
        ["max"],
    ),
    ("events huge", {"watchdog": {"events_kept": 10**100}}, "watchdog.events_kept", ["100000"]),
    ("restarts huge", {"restart_loop": {"max_restarts": 1001}}, "restart_loop.max_restarts", []),
    ("listen nul", {"metrics": {"listen": "\x00:9835"}}, "metrics.listen", ["'host:port'"]),
    ("listen space", {"metrics": {"listen": "a b:9835"}}, "metrics.listen", ["'host:port'"]),
    ("listen bare v6", {"metrics": {"listen": "::1:9835"}}, "metrics.listen", ["'[::1]:9835'"]),
    ("listen long", {"metrics": {"listen": "a" * 64 + ":1"}}, "metrics.listen", ["'host:port'"]),
    ("deep value", {"model": {"name": _nested(3000)}}, "model.name", ["not a string"]),
    ("deep section", {"metrics": [[[[[[[[1]]]]]]]]}, "metrics", ["is not a table"]),
]

# Issue 22: what `run` would accept and then misbehave on silently.
PATTERNS, LISTEN = "tabbyapi.cmdline_patterns", "metrics.listen"
UNSAFE += [
    (
        "tree parent",
        {"tabbyapi": {"cmdline_patterns": ["/opt/tabbyapi/.."]}},
        PATTERNS,
        ["'/opt/tabbyapi/..'", "holds '..'", "parent folder", "like '/opt/tabbyapi'"],
    ),
    (
        "tree via ..",
        {"tabbyapi": {"cmdline_patterns": ["/srv", "/opt/x/../y"]}},
        PATTERNS,
        ["'..'"],
    ),
    (
        "metrics on the port",
        {"metrics": {"listen": "127.0.0.1:5000"}},
        LISTEN,
        ["'127.0.0.1:5000'", "port 5000, TabbyAPI's", "'127.0.0.1:9835'"],
    ),
    (
        "metrics on port+1",
        {"tabbyapi": {"url": "http://localhost:8080"}, "metrics": {"listen": "[::1]:8081"}},
        LISTEN,
        ["port 8081", "8081 where TabbyAPI moves"],
    ),
    (
        "own unit",
        {"tabbyapi": {"unit": "hydra-watchdog.service"}},
        "tabbyapi.unit",
        ["'hydra-watchdog.service'", "the watchdog's own unit", "'tabbyapi.service'"],
    ),
    (
        "load helper unit",
        {"tabbyapi": {"unit": "hydra-watchdog-load-0123abcd.service"}},
        "tabbyapi.unit",
        ["the watchdog's own unit"],
    ),
    (
        "state is runtime",
        {"watchdog": {"state_dir": "/run/hydra-watchdog/"}},
        "watchdog.state_dir",
        ["'/run/hydra-watchdog/'", "watchdog.runtime_dir", "/var/lib/hydra-watchdog"],
    ),
    (
        "runtime in state",
        {"watchdog": {"runtime_dir": "/var/lib/hydra-watchdog/run"}},
        "watchdog.state_dir",
        ["'/var/lib/hydra-watchdog/run'", "shares a tree"],
    ),
    (
        "url zone id",
        {"tabbyapi": {"url": "http://[::1%25lo]:5000"}},
        "tabbyapi.url",
        ["'http://[::1%25lo]:5000'", "zone id", "'http://[::1]:5000'"],
    ),
    (
        "route zone id",
        {"fallback_route": {"url": "http://[fe80::1%25eth0]:4000"}},
        "fallback_route.url",
        ["zone id"],
    ),
    (
        "url path",
        {"tabbyapi": {"url": "http://127.0.0.1:5000/v1"}},
        "tabbyapi.url",
        ["'http://127.0.0.1:5000/v1'", "has a path ('/v1')", "base URL alone"],
    ),
    (
        "route path",
        {"fallback_route": {"url": "http://litellm.internal:4000/v1"}},
        "fallback_route.url",
        ["has a path ('/v1')"],
    ),
]


def test_a_user_that_does_not_exist_is_refused_on_the_machine_not_in_the_file() -> None:
    """The file alone is fine (load_config's verdict rests on its bytes); the machine that runs
    the watchdog has no such user: check_host (run, check-config) refuses it."""
    cfg = parse_config({"tabbyapi": {"user": "hw-no-such-user"}})
    with pytest.raises(ConfigError) as caught:
        check_host(cfg)
    assert caught.value.key == "tabbyapi.user"
    assert str(caught.value) == (
        "tabbyapi.user: 'hw-no-such-user' is no user on this machine; give the user TabbyAPI "
        "runs as (a name from the user database, or a numeric uid)"
    )
    for user in ("root", "nobody", "4242"):  # a uid need not have a name
        check_host(parse_config({"tabbyapi": {"user": user}}))


def test_the_own_unit_names_are_the_watchdogs() -> None:
    """What check-config calls the watchdog's own units is what the watchdog runs."""
    unit = (Path(__file__).resolve().parents[1] / "systemd" / OWN_UNIT).read_text()
    assert re.search(r"^ExecStart=\S*/hydra-watchdog run ", unit, re.M), unit
    assert OWN_UNIT_PREFIX == UNIT_PREFIX


# Every quoted value is cut: a message stays readable whatever the value (a nested list of long
# strings ran to 2,001 characters).
_LONG = "/opt/" + "x" * 5000
QUOTED: list[tuple[str, dict[str, Any]]] = [
    ("nested patterns", {"tabbyapi": {"cmdline_patterns": [[["a" * 200] * 6] * 6] * 6}}),
    ("long pattern", {"tabbyapi": {"cmdline_patterns": ["relative" + "x" * 5000]}}),
    ("long dotdot", {"tabbyapi": {"cmdline_patterns": [_LONG + "/.."]}}),
    ("long user", {"tabbyapi": {"user": ["u" * 5000]}}),
    ("long url", {"tabbyapi": {"url": "http://127.0.0.1:5000/" + "p" * 5000}}),
    ("long unknown key", {"watchdog": {"k" * 5000: 1}}),
    ("long section", {"s" * 5000: {}}),
    ("long gpu uuid", {"gpu": {"device": [{"uuid": "u" * 5000}, {"uuid": "u" * 5000}]}}),
    ("long fallback", {"model": {"name": "m" * 200, "fallback": "m" * 200}}),
]


@pytest.mark.parametrize("data", [row[1] for row in QUOTED], ids=[row[0] for row in QUOTED])
def test_a_quoted_value_is_cut(data: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    message = str(caught.value)
    assert len(message) < 400, message
    assert "…" in message  # cut, and said to be


@pytest.mark.parametrize(
    ("data", "key", "fragments"), [row[1:] for row in UNSAFE], ids=[row[0] for row in UNSAFE]
)
def test_values_run_would_misuse_are_refused_naming_the_key(
    data: dict[str, Any], key: str, fragments: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    message = str(caught.value)
    assert caught.value.key == key
    assert message.startswith(f"{key}: ")
    assert len(message) < 1000  # the value is shown bounded, never a flood
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    "data",
    [
        {"tabbyapi": {"unit": "tabbyapi@gpu0.service"}},
        {"tabbyapi": {"unit": "tabby-api_2:x.y.service"}},
        {"tabbyapi": {"unit": "tabby\\x2dapi.service"}},
        {"tabbyapi": {"unit": "a" * 247 + ".service"}},
        {"watchdog": {"interval": "1h"}},
        {"tabbyapi": {"startup_grace": "7d", "canary_interval": 604800}},
        {"model": {"name": "Midnight..Miqu v1.5 é", "fallback": ".hidden"}},
        {"model": {"vram_required_gib": 65536, "estimate_overhead_gib": 0}},
        {"gpu": {"device": [{"index": 255, "power_limit_watts": 10000}]}},
        {"metrics": {"listen": "localhost:9835"}},
        {"metrics": {"listen": "0.0.0.0:9835"}},
        {"fallback_route": {"url": "http://litellm.internal:4000/"}},
        {"tabbyapi": {"user": "hw-no-such-user"}},  # the file is fine; this machine: check_host
        {"tabbyapi": {"url": "http://127.0.0.1:9835"}, "metrics": {"listen": "127.0.0.1:9834"}},
        {"tabbyapi": {"unit": "hydra-watchdog-tabby.service"}},
        {"watchdog": {"state_dir": "/var/lib/hydra", "runtime_dir": "/var/lib/hydra-run"}},
    ],
)
def test_plain_values_at_the_limits_are_valid(data: dict[str, Any]) -> None:
    parse_config(data)


@pytest.mark.parametrize(
    "data",
    [
        {"tabbyapi": {"slow_threshold": "4999ms"}},
        {"restart_loop": {"backoff_initial": "15m"}},
        {"gpu": {"device": [{"index": 0}, {"uuid": "0"}]}},  # index 0 is not the uuid "0"
        {"tabbyapi": {"url": "http://[::1]:5000/"}},
        {"tabbyapi": {"url": "http://localhost:5000"}},
        {"tabbyapi": {"url": "http://127.9.9.9"}},
        {"metrics": {"listen": ""}},
        {"metrics": {"listen": "[::1]:9835"}},
        {"model": {"name": "", "fallback": ""}},
    ],
)
def test_edges_that_are_valid(data: dict[str, Any]) -> None:
    parse_config(data)


def test_trailing_slash_is_dropped_from_urls() -> None:
    cfg = parse_config({"tabbyapi": {"url": "http://127.0.0.1:5000/"}})
    assert cfg.tabbyapi.url == "http://127.0.0.1:5000"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_load_config_turns_durations_into_seconds(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.toml", '[watchdog]\ninterval = "500ms"\n[tabbyapi]\nunit = "x.service"\n'
    )
    cfg = load_config(path)
    assert cfg.watchdog.interval == 0.5
    assert cfg.tabbyapi.unit == "x.service"
    assert cfg.source == str(path)


def test_bad_toml_names_the_file_and_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", '[watchdog]\ninterval = "5s\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(path) in str(caught.value)
    assert "not valid TOML" in str(caught.value)
    assert "line 2" in str(caught.value)


def test_unknown_key_in_a_file_is_rejected_with_a_hint(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "[restart_loop]\nmax_restart = 5\n")
    with pytest.raises(ConfigError, match=r"did you mean 'max_restarts'\?") as caught:
        load_config(path)
    assert caught.value.key == "restart_loop.max_restart"


def test_missing_file_says_how_to_point_at_one(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"config file {path} does not exist (pass --config PATH)"


def test_a_directory_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read") as caught:
        load_config(tmp_path)
    assert str(tmp_path) in str(caught.value)


def test_a_file_that_is_not_utf8_cannot_be_read(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[model]\nname = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=f"config file {re.escape(str(path))} cannot be read"):
        load_config(path)
    at = len(b'[model]\nname = "caf')
    with pytest.raises(ConfigError, match=rf"not UTF-8 text \(byte 0xe9 at offset {at}\)"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[watchdog]\nx = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
        ("[model]\nn = " + "{a = " * 3000 + "1" + "}" * 3000 + "\n", "nested too deeply"),
        ("[watchdog]\nevents_kept = " + "9" * 5000 + "\n", "not valid TOML"),
    ],
    ids=["deep arrays", "deep inline tables", "5000-digit integer"],
)
def test_toml_that_tomllib_chokes_on_is_a_config_error(
    tmp_path: Path, text: str, says: str
) -> None:
    # tomllib raises RecursionError or ValueError here, not TOMLDecodeError.
    path = write(tmp_path / "c.toml", text)
    with pytest.raises(ConfigError, match=says) as caught:
        load_config(path)
    assert str(path) in str(caught.value)


def test_deep_dotted_keys_are_refused_with_a_bounded_message(tmp_path: Path) -> None:
    # tomllib parses these fine; the nested value must not break the error message (repr recurses).
    path = write(tmp_path / "c.toml", "[model]\nname" + ".a" * 5000 + " = 1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == "model.name"
    assert len(str(caught.value)) < 1000


def test_a_file_too_large_to_be_a_config_is_refused(tmp_path: Path) -> None:
    big = write(tmp_path / "big.toml", "# padding\n" * 120_000)  # valid TOML, 1.2 MB
    with pytest.raises(ConfigError, match="more than the 1048576 a valid one") as caught:
        load_config(big)
    assert str(big) in str(caught.value)


def test_an_endless_file_is_refused_not_read_forever() -> None:
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config("/dev/zero")


_NOBODY = 65534


def test_an_unreadable_file_is_reported_not_raised(tmp_path: Path) -> None:
    path = write(tmp_path / "secret.toml", "[watchdog]\ndry_run = true\n")
    path.chmod(0)
    as_root = os.geteuid() == 0
    # Root reads any file, so the read is done with an unprivileged effective uid (the saved
    # uid stays 0, which is what lets the finally clause take root back).
    if as_root:
        os.seteuid(_NOBODY)
    try:
        with pytest.raises(ConfigError) as caught:
            load_config(path)
    finally:
        if as_root:
            os.seteuid(0)
    assert str(caught.value).startswith(f"config file {path} cannot be read: ")
    assert "Permission denied" in str(caught.value)


# Whatever a generated or hand-written file holds, parsing ends in a Config or a ConfigError.
_TOML_SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.text(max_size=30),
    st.datetimes(),
    st.dates(),
    st.times(),
)
_TOML_VALUES = st.recursive(
    _TOML_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def arbitrary_tables(draw: st.DrawFn) -> dict[str, object]:
    names = sorted(schema())
    section = draw(st.sampled_from([*names, "gpu.device", "bogus"]))
    if section == "gpu.device":
        keys = sorted(DEVICE_FIELDS)
        table = draw(st.dictionaries(st.sampled_from(keys), _TOML_VALUES, max_size=3))
        return {"gpu": {"device": draw(st.lists(st.just(table) | _TOML_VALUES, max_size=2))}}
    keys = sorted(schema().get(section, {"x": None}))
    key = st.sampled_from(keys) | st.text(max_size=8)
    return {section: draw(st.dictionaries(key, _TOML_VALUES, max_size=4) | _TOML_VALUES)}


@given(arbitrary_tables())
def test_any_input_ends_in_a_config_or_a_config_error(data: dict[str, object]) -> None:
    try:
        cfg = parse_config(data)
    except ConfigError as exc:
        assert str(exc).startswith(f"{exc.key}: ")
        assert exc.key.split(".")[0].split("[")[0] in data
    else:
        assert isinstance(cfg, Config)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=50)
@given(st.binary(max_size=200))
def test_any_file_ends_in_a_config_or_a_config_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "fuzz.toml"
    path.write_bytes(content)
    try:
        load_config(path)
    except ConfigError as exc:
        assert str(exc)


# --- rendering ----------------------------------------------------------------------------------


def round_trip(cfg: Config) -> Config:
    return parse_config(tomllib.loads(render_config(cfg)), source=cfg.source)


def test_defaults_render_and_parse_back_equal() -> None:
    assert round_trip(Config()) == Config()


def test_example_renders_and_parses_back_equal() -> None:
    cfg = load_config(EXAMPLE)
    text = render_config(cfg)
    assert text.startswith(f"# effective configuration from {EXAMPLE}\n")
    assert 'interval = "5s"' in text
    assert text.count("[[gpu.device]]") == 2
    assert "# uuid = (unset)" in text
    assert round_trip(cfg) == cfg


def test_devices_by_uuid_and_odd_strings_render_back_equal() -> None:
    cfg = parse_config(
        {
            "model": {"name": 'a "quoted"\\ name with \u00e9', "fallback": "small"},
            "tabbyapi": {"cmdline_patterns": ["/opt/tabbyapi", '/srv/odd "dir" x']},
            "gpu": {"device": [{"uuid": "GPU-abc", "power_limit_watts": 287.5}, {"index": 3}]},
            "orphans": {"term_grace": 0.0015},
        },
        source="/etc/odd\nname.toml",
    )
    assert round_trip(cfg) == cfg


@pytest.mark.parametrize(
    ("section", "url", "secrets"),
    [
        ("tabbyapi", "http://opsuser:s3cret-pw@127.0.0.1:5000/", ["opsuser", "s3cret-pw"]),
        ("tabbyapi", "http://127.0.0.1:5000/?admin_key=sk-live-42", ["sk-live-42"]),
        ("tabbyapi", "http://127.0.0.1:5000/#frag", []),
        ("tabbyapi", "http://127.0.0.1:5000?", []),
        (
            "fallback_route",
            "https://alice:hunter2@127.0.0.1:4000/v1?api_key=sk-live-42",
            ["alice", "hunter2", "sk-live-42"],
        ),
        ("fallback_route", "http://127.0.0.1:4000/?token=abc123", ["abc123"]),
        ("fallback_route", "http://@127.0.0.1:4000/", []),
    ],
)
def test_urls_with_user_info_query_or_fragment_are_refused_without_echoing_secrets(
    section: str, url: str, secrets: list[str]
) -> None:
    # They would be sent on every probe and shown in status; the error lands in the journal.
    with pytest.raises(ConfigError) as caught:
        parse_config({section: {"url": url}})
    assert caught.value.key == f"{section}.url"
    message = str(caught.value)
    assert "user info, a query or a fragment" in message
    for secret in secrets:
        assert secret not in message


def test_redact_url_leaves_plain_urls_alone() -> None:
    assert redact_url("") == ""
    assert redact_url("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert redact_url("http://[::1]:5000/v1") == "http://[::1]:5000/v1"


# Valid raw values for each field kind; an unknown kind fails here, so a new kind gets a strategy.
_UNITS = ["ms", "s", "m", "h", "d"]
_LOOPBACK_HOSTS = ["127.0.0.1", "127.8.9.10", "localhost", "[::1]"]


def _url(hosts: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A base URL: a host, maybe a port, maybe a trailing "/" (a path is refused)."""
    port = st.none() | st.integers(min_value=1, max_value=65535)
    return st.builds(
        lambda host, p, slash: f"http://{host}{'' if p is None else f':{p}'}{slash}",
        hosts,
        port,
        st.sampled_from(["", "/"]),
    )


_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _duration(lo: float, hi: float) -> st.SearchStrategy[object]:
    def text(unit: str) -> st.SearchStrategy[str]:
        size = _UNIT_SECONDS[unit]
        counts = st.integers(math.ceil(lo / size), math.floor(hi / size))
        return counts.map(lambda n: f"{n}{unit}")

    fitting = [u for u in _UNITS if math.ceil(lo / _UNIT_SECONDS[u]) <= hi / _UNIT_SECONDS[u]]
    return st.one_of(
        st.floats(min_value=lo, max_value=hi, allow_nan=False),
        st.integers(min_value=math.ceil(lo), max_value=math.floor(hi)),
        st.sampled_from(fitting).flatmap(text).filter(lambda t: lo <= parse_duration(t) <= hi),
    )


# Printable text: every string kind refuses control characters.
_TEXT = st.text(alphabet=st.characters(exclude_categories=("Cc", "Cs")), max_size=20)
_UNIT_CHARS = string.ascii_letters + string.digits + ":_.\\-"
_UNIT_PART = st.text(alphabet=_UNIT_CHARS, min_size=1, max_size=8)
_HOST_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?", fullmatch=True)


def raw_value(meta: Mapping[str, Any]) -> st.SearchStrategy[Any]:
    kind, lo = meta["kind"], meta.get("min", 0)
    hi_int, hi_float = meta.get("max", 10**9), meta.get("max", 1e9)
    path = _TEXT.map(lambda t: "/" + t)
    strategies: dict[str, st.SearchStrategy[Any]] = {
        "bool": st.booleans(),
        "int": st.integers(min_value=lo, max_value=hi_int),
        "optional_int": st.integers(min_value=lo, max_value=hi_int),
        "float": st.floats(min_value=lo, max_value=hi_float, allow_nan=False)
        | st.integers(math.ceil(lo), math.floor(hi_float)),
        "optional_float": st.floats(min_value=lo, max_value=hi_float, allow_nan=False),
        "str": _TEXT,
        "optional_str": _TEXT,
        "model_name": _TEXT.filter(lambda t: "/" not in t and t not in (".", "..")),
        "path": path,
        "path_or_empty": st.just("") | path,
        "unit": st.builds(
            lambda name, instance: f"{name}{instance}.service",
            _UNIT_PART.filter(lambda t: not t.startswith("-")),
            st.just("") | _UNIT_PART.map(lambda t: "@" + t),
        ),
        "install_dirs": st.lists(
            st.lists(st.text(alphabet="abz-_.", min_size=1, max_size=6), min_size=1, max_size=3)
            .map(lambda parts: "/" + "/".join(parts))
            .filter(lambda p: p == posixpath.normpath(p) and p != "/"),
            min_size=1,
            max_size=3,
        ),
        "user": st.sampled_from(["root", "nobody", "65534", "0"]),  # users that exist here
        "str_list": st.lists(
            st.text(min_size=1, max_size=10), min_size=1 if meta.get("nonempty") else 0, max_size=3
        ),
        "local_url": _url(st.sampled_from(_LOOPBACK_HOSTS)),
        "url_or_empty": st.just("")
        | _url(st.sampled_from([*_LOOPBACK_HOSTS, "litellm.internal", "198.51.100.7"])),
        "listen_or_empty": st.just("")
        | st.builds(
            lambda host, port: f"{host}:{port}",
            st.sampled_from(["127.0.0.1", "0.0.0.0", "[::1]", "localhost"])
            | st.lists(_HOST_LABEL, min_size=1, max_size=3).map(".".join),
            st.integers(1, 65535),
        ),
    }
    if kind == "duration":
        return _duration(lo, meta.get("max", MAX_DURATION))
    if kind not in strategies:
        raise AssertionError(f"test_config has no strategy for field kind {kind!r}")
    return strategies[kind]


def _device_identity(table: Mapping[str, object]) -> tuple[str, object]:
    return ("index", table["index"]) if "index" in table else ("uuid", table["uuid"])


def device_tables() -> st.SearchStrategy[list[dict[str, object]]]:
    ident = st.one_of(
        st.fixed_dictionaries({"index": raw_value(DEVICE_FIELDS["index"].metadata)}),
        st.fixed_dictionaries({"uuid": raw_value(DEVICE_FIELDS["uuid"].metadata)}),
    )
    power = st.fixed_dictionaries(
        {}, optional={"power_limit_watts": raw_value(DEVICE_FIELDS["power_limit_watts"].metadata)}
    )
    table = st.builds(lambda a, b: {**a, **b}, ident, power)
    return st.lists(table, max_size=3, unique_by=_device_identity)


def valid_tables() -> st.SearchStrategy[dict[str, dict[str, object]]]:
    sections = {}
    for scope, fields in schema().items():
        optional = {
            key: device_tables() if f.metadata["kind"] == "devices" else raw_value(f.metadata)
            for key, f in fields.items()
        }
        sections[scope] = st.fixed_dictionaries({}, optional=optional)
    return st.fixed_dictionaries({}, optional=sections)


@given(valid_tables())
def test_render_of_any_valid_config_parses_back_equal(data: dict[str, dict[str, object]]) -> None:
    try:
        cfg = parse_config(data)
    except ConfigError as exc:
        # Only the rules that relate two keys may reject a draw; any other rejection means the
        # schema refuses a value its own kind accepts.
        assert exc.key in CROSS_KEYS, str(exc)
        reject()
    assert round_trip(cfg) == cfg


def _every_key() -> Iterator[str]:
    for scope, fields in scoped_schema().items():
        for key in fields:
            yield f"{scope}.{key}"


def test_the_public_keys_of_the_issue_exist() -> None:
    public = {
        "watchdog.interval",
        "watchdog.state_dir",
        "watchdog.dry_run",
        "tabbyapi.url",
        "tabbyapi.unit",
        "tabbyapi.admin_key_file",
        "tabbyapi.health_timeout",
        "tabbyapi.slow_threshold",
        "tabbyapi.failures_before_down",
        "tabbyapi.startup_grace",
        "tabbyapi.canary_interval",
        "tabbyapi.canary_deadline",
        "tabbyapi.venv",
        "tabbyapi.cmdline_patterns",
        "tabbyapi.user",
        "model.name",
        "model.models_dir",
        "model.vram_required_gib",
        "model.load_timeout",
        "model.fallback",
        "restart_loop.max_restarts",
        "restart_loop.window",
        "restart_loop.backoff_initial",
        "restart_loop.backoff_max",
        "restart_loop.reset_after",
        "restart_loop.escalate_after",
        "gpu.nvml_library",
        "gpu.device",
        "gpu.device.index",
        "gpu.device.uuid",
        "gpu.device.power_limit_watts",
        "orphans.enabled",
        "orphans.term_grace",
        "gpu_reset.enabled",
        "fallback_route.url",
        "fallback_route.model",
        "metrics.listen",
    }
    assert public <= set(_every_key())


def test_datetime_values_are_rejected_as_the_wrong_type() -> None:
    when = datetime.datetime(2025, 12, 19, 12, 0)
    with pytest.raises(ConfigError) as caught:
        parse_config({"watchdog": {"interval": when}})
    assert caught.value.key == "watchdog.interval"
    assert DURATION_ACCEPTED in str(caught.value)
