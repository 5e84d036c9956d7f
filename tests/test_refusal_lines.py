"""Every line a refusal prints fits in 100 columns (the project's voice), whatever it quotes.

Each config of the refusal tables in tests/test_config.py (INVALID, UNSAFE, QUOTED) is written as
a TOML file and handed to the real `hydra-watchdog check-config` and `run` entry points (cli.main);
the trusted-directory refusals (every rule of trusted_path) and an unusable key file go through
`run`. What is printed must keep the key, the value and what is accepted: only the lines change.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hydra_watchdog.cli import main
from hydra_watchdog.config import ConfigError, load_config
from tests.harness.adversary import NOBODY, public_dir
from tests.test_config import INVALID, QUOTED, UNSAFE

WIDTH = 100
EX_CONFIG = 78
ROWS: list[tuple[str, dict[str, Any]]] = [
    *((row[0], row[1]) for row in INVALID),
    *((row[0], row[1]) for row in UNSAFE),
    *QUOTED,
]


def toml_string(text: str) -> str:
    # JSON's escapes are TOML's; DEL is the one control character JSON leaves as it is.
    return json.dumps(text, ensure_ascii=True).replace("\x7f", "\\u007f")


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        pairs = (f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items())
        return "{" + ", ".join(pairs) + "}"
    raise TypeError(f"no TOML for {value!r}")


def _pairs(table: dict[str, Any]) -> str:
    return "".join(f"{toml_string(k)} = {toml_value(v)}\n" for k, v in table.items())


def toml_text(data: dict[str, Any]) -> str:
    """`data` as a TOML file: each section a table, nested values inline."""
    plain = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    return _pairs(plain) + "".join(f"[{toml_string(k)}]\n{_pairs(v)}" for k, v in tables.items())


@contextlib.contextmanager
def deeper_recursion() -> Iterator[None]:
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def printed(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    code = main(list(argv))
    return code, capsys.readouterr().err.splitlines()


def unwrapped(lines: list[str]) -> str:
    return " ".join(line.strip() for line in lines)


def check_lines(lines: list[str]) -> None:
    assert lines, "nothing printed"
    long = [f"{len(line)}: {line}" for line in lines if len(line) > WIDTH]
    assert not long, "\n".join(long)


@pytest.mark.parametrize(("data"), [row[1] for row in ROWS], ids=[row[0] for row in ROWS])
@pytest.mark.parametrize("command", ["check-config", "run"])
def test_every_config_refusal_fits_in_100_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data: dict[str, Any], command: str
) -> None:
    with deeper_recursion():  # a row nests 3,000 levels deep
        text = toml_text(data)
    # The file says what the row says (nan too); where tomllib cannot read it for its depth,
    # load_config refuses it as nested too deeply: a refusal all the same.
    with contextlib.suppress(RecursionError):
        assert repr(tomllib.loads(text)) == repr(data)
    config = tmp_path / "config.toml"
    config.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    code, lines = printed(capsys, command, "--config", str(config))
    assert code == EX_CONFIG
    check_lines(lines)
    assert lines[0].startswith("hydra-watchdog: config error:")
    said = unwrapped(lines)
    assert caught.value.key in said  # the key, the value and what is accepted: all still said
    assert said.endswith(str(caught.value)[-20:].strip())


@pytest.fixture
def top() -> Iterator[Path]:
    """A root-owned folder every user can reach (pytest's tmp_path is root's alone)."""
    with public_dir() as path:
        yield path


def _dir(path: Path, mode: int, uid: int = 0) -> Path:
    path.mkdir(parents=True)
    path.chmod(mode)
    os.chown(path, uid, uid)
    return path


def _untrusted(top: Path, case: str) -> tuple[str, Path]:
    """(the key, the directory it names) that breaks trusted_path's rule in the way `case` says;
    the path is long, as a real one may be."""
    deep = top / ("a-rather-long-folder-name-" * 3).rstrip("-") / "and-another-one-below-it"
    if case == "parent writable":
        return "state_dir", _dir(deep / "shared", 0o777) / "state"
    if case == "parent of another user":
        return "runtime_dir", _dir(deep / "theirs", 0o755, NOBODY) / "run"
    if case == "not private":
        return "state_dir", _dir(deep / "state", 0o755)
    if case == "a symlink":
        _dir(deep / "real", 0o700)
        (deep / "link").symlink_to(deep / "real")
        return "state_dir", deep / "link"
    if case == "a file":
        _dir(deep, 0o755)
        (deep / "file").write_text("")
        return "runtime_dir", deep / "file"
    if case == "a path longer than a line":
        return "state_dir", _dir(deep / ("x" * 120) / "shared", 0o777) / "state"
    raise AssertionError(case)


CASES = [
    "parent writable",
    "parent of another user",
    "not private",
    "a symlink",
    "a file",
    "a path longer than a line",
]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to uid 65534")
@pytest.mark.parametrize("case", CASES)
def test_every_untrusted_directory_refusal_fits_in_100_columns(
    top: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    key, path = _untrusted(top, case)
    dirs = {"state_dir": top / "state", "runtime_dir": top / "run", key: path}
    config = top / "config.toml"
    config.write_text(toml_text({"watchdog": {k: str(v) for k, v in dirs.items()}}))
    code, lines = printed(capsys, "run", "--config", str(config))
    assert code == EX_CONFIG
    check_lines(lines)
    assert lines[0].startswith("hydra-watchdog: refusing to start:")
    said = unwrapped(lines)
    assert key.replace("_", " ") in said


def test_an_unusable_key_file_refusal_fits_in_100_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / ("a-key-folder-with-a-long-name-" * 2) / "admin_key"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    config = tmp_path / "config.toml"
    config.write_text(
        f'[watchdog]\nstate_dir = "{tmp_path}/state"\nruntime_dir = "{tmp_path}/run"\n'
        f'[tabbyapi]\nadmin_key_file = "{fifo}"\n'
    )
    code, lines = printed(capsys, "run", "--config", str(config))
    assert code == EX_CONFIG
    check_lines(lines)
    assert "tabbyapi.admin_key_file" in unwrapped(lines)
