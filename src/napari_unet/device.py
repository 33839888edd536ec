"""Device choice and the fastest numerically safe layout/precision for each device."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then CPU; a named device must be available."""
    name = (name or "auto").lower()
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps and mps.is_available())
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_ok else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("CUDA was requested but this PyTorch build sees no CUDA GPU; use 'auto'")
    if name == "mps" and not mps_ok:
        raise ValueError("Apple MPS was requested but is not available here; use 'auto'")
    if not (name == "cpu" or name == "mps" or name.startswith("cuda")):
        raise ValueError(f"unknown device {name!r}: use auto, cuda, cuda:N, mps or cpu")
    return torch.device(name)


def _cpu_has_fast_bf16() -> bool:
    # AMX / AVX512-BF16 make bf16 convolutions ~2-3x faster than fp32 on CPU; without
    # them bf16 is emulated and slower, so it is only chosen where the hardware has it.
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(torch.cpu, probe, None)
        if fn is not None and fn():
            return True
    return False


def resolve_precision(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype to run inference in, or None for plain fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and _cpu_has_fast_bf16():
        return torch.bfloat16
    return None


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Autocast to ``dtype`` on ``device``; a no-op for fp32."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


# Tiles and batches when the user leaves them at None ("auto"). 256-pixel tiles in batches
# of 4 ran fastest on 2-core CPUs (cache-friendly). GPUs need more pixels per forward pass to
# fill: 512-pixel tiles, as many per batch as a quarter of the free memory holds, capped at
# 16 (4 megapixels per pass: more gains nothing measurable and only makes the last, partial
# batch of a plane costlier).
CPU_TILE, CPU_BATCH = 256, 4
GPU_TILE, GPU_MAX_BATCH = 512, 16
# Peak activation memory of the U-Net per input pixel, in feature channels held at once
# (skip + up-convolution + concatenation + conv outputs at full resolution, the coarser
# levels adding about as much again); bytes = this x base width x element size.
_ACTIVATION_CHANNELS_PER_BASE = 8
_MEMORY_SHARE = 0.25


def auto_tiling(device: torch.device, base_channels: int, tile: int | None = None,
                batch_size: int | None = None, amp: torch.dtype | None = None
                ) -> tuple[int, int]:
    """(tile, batch size) for ``device``: explicit values win, None picks from the device.

    On CUDA the batch comes from the free memory (a quarter of it, for the activations of
    a model of ``base_channels`` width in the autocast dtype) up to :data:`GPU_MAX_BATCH`.
    """
    if device.type == "cpu":
        return tile or CPU_TILE, batch_size or CPU_BATCH
    tile = tile or GPU_TILE
    if batch_size:
        return tile, batch_size
    if device.type != "cuda":  # MPS: unified memory shared with the system, stay modest
        return tile, 4
    free, _ = torch.cuda.mem_get_info(device)
    elem = 4 if amp is None else 2
    per_tile = tile * tile * _ACTIVATION_CHANNELS_PER_BASE * base_channels * elem
    return tile, int(max(1, min(GPU_MAX_BATCH, free * _MEMORY_SHARE // per_tile)))


def to_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move a model to the device in channels_last layout (fastest for 3x3 convs there)."""
    return model.to(device=device, memory_format=torch.channels_last)
