"""Durations as users write them: every unit, bad values, and exact format/parse round trips."""

from __future__ import annotations

import math
import re
from fractions import Fraction

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from hydra_watchdog.durations import ACCEPTED, format_duration, parse_duration

UNIT_SECONDS = {"ms": Fraction(1, 1000), "s": Fraction(1), "m": Fraction(60), "h": Fraction(3600)}
UNIT_SECONDS["d"] = Fraction(86400)
# What format_duration may emit: the unit grammar parse_duration accepts, without exponents.
FORMATTED = re.compile(r"^\d+(\.\d+)?(ms|s|m|h|d)$")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("5s", 5.0),
        ("10m", 600.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("0s", 0.0),
        ("0ms", 0.0),
        ("1.5h", 5400.0),
        ("2.5s", 2.5),
        ("250.5ms", 0.2505),
        (" 5 s ", 5.0),
        ("30", 30.0),
        ("0.25", 0.25),
    ],
)
def test_every_unit_and_plain_seconds_string(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-12, abs=0)


@pytest.mark.parametrize(("value", "seconds"), [(5, 5.0), (0, 0.0), (2.5, 2.5), (86400, 86400.0)])
def test_numbers_are_seconds(value: float, seconds: float) -> None:
    result = parse_duration(value)
    assert result == seconds
    assert isinstance(result, float)


@given(n=st.integers(min_value=0, max_value=10**9), unit=st.sampled_from(sorted(UNIT_SECONDS)))
def test_integer_count_of_each_unit(n: int, unit: str) -> None:
    # The float nearest to the exact value: no rounding error from the unit's size.
    assert parse_duration(f"{n}{unit}") == float(n * UNIT_SECONDS[unit])


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "abc",
        "5x",
        "5 minutes",
        "5sec",
        "5S",
        "ms",
        "s5",
        "-5s",
        "-1",
        "1.s",
        ".5s",
        "5s5",
        "inf",
        "nan",
        "-inf",
        "1e400",
        "1" + "0" * 400 + "s",
        -1,
        -0.5,
        float("inf"),
        float("-inf"),
        float("nan"),
        10**400,
        True,
        False,
        None,
        [5],
        {"s": 5},
        b"5s",
        # Only ASCII digits and the unit grammar: Python's int()/float()/\\d take these too.
        "\u0661\u0662s",  # Arabic-Indic "12s"
        "\u0661\u0662",
        "\uff15s",  # fullwidth 5
        "\u0967\u0966m",  # Devanagari "10m"
        "1e3",
        "1_000",
        "+5s",
        ".5",
        "5.",
        "5\u00a0s",  # no-break space
        "\u20035s",  # em space
    ],
    ids=lambda v: ascii(v)[:24],
)
def test_bad_values_raise_valueerror_saying_what_is_accepted(value: object) -> None:
    with pytest.raises(ValueError, match=re.escape(ACCEPTED)):
        parse_duration(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.5, "500ms"),
        (0.001, "1ms"),
        (0.007, "7ms"),
        (5.0, "5s"),
        (90.0, "90s"),
        (600.0, "10m"),
        (5400.0, "90m"),
        (3600.0, "1h"),
        (7200.0, "2h"),
        (86400.0, "1d"),
        (172800.0, "2d"),
        (1.5, "1.5s"),
        (0.0015, "0.0015s"),
        (1e-7, "0.0000001s"),
        (1234567.5, "1234567.5s"),
    ],
)
def test_format_picks_the_largest_whole_unit(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.floats(min_value=0, allow_nan=False, allow_infinity=False))
def test_format_parse_round_trip_is_exact(seconds: float) -> None:
    text = format_duration(seconds)
    assert FORMATTED.match(text), text
    assert parse_duration(text) == seconds


@given(n=st.integers(min_value=1, max_value=10**6), unit=st.sampled_from(["d", "h", "m", "s"]))
def test_whole_units_format_back_to_themselves(n: int, unit: str) -> None:
    # n of a unit formats as n of that unit unless n is itself a whole count of a larger one.
    larger = {"s": 60, "m": 60, "h": 24, "d": math.inf}[unit]
    assume(n % larger != 0 if larger != math.inf else True)
    assert format_duration(parse_duration(f"{n}{unit}")) == f"{n}{unit}"


@given(st.integers(min_value=1, max_value=999))
def test_every_whole_millisecond_below_a_second_formats_as_ms(ms: int) -> None:
    assert parse_duration(f"{ms}ms") == ms / 1000
    assert format_duration(ms / 1000) == f"{ms}ms"


@given(text=st.builds(lambda n, u: f"{n}{u}", st.integers(0, 10**7), st.sampled_from(["ms", "s"])))
def test_parse_format_parse_is_stable(text: str) -> None:
    seconds = parse_duration(text)
    assert parse_duration(format_duration(seconds)) == seconds


@given(
    digits=st.text(alphabet=st.characters(categories=["Nd"]), min_size=1, max_size=4),
    unit=st.sampled_from(["", *sorted(UNIT_SECONDS)]),
)
def test_only_ascii_digits_are_read(digits: str, unit: str) -> None:
    text = digits + unit
    if digits.isascii():
        assert parse_duration(text) == float(int(digits) * UNIT_SECONDS.get(unit or "s", 1))
    else:
        with pytest.raises(ValueError, match=re.escape(ACCEPTED)):
            parse_duration(text)
