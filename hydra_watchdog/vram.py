"""VRAM arithmetic and GPU matching: below both the policy and the status report.

A configured `[[gpu.device]]` names a card by index or by UUID; `matches` is the one rule for
which snapshot is which device, used by the VRAM check, the power limits and the report alike.
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra_watchdog.config import Config, GpuDevice
from hydra_watchdog.observation import GpuReport, GpuSnapshot, ModelDir

GIB = 1024**3


def matches(dev: GpuDevice, snap: GpuSnapshot) -> bool:
    return (dev.index is not None and dev.index == snap.index) or bool(
        dev.uuid and dev.uuid == snap.uuid
    )


def device_for(snap: GpuSnapshot, devices: Sequence[GpuDevice]) -> GpuDevice | None:
    return next((d for d in devices if matches(d, snap)), None)


def snapshot_for(dev: GpuDevice, snaps: Sequence[GpuSnapshot]) -> GpuSnapshot | None:
    return next((g for g in snaps if matches(dev, g)), None)


def vram_needed(cfg: Config, model_dir: ModelDir | None, *, fallback: bool) -> int | None:
    """Bytes a model needs over all GPUs: configured, else folder size + overhead, else None."""
    gib = cfg.model.fallback_vram_required_gib if fallback else cfg.model.vram_required_gib
    if gib is not None:
        return int(gib * GIB)
    if model_dir is not None and model_dir.size_bytes > 0:
        return model_dir.size_bytes + int(cfg.model.estimate_overhead_gib * GIB)
    return None


def vram_free(gpus: GpuReport, devices: Sequence[GpuDevice]) -> int | None:
    """Free bytes summed over the configured GPUs (all GPUs when none is configured); None when
    any of them could not be read."""
    snaps = gpus.devices
    if devices:
        snaps = tuple(g for g in snaps if any(matches(d, g) for d in devices))
    if gpus.error is not None or not snaps or any(g.memory_free is None for g in snaps):
        return None
    return sum(g.memory_free or 0 for g in snaps)
