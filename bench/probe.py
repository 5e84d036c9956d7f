"""The benchmark's own view of the node: is TabbyAPI serving the model, right now?

"Healthy" here is what a client needs: /health 200, /v1/model names the model, and a 1-token
completion answers. The sampler runs every PERIOD in a thread; a supervisor's time to healthy is
the first sample of a healthy streak that lasts STREAK seconds (so a process that is up for a
few milliseconds between two crashes does not count).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass

PERIOD = 0.1
STREAK = 1.0
TIMEOUT = 0.5


@dataclass(frozen=True)
class Sample:
    t: float  # wall time (time.time) the sample started
    health: int | None  # HTTP status of /health; None: no answer
    model_ok: bool
    generation_ok: bool

    @property
    def healthy(self) -> bool:
        return self.health == 200 and self.model_ok and self.generation_ok


def _request(
    port: int, method: str, path: str, key: str, body: object = None
) -> tuple[int | None, object]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw or b"null")
        except ValueError:
            return resp.status, None
    except (OSError, http.client.HTTPException):
        return None, None
    finally:
        conn.close()


def sample(port: int, key: str, model: str) -> Sample:
    t = time.time()
    health, _ = _request(port, "GET", "/health", key)
    model_ok = generation_ok = False
    if health == 200:
        status, card = _request(port, "GET", "/v1/model", key)
        model_ok = status == 200 and isinstance(card, dict) and card.get("id") == model
    if model_ok:
        status, _ = _request(
            port, "POST", "/v1/completions", key, {"prompt": "Hi", "max_tokens": 1}
        )
        generation_ok = status == 200
    return Sample(t, health, model_ok, generation_ok)


class Sampler:
    """Samples the node every PERIOD until stopped; thread-safe reads of what it saw."""

    def __init__(self, port: int, key: str, model: str) -> None:
        self.port, self.key, self.model = port, key, model
        self._samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            s = sample(self.port, self.key, self.model)
            with self._lock:
                self._samples.append(s)
            self._stop.wait(max(0.0, PERIOD - (time.time() - s.t)))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def since(self, t0: float) -> list[Sample]:
        with self._lock:
            return [s for s in self._samples if s.t >= t0]

    def trim(self) -> None:
        with self._lock:
            self._samples = self._samples[-50:]

    def latest(self) -> Sample | None:
        with self._lock:
            return self._samples[-1] if self._samples else None


def recovered_at(samples: list[Sample], streak: float = STREAK) -> float | None:
    """Start of the first healthy streak lasting `streak` seconds, else None."""
    start: float | None = None
    for s in samples:
        if not s.healthy:
            start = None
            continue
        if start is None:
            start = s.t
        if s.t - start >= streak:
            return start
    return None
