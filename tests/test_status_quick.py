"""`status`'s quick path (report/status_quick.py) prints exactly what the full path prints, for
the same files and the same clock, or leaves the answer to it (returns None, prints nothing).
Real files, a real stand-in daemon process, the daemon's own writer."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hydra_watchdog import cli, config
from hydra_watchdog.config import load_config
from hydra_watchdog.events import Event, EventKind
from hydra_watchdog.jsonable import to_jsonable
from hydra_watchdog.policy_state import Finding, PolicyState
from hydra_watchdog.report import status, status_file
from hydra_watchdog.report import status_quick as quick
from hydra_watchdog.report.status import build_status, from_json, process_start
from hydra_watchdog.report.status_file import mark_stopped, write_status
from hydra_watchdog.report.status_view import UNKNOWN, VERDICT_NAMES
from hydra_watchdog.states import Phase, Rule, Severity, Verdict

NOW = time.time()


@pytest.fixture
def standin() -> Iterator[int]:
    """A live process whose command line names hydra_watchdog: the daemon, for /proc."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "hydra_watchdog"]
    )
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def node(tmp_path: Path) -> Path:
    """A config file as an operator writes one; returns its path."""
    path = tmp_path / "config.toml"
    path.write_text(
        "# the node's watchdog\n[watchdog]\n"
        f'state_dir = "{tmp_path / "state"}"\nruntime_dir = "{tmp_path / "run"}"  # tmpfs\n'
        'interval = "2s"\n\n[tabbyapi]\ncanary_deadline = "40s"\n'
    )
    return path


def publish(path: Path, pid: int, *, age: float = 0.0, phase: Phase = Phase.DEGRADED) -> None:
    """What the daemon writes after a cycle, with every kind of entry the text shows."""
    cfg = load_config(path)
    finding = Finding(Rule.SLOW_HEALTH, Severity.WARNING, "slow as molasses")
    event = Event(
        NOW - 30,
        EventKind.ACTION,
        Severity.NOTICE,
        "restarted",
        Phase.DOWN,
        Rule.DOWN,
        action="restart",
        reason="3 failed probes",
    )
    state = PolicyState(phase=phase, phase_since=time.monotonic() - 90, findings=(finding,))
    report = build_status(
        state,
        None,
        cfg,
        [event],
        wall_now=NOW - age,
        mono_now=time.monotonic(),
        pid=pid,
        pid_start=process_start(pid),
    )
    report = dataclasses.replace(
        report,
        heartbeat=NOW - age,
        health=status.HealthInfo("ok", True, 200, 2.5, ""),
        gpus=(status.GpuInfo(0, "GPU-x", "RTX", 5 * 2**30, 2**30, 6 * 2**30, 300, 250.0),),
        load=status.LoadInfo("big-model", NOW - 20, NOW + 100, 3, 80),
        backoff=status.BackoffInfo(step=2, next_attempt_at=NOW + 12, window_s=600),
    )
    write_status(cfg.watchdog.runtime_dir, report)


