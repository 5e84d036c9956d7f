"""The deadline transport's construction: httpx's own pool, replaced at once, must not cost a CA
bundle (issue 15: ~1 MB of RSS for a context no request ever uses)."""

from __future__ import annotations

import certifi
import pytest

from hydra_watchdog.adapters.http_deadline import new_client


def test_a_new_client_loads_no_ca_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    def where() -> str:
        raise AssertionError("the CA bundle was looked up for a context nobody uses")

    # httpx calls certifi.where() only to build a verifying context (verify=True).
    monkeypatch.setattr(certifi, "where", where)
    with new_client() as client:
        assert client.headers["Accept-Encoding"] == "identity"
