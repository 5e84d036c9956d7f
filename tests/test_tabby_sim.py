"""The TabbyAPI simulator as a real process, spoken to over real HTTP (plain httpx here)."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from hydra_watchdog.sim import nvml_state
from hydra_watchdog.sim.tabby_server import (
    NO_MODEL,
    NO_MODEL_PATH,
    Faults,
    parse_faults,
    read_control,
    read_tokens,
    write_control,
)
from tests.harness.tabby import (
    ADMIN_KEY,
    API_KEY,
    SimProcess,
    TabbySims,
    free_port,
    port_open,
    wait_for,
)

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
API = {"Authorization": f"Bearer {API_KEY}"}


def get(sim: SimProcess, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.get(sim.url + path, headers=headers or {}, timeout=10)


def post(
    sim: SimProcess, path: str, body: object = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    return httpx.post(
        sim.url + path, json=body, headers=ADMIN if headers is None else headers, timeout=10
    )


def sse_events(raw: str) -> list[dict[str, Any]]:
    return [
        json.loads(line[len("data: ") :]) for line in raw.splitlines() if line.startswith("data: ")
    ]


def load_raw(sim: SimProcess, name: str) -> httpx.Response:
    return post(sim, "/v1/model/load", {"model_name": name})


def test_modern_endpoints_bodies_and_auth(tabby_sim: TabbySims) -> None:
    sim = tabby_sim.start(flavor="modern", load_seconds=0.4, faults={"ping_seconds": 0.05})

    health = get(sim, "/health")
    assert (health.status_code, health.json()) == (200, {"status": "healthy", "issues": []})
    none = get(sim, "/v1/model", API)
    assert (none.status_code, none.json()) == (503, {"detail": NO_MODEL})
    assert get(sim, "/v1/auth/permission", API).json() == {"permission": "api"}
    assert get(sim, "/v1/auth/permission", ADMIN).json() == {"permission": "admin"}
    # x-admin-key alone does not pass an API-key route (notes/tabbyapi.md).
    only_admin_header = get(sim, "/v1/model", {"x-admin-key": ADMIN_KEY})
    assert only_admin_header.status_code == 401
    assert only_admin_header.json() == {"detail": "Please provide an API key"}
    assert get(sim, "/v1/model", {"x-api-key": "wrong"}).json() == {"detail": "Invalid API key"}
    refused = post(sim, "/v1/model/load", {"model_name": "m1"}, API)
    assert (refused.status_code, refused.json()) == (401, {"detail": "Invalid admin key"})
    assert post(sim, "/v1/model/load", {"model_name": "m1"}, {}).json() == {
        "detail": "Please provide an admin key"
    }
    assert [m["id"] for m in get(sim, "/v1/model/list", ADMIN).json()["data"]] == ["m1", "m2"]
    assert get(sim, "/v1/models", API).json() == {"object": "list", "data": []}
    assert get(sim, "/v1/health").status_code == 404

    stream = load_raw(sim, "m1")
    assert stream.status_code == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert ": ping" in stream.text  # newer builds keep the stream alive with comments
    events = sse_events(stream.text)
    assert [(e["module"], e["status"]) for e in events] == [
        (1, "processing"),
        (2, "processing"),
        (3, "processing"),
        (4, "processing"),
        (4, "finished"),
    ]
    card = get(sim, "/v1/model", API).json()
    assert card["id"] == "m1" and card["owned_by"] == "tabbyAPI"
    assert card["parameters"]["cache_mode"] == "Q4"
    assert [m["id"] for m in get(sim, "/v1/models", API).json()["data"]] == ["m1"]
    completion = post(sim, "/v1/completions", {"prompt": "Hi", "max_tokens": 1}, API).json()
    assert completion["object"] == "text_completion" and completion["model"] == "m1"
    assert completion["choices"][0]["finish_reason"] == "length"

    again = sse_events(load_raw(sim, "m1").text)
    assert [(e["module"], e["modules"], e["status"]) for e in again] == [
        (1, 1, "processing"),
        (1, 1, "finished"),
    ]
    unload = post(sim, "/v1/model/unload")
    assert (unload.status_code, unload.text) == (200, "null")
    assert post(sim, "/v1/model/unload").status_code == 503
    results = [(r["model"], r["result"]) for r in sim.loads() if r["status"] == 200]
    assert results == [("m1", "loaded"), ("m1", "already loaded")]


def test_exl2_flavor_differences(tabby_sim: TabbySims) -> None:
    sim = tabby_sim.start(
        flavor="exl2",
        models={"m1": {}, "noconf": {"config": False}},
        faults={"ping_seconds": 0.01},
    )
    none = get(sim, "/v1/model", API)
    assert (none.status_code, none.json()) == (400, {"detail": NO_MODEL})
    first = load_raw(sim, "m1")
    assert ": ping" not in first.text  # older builds never ping
    assert sse_events(first.text)[-1]["status"] == "finished"
    already = load_raw(sim, "m1")
    assert (already.status_code, already.text) == (200, "")  # the exl2-era empty stream
    missing = load_raw(sim, "nope")
    assert (missing.status_code, missing.json()) == (400, {"detail": NO_MODEL_PATH})
    no_name = post(sim, "/v1/model/load", {"model_name": ""})
    assert no_name.json() == {"detail": "A model name was not provided for load."}
    invalid = post(sim, "/v1/model/load", {"name": "m1"})
    assert invalid.status_code == 422
    assert invalid.json()["detail"][0]["loc"] == ["body", "model_name"]
    broken = load_raw(sim, "noconf")
    assert broken.status_code == 200  # failures arrive as an error event with HTTP 200
    [event] = sse_events(broken.text)
    assert "config.json" in event["error"]["message"]
    assert get(sim, "/v1/model", API).status_code == 400  # the failed swap left no model
    assert post(sim, "/v1/model/unload").status_code == 400


@pytest.mark.parametrize(("flavor", "cancelled"), [("exl2", True), ("modern", False)])
def test_client_disconnect_cancels_only_exl2_loads(
    tabby_sim: TabbySims, flavor: str, cancelled: bool
) -> None:
    sim = tabby_sim.start(flavor=flavor, load_seconds=1.5, modules=10)
    with (
        httpx.Client(timeout=10) as client,
        client.stream(
            "POST", sim.url + "/v1/model/load", json={"model_name": "m1"}, headers=ADMIN
        ) as resp,
    ):
        for line in resp.iter_lines():
            if line.startswith("data: "):
                break  # one progress event seen, then hang up mid-load
    wait_for(lambda: bool(sim.loads()), 10, "the load request to end")
    [load] = sim.loads()
    if cancelled:
        assert load["result"] == "cancelled: client disconnected"
        time.sleep(0.3)  # a cancelled load must stay cancelled, not finish later
        assert get(sim, "/v1/model", API).status_code == 400
    else:
        assert load["result"] == "loaded (client gone)"
        assert get(sim, "/v1/model", API).json()["id"] == "m1"


def _load_concurrently(sim: SimProcess, names: list[str]) -> list[str]:
    texts: dict[str, str] = {}

    def one(name: str) -> None:
        texts[name] = load_raw(sim, name).text

    threads = [threading.Thread(target=one, args=(n,)) for n in names]
    for thread in threads:
        thread.start()
        time.sleep(0.1)
    for thread in threads:
        thread.join(20)
    return [texts[n] for n in names]


def test_modern_load_lock_serialises_and_exl2_concurrent_load_ooms(tabby_sim: TabbySims) -> None:
    modern = tabby_sim.start(flavor="modern", load_seconds=0.5)
    texts = _load_concurrently(modern, ["m1", "m2"])
    assert all(sse_events(t)[-1]["status"] == "finished" for t in texts)
    assert get(modern, "/v1/model", API).json()["id"] == "m2"

    exl2 = tabby_sim.start(flavor="exl2", load_seconds=0.5)
    texts = _load_concurrently(exl2, ["m1", "m2"])
    errors = [e["error"]["message"] for t in texts for e in sse_events(t) if "error" in e]
    assert errors and all("CUDA out of memory" in m for m in errors)


def test_startup_model_loads_before_the_port_opens(tabby_sim: TabbySims) -> None:
    sim = tabby_sim.start(startup_model="m1", load_seconds=1.0, wait=False)
    time.sleep(0.3)
    assert sim.proc.poll() is None  # alive, loading ...
    assert not port_open(sim.asked_port)  # ... and refusing connections meanwhile
    sim.wait_listening()
    assert get(sim, "/v1/model", API).json()["id"] == "m1"


@pytest.mark.parametrize("model", ["noconf", "missing"])
def test_failed_startup_load_exits_1(tabby_sim: TabbySims, model: str) -> None:
    sim = tabby_sim.start(startup_model=model, models={"noconf": {"config": False}}, wait=False)
    assert sim.wait_exit() == 1
    assert not port_open(sim.asked_port)


def _two_free_ports() -> int:
    for _ in range(50):
        port = free_port()
        if port < 65535 and not port_open(port + 1):
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise AssertionError("no two adjacent free ports")


def _listener(port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def test_busy_port_moves_to_the_next_and_both_busy_exits_0(tabby_sim: TabbySims) -> None:
    port = _two_free_ports()
    with _listener(port):
        sim = tabby_sim.start(port=port)
        assert sim.port == port + 1
        assert get(sim, "/health").status_code == 200
        assert f"Port {port} is currently in use" in sim.log_text()
    port = _two_free_ports()
    with _listener(port), _listener(port + 1):
        both = tabby_sim.start(port=port, wait=False)
        assert both.wait_exit() == 0


def test_exit_code_fault_without_any_request(tabby_sim: TabbySims) -> None:
    sim = tabby_sim.start()
    sim.set_faults(exit_code=3)
    assert sim.wait_exit() == 3


def test_refuse_closes_the_port_and_reopens_it(tabby_sim: TabbySims) -> None:
    sim = tabby_sim.start()
    sim.set_faults(refuse=True)
    wait_for(lambda: not port_open(sim.port), 10, "the port to close")
    assert sim.proc.poll() is None
    sim.set_faults()
    wait_for(lambda: port_open(sim.port), 10, "the port to reopen")
    assert get(sim, "/health").status_code == 200


def test_hang_slow_and_trickle(tabby_sim: TabbySims) -> None:
    sim = tabby_sim.start()
    sim.set_faults(hang=True)
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(sim.url + "/health", timeout=0.5)
    sim.set_faults(slow_seconds=0.4)
    started = time.monotonic()
    assert get(sim, "/health").status_code == 200
    assert time.monotonic() - started >= 0.4
    sim.set_faults(trickle_bytes_per_s=400)
    started = time.monotonic()
    with httpx.stream("GET", sim.url + "/health", timeout=10) as resp:
        chunks = list(resp.iter_raw())
    assert json.loads(b"".join(chunks)) == {"status": "healthy", "issues": []}
    assert len(chunks) > 1  # dribbled, not sent at once
    # ~180 bytes of head and body at 400 B/s, 20 bytes a piece.
    assert time.monotonic() - started >= 0.3


def test_sticky_503_survives_clearing_the_fault(tabby_sim: TabbySims) -> None:
    sim = tabby_sim.start()
    sim.set_faults(sticky_503=True)
    first = get(sim, "/health")
    assert first.status_code == 503
    body = first.json()
    assert body["status"] == "unhealthy"
    assert "CUDA error" in body["issues"][0]["description"]
    sim.set_faults()
    assert get(sim, "/health").json() == body  # never cleared until the process restarts


def test_generation_hang_and_load_error_faults(tabby_sim: TabbySims) -> None:
    sim = tabby_sim.start(startup_model="m1", load_seconds=0.1)
    sim.set_faults(generation_hang=True)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(sim.url + "/v1/completions", json={"prompt": "Hi"}, headers=API, timeout=0.5)
    assert get(sim, "/health").status_code == 200
    assert get(sim, "/v1/models", API).status_code == 200

    oom = "CUDA out of memory. Tried to allocate 2.00 GiB"
    sim.set_faults(load_error=oom, modules=6, load_seconds=0.3)
    events = sse_events(load_raw(sim, "m2").text)
    assert events[-1] == {"error": {"message": oom, "trace": None}}
    assert [(e["module"], e["modules"]) for e in events[:-1]] == [(1, 6), (2, 6), (3, 6)]
    assert get(sim, "/v1/model", API).status_code == 503


def test_unload_error_leaves_the_model_loaded(tabby_sim: TabbySims) -> None:
    sim = tabby_sim.start(startup_model="m1", load_seconds=0.1, faults={"unload_error": True})
    failed = post(sim, "/v1/model/unload")
    assert (failed.status_code, failed.text) == (500, "Internal Server Error")
    assert get(sim, "/v1/model", API).json()["id"] == "m1"


def test_nvml_state_gets_the_vram_and_ooms_when_full(tabby_sim: TabbySims, tmp_path: Path) -> None:
    state_file = tmp_path / "nvml.state"
    device = nvml_state.SimDevice(0, "GPU-0", "Sim", mem_total=4 * nvml_state.GIB)
    nvml_state.write_state(state_file, nvml_state.SimState(devices=(device,)))
    sim = tabby_sim.start(
        models={"small": {"vram": 3 * nvml_state.GIB}, "big": {"vram": 5 * nvml_state.GIB}},
        extra=("--nvml-state", str(state_file)),
    )
    [event] = sse_events(load_raw(sim, "big").text)
    assert "CUDA out of memory" in event["error"]["message"]
    assert sse_events(load_raw(sim, "small").text)[-1]["status"] == "finished"
    [held] = nvml_state.read_state(state_file).processes
    assert (held.pid, held.used_bytes) == (sim.proc.pid, 3 * nvml_state.GIB)
    assert post(sim, "/v1/model/unload").status_code == 200
    assert nvml_state.read_state(state_file).processes == ()


def test_control_file_parsing(tmp_path: Path) -> None:
    faults, warnings = parse_faults({"hang": True, "slow_seconds": 2, "bogus": 1, "refuse": "y"})
    assert faults == Faults(hang=True, slow_seconds=2)
    assert len(warnings) == 2
    assert parse_faults([1])[0] == Faults()
    assert parse_faults({"exit_code": True})[0] == Faults()  # a bool is not an exit code
    control = tmp_path / "control.json"
    write_control(control, load_error="OOM", modules=3)
    assert read_control(control) == Faults(load_error="OOM", modules=3)
    assert [p.name for p in tmp_path.iterdir()] == ["control.json"]  # no temp file left
    control.write_text("{not json", encoding="utf-8")
    assert read_control(control) == Faults()
    assert read_control(tmp_path / "absent.json") == Faults()
    with pytest.raises(TypeError, match="bogus"):
        write_control(control, bogus=1)


def test_read_tokens(tmp_path: Path) -> None:
    tokens = tmp_path / "api_tokens.yml"
    tokens.write_text("# keys\napi_key: 'abc'\nadmin_key: def  # admin\n", encoding="utf-8")
    assert read_tokens(tokens) == ("abc", "def")


def test_a_model_is_split_over_the_gpus_like_gpu_split_auto(
    tabby_sim: TabbySims, tmp_path: Path
) -> None:
    state_file = tmp_path / "nvml.state"
    gpus = tuple(
        nvml_state.SimDevice(i, f"GPU-{i}", "Sim", mem_total=4 * nvml_state.GIB) for i in (0, 1)
    )
    nvml_state.write_state(state_file, nvml_state.SimState(devices=gpus))
    sim = tabby_sim.start(
        models={"m": {"vram": 6 * nvml_state.GIB}, "huge": {"vram": 9 * nvml_state.GIB}},
        extra=("--nvml-state", str(state_file)),
    )
    [event] = sse_events(load_raw(sim, "huge").text)
    assert "CUDA out of memory" in event["error"]["message"]
    assert sse_events(load_raw(sim, "m").text)[-1]["status"] == "finished"
    held = sorted((p.gpu, p.used_bytes) for p in nvml_state.read_state(state_file).processes)
    assert [g for g, _ in held] == [0, 1]
    assert sum(b for _, b in held) == 6 * nvml_state.GIB
    assert held[0][1] > held[1][1]  # GPU 0 is filled first
    assert nvml_state.free_bytes(state_file, 0) == 0