def full(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    args = cli.build_parser("status").parse_args(["status", *argv])
    args.now = NOW
    code = cli.cmd_status(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def fast(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int | None, str, str]:
    code = quick.quick_status(argv, now=NOW)
    out = capsys.readouterr()
    return code, out.out, out.err


# --- the same answer ----------------------------------------------------------------------------


@pytest.mark.parametrize("as_json", [False, True])
@pytest.mark.parametrize("case", ["fresh", "healthy", "stale", "future", "stopped", "pid_gone"])
def test_the_quick_path_prints_what_the_full_path_prints(
    node: Path, standin: int, capsys: pytest.CaptureFixture[str], case: str, as_json: bool
) -> None:
    pid = standin
    if case == "pid_gone":
        dead = subprocess.Popen([sys.executable, "-c", "pass", "hydra_watchdog"])
        dead.wait()
        pid = dead.pid
    age = {"stale": 600.0, "future": -3600.0}.get(case, 0.0)
    publish(node, pid, age=age, phase=Phase.HEALTHY if case == "healthy" else Phase.DEGRADED)
    if case == "stopped":
        mark_stopped(load_config(node).watchdog.runtime_dir, wall=NOW - 5, pid=pid)
    argv = ["--config", str(node), *(["--json"] if as_json else [])]
    quick_answer = fast(argv, capsys)
    assert quick_answer[0] is not None, "the quick path must answer a plain, matching report"
    assert quick_answer == full(argv, capsys)
    assert quick_answer[1].startswith(
        "{" if as_json else {"healthy": "OK", "fresh": "WARNING"}.get(case, "UNKNOWN")
    )


def test_an_explicit_runtime_dir_and_config_equals_form_are_answered_alike(
    node: Path, standin: int, capsys: pytest.CaptureFixture[str]
) -> None:
    publish(node, standin)
    run = load_config(node).watchdog.runtime_dir
    argv = [f"--config={node}", "--runtime-dir", run]
    answer = fast(argv, capsys)
    assert answer[0] == 1
    assert answer == full(argv, capsys)


# --- or no answer at all ------------------------------------------------------------------------


def _hostile(run: Path, name: str) -> None:
    """Replace the status file with something the full path must judge."""
    doc = json.loads((run / "status.json").read_text())
    target = run / "status.json"
    target.unlink()
    bad: dict[str, Any] = {
        "not_json": "{not json",
        "nan": json.dumps({**doc, "heartbeat": "NaN"}).replace('"NaN"', "NaN"),
        "huge": json.dumps({**doc, "pid": 10**30}),
        "bool_pid": json.dumps({**doc, "pid": True}),
        "bad_phase": json.dumps({**doc, "phase": "exploded"}),
        "string_errors": json.dumps({**doc, "gpus": [{**doc["gpus"][0], "errors": "oops"}]}),
        "list_health": json.dumps({**doc, "health": ["ok", True, 200, 0.1, ""]}),
        "surrogate": json.dumps({**doc, "summary": "x"}).replace('"x"', '"\\ud800"'),
        "future_schema": json.dumps({**doc, "schema": 2}),
        "deep": "[" * 100_000 + "]" * 100_000,
        "array": "[]",
    }
    if name == "missing":
        return
    if name == "directory":
        target.mkdir()
    elif name == "symlink":
        (run / "elsewhere.json").write_text(json.dumps(doc))
        target.symlink_to(run / "elsewhere.json")
    elif name == "fifo":
        os.mkfifo(target)
    else:
        target.write_text(bad[name])


@pytest.mark.parametrize(
    "name",
    [
        "missing",
        "directory",
        "symlink",
        "fifo",
        "not_json",
        "nan",
        "huge",
        "bool_pid",
        "bad_phase",
        "string_errors",
        "list_health",
        "surrogate",
        "future_schema",
        "deep",
        "array",
    ],
)
def test_an_unusual_status_file_is_left_to_the_full_path(
    node: Path, standin: int, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    publish(node, standin)
    _hostile(Path(load_config(node).watchdog.runtime_dir), name)
    assert fast(["--config", str(node)], capsys) == (None, "", "")
    code, out, _ = full(["--config", str(node)], capsys)
    if name in ("string_errors", "list_health"):  # odd forms the full reader still accepts
        assert code == 1 and out.startswith("WARNING: degraded")
    else:
        assert code == 3 and out.startswith("UNKNOWN: ")


def test_an_edited_or_broken_config_is_read_by_the_full_path(
    node: Path, standin: int, capsys: pytest.CaptureFixture[str]
) -> None:
    publish(node, standin)
    # a valid edit the daemon has not loaded: its published stale_after may no longer hold
    node.write_text(node.read_text().replace('"2s"', '"1s"'))
    assert fast(["--config", str(node)], capsys) == (None, "", "")
    # an invalid one: the full path says so and falls back to the defaults, as it always did
    node.write_text(node.read_text() + "\n[watchdog.nonsense]\n")
    assert fast(["--config", str(node)], capsys) == (None, "", "")
    code, out, err = full(["--config", str(node)], capsys)
    assert code == 3 and "no status file /run/hydra-watchdog/status.json" in out
    assert "(config not read:" in err


def test_another_version_or_a_config_without_a_digest_is_left_to_the_full_path(
    node: Path, standin: int, capsys: pytest.CaptureFixture[str]
) -> None:
    publish(node, standin)
    path = Path(load_config(node).watchdog.runtime_dir) / "status.json"
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "version": "0.0.1"}))
    assert fast(["--config", str(node)], capsys) == (None, "", "")
    path.write_text(json.dumps({**doc, "config_sha256": ""}))
    assert fast(["--config", str(node)], capsys) == (None, "", "")


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["-h"], ["--conf", "x"], ["--json", "--json"], ["--config"], ["--bogus"]],
)
def test_other_command_lines_are_left_to_argparse(
    node: Path, standin: int, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    publish(node, standin)
    argv = [a.replace("x", str(node)) if a == "x" else a for a in argv]
    assert fast(argv, capsys) == (None, "", "")


def test_main_falls_back_to_argparse_with_its_help_and_errors() -> None:
    probe = "import sys; from hydra_watchdog.cli import main; sys.exit(main(sys.argv[1:]))"
    run = [sys.executable, "-c", probe, "status"]
    helped = subprocess.run([*run, "--help"], capture_output=True, text=True, check=False)
    assert helped.returncode == 0 and "--runtime-dir" in helped.stdout
    wrong = subprocess.run([*run, "--bogus"], capture_output=True, text=True, check=False)
    assert wrong.returncode == 2 and "unrecognized arguments: --bogus" in wrong.stderr


# --- the quick path's copies stay equal to what they copy ---------------------------------------


def _kind(tp: Any) -> str:
    args = typing.get_args(tp)
    if type(None) in args:
        return _kind(next(a for a in args if a is not type(None))) + "?"
    if typing.get_origin(tp) is tuple:
        return _kind(args[0]) + "*"
    named: str = {Phase: "phase", Verdict: "verdict"}.get(tp, tp.__name__)
    return named


def test_the_schema_table_is_the_dataclasses() -> None:
    records = {
        name: cls
        for name, cls in vars(status).items()
        if isinstance(cls, type)
        and dataclasses.is_dataclass(cls)
        and cls.__module__ == status.__name__
    }
    assert set(quick.SCHEMA) == set(records)
    for name, cls in records.items():
        hints = typing.get_type_hints(cls)
        table = [(f, k) for f, k, _ in quick.SCHEMA[name]]
        assert table == [(f.name, _kind(hints[f.name])) for f in dataclasses.fields(cls)], name
        assert quick.normalize(name, {}) == to_jsonable(cls()), name


def test_the_constants_are_the_modules_constants() -> None:
    assert str(config.DEFAULT_CONFIG_PATH) == quick.DEFAULT_CONFIG_PATH
    assert config.WatchdogSection().runtime_dir == quick.DEFAULT_RUNTIME_DIR
    assert quick.MAX_CONFIG_BYTES == config.MAX_CONFIG_BYTES
    assert quick.STATUS_FILE == status_file.STATUS_FILE
    assert quick.STATUS_MAX_BYTES == status_file.STATUS_MAX_BYTES
    assert quick.SCHEMA_VERSION == status.SCHEMA_VERSION
    assert cli.EX_CONFIG == config.EX_CONFIG
    # the enums' values, which status_view and the quick path hold as plain strings and ints
    assert frozenset(p.value for p in Phase) == quick.PHASES
    assert tuple(v.name for v in sorted(Verdict)) == VERDICT_NAMES
    assert [int(v) for v in sorted(Verdict)] == list(range(len(VERDICT_NAMES)))
    assert Verdict.UNKNOWN == UNKNOWN


def test_normalize_agrees_with_the_full_reader(node: Path, standin: int) -> None:
    """Whatever the quick reader accepts, the full reader accepts and writes back the same."""
    publish(node, standin)
    raw = (Path(load_config(node).watchdog.runtime_dir) / "status.json").read_bytes()
    doc = json.loads(raw)
    variants = [
        doc,
        {k: v for k, v in doc.items() if k not in ("model", "backoff", "gpus", "health")},
        {**doc, "unknown_field": [1, 2], "pid_start": None, "generated_at": 7},
        {**doc, "health": {"outcome": "timeout", "latency_s": 5}},
    ]
    for variant in variants:
        text = json.dumps(variant).encode()
        assert quick.parse_report(text) == to_jsonable(from_json(text))


@pytest.mark.parametrize(
    ("config_text", "expected"),
    [
        ("[watchdog]\ninterval = 5\n", quick.DEFAULT_RUNTIME_DIR),
        ('[watchdog]\nruntime_dir = "/run/x"  # ok\n', "/run/x"),
        ('[watchdog]\n  runtime_dir   =  "/run/y"\n', "/run/y"),
    ],
)
def test_the_runtime_dir_guess(config_text: str, expected: str) -> None:
    assert quick.guess_runtime_dir(config_text.encode()) == expected


@pytest.mark.parametrize(
    "config_text",
    [
        '[watchdog]\nruntime_dir = "/a"\n[x]\nruntime_dir = "/b"\n',  # two: which one?
        "[watchdog]\nruntime_dir = '/literal'\n",  # not the simple form
        '[watchdog]\nruntime_dir = "/run/\\u0078"\n',  # an escape
    ],
)
def test_the_runtime_dir_guess_gives_up_when_unsure(config_text: str) -> None:
    with pytest.raises(quick.UnusualError):
        quick.guess_runtime_dir(config_text.encode())


# --- the JSON reader: json's C scanner without the json package -----------------------------------


def _json_loads(text: bytes) -> Any:
    """The reference: json.loads, refusing NaN and Infinity as the quick path does."""

    def refuse(name: str) -> Any:
        raise ValueError(name)

    return json.loads(text, parse_constant=refuse)


def _agrees(text: bytes) -> None:
    try:
        expected = _json_loads(text)
    except (ValueError, RecursionError):
        with pytest.raises(quick.UnusualError):
            quick.loads(text)
        return
    try:
        got = quick.loads(text)
    except quick.UnusualError:
        # stricter is allowed (the full path then answers); only for what UTF-8 cannot say
        assert text.decode("utf-8", "replace").startswith("\ufeff") or not _utf8(text)
        return
    assert got == expected and type(got) is type(expected)


def _utf8(text: bytes) -> bool:
    try:
        text.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_JSON_VALUES, st.sampled_from(["", " ", "\n", "\t\r\n "]), st.booleans())
