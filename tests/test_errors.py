"""The error vocabulary: one enum, every kind in one family, the public strings unchanged."""

from __future__ import annotations

from hydra_watchdog.errors import FAMILY, ErrorFamily, ErrorKind
from hydra_watchdog.observation import NvmlErrorKind, Outcome

# Published in journald (HYDRA_ERROR_KIND), status.json and the metrics before the enum existed:
# these strings are an interface and must never change.
RELEASED = {
    "",
    "skipped",
    "exception",
    "disabled",
    "identity_changed",
    "in_unit",
    "no_permission",
    "unkillable",
    "cannot_verify",
    "foreign_gpu_user",
    "not_found",
    "timeout",
    "exec_failed",
    "command_failed",
    "load_in_flight",
    "load_error",
    "cancelled",
    "wrong_unit",
    "unavailable",
}


def test_released_values_are_still_there() -> None:
    assert {k.value for k in ErrorKind} >= RELEASED


def test_every_kind_has_one_family() -> None:
    assert set(FAMILY) == set(ErrorKind)
    assert ErrorKind.NONE.family is ErrorFamily.NONE
    assert ErrorKind.IDENTITY_CHANGED.family is ErrorFamily.REFUSED


def test_none_means_no_error() -> None:
    assert ErrorKind.NONE.value == "" and not ErrorKind.NONE


def test_http_and_nvml_outcomes_are_error_kinds() -> None:
    """The fallback route and the power limit pass these through by value."""
    for outcome in Outcome:
        if outcome is not Outcome.OK:
            assert ErrorKind(outcome.value).value == outcome.value
    for kind in NvmlErrorKind:
        assert ErrorKind(kind.value).value == kind.value


def test_every_kind_is_documented_in_the_module_table() -> None:
    from hydra_watchdog import errors

    doc = errors.__doc__ or ""
    missing = [k.value for k in ErrorKind if k.value and k.value not in doc]
    assert missing == []