def test_loads_reads_what_json_loads_reads(value: Any, space: str, ascii_only: bool) -> None:
    text = (space + json.dumps(value, ensure_ascii=ascii_only) + space).encode()
    assert quick.loads(text) == json.loads(text)
    _agrees(text)


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"   ",
        b"{not json",
        b'{"a": 1} trailing',
        b'{"a": 1}{"b": 2}',
        b'{"a": NaN}',
        b"[Infinity]",
        b"-Infinity",
        b'{"a": 1,}',
        b"[1 2]",
        b'"\\x"',
        b'"\\ud800"',
        b'"a\tb"',  # a raw control character inside a string: strict JSON refuses it
        b"\xef\xbb\xbf{}",  # a UTF-8 byte-order mark
        b'{"a": "\xff"}',  # not UTF-8
        b"1" * 5000,  # past int's digit limit
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a": 1, "a": 2}',
        b"\x0c{}",  # a form feed is not JSON whitespace
    ],
)
def test_loads_refuses_what_json_loads_refuses(text: bytes) -> None:
    _agrees(text)


def test_loads_refuses_malformed_json_without_the_json_package() -> None:
    """The C scanner reports a syntax error through json.decoder; while that is not imported,
    Python 3.11's raises SystemError instead. Either way the quick path defers, importing
    nothing."""
    probe = (
        "import sys\n"
        "from hydra_watchdog.report import status_quick as q\n"
        "for text in (b'{not json', b'[1,', b'{\"a\": NaN}', b'{} x'):\n"
        "    try:\n"
        "        q.loads(text)\n"
        "    except q.UnusualError:\n"
        "        pass\n"
        "    else:\n"
        "        raise SystemExit(f'accepted {text!r}')\n"
        "print(q.loads(b' {\"ok\": [1, 2.5, null]} '))\n"
        "print(sorted(m for m in ('json', 'json.decoder', 're', 'enum') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()
    assert out == ["{'ok': [1, 2.5, None]}", "[]"]


# The guess's reference: the pattern it replaced (re costs `status` its import).
_RUNTIME_DIR_RE = re.compile(
    rb'^[ \t]*runtime_dir[ \t]*=[ \t]*"([^"\\\n]*)"[ \t]*(?:#[^\n]*)?$', re.M
)
_LINE_PARTS = st.lists(
    st.sampled_from(
        [" ", "\t", "runtime_dir", "runtime_dirs", "x", "=", '"', "/run/a", "\\", "#", "\r", "'"]
    ),
    max_size=9,
).map("".join)


@settings(max_examples=400, deadline=None)
@given(st.lists(_LINE_PARTS, min_size=1, max_size=4))
def test_the_runtime_dir_guess_finds_what_the_pattern_finds(lines: list[str]) -> None:
    config_bytes = "\n".join(lines).encode()
    if b"runtime_dir" not in config_bytes:
        assert quick.guess_runtime_dir(config_bytes) == quick.DEFAULT_RUNTIME_DIR
        return
    found = _RUNTIME_DIR_RE.findall(config_bytes)
    if len(found) == 1:
        assert quick.guess_runtime_dir(config_bytes) == found[0].decode()
    else:
        with pytest.raises(quick.UnusualError):
            quick.guess_runtime_dir(config_bytes)


def test_a_runtime_dir_that_is_not_utf8_is_left_to_the_full_path() -> None:
    with pytest.raises(quick.UnusualError):
        quick.guess_runtime_dir(b'[watchdog]\nruntime_dir = "/run/\xff"\n')
