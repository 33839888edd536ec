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


def to_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move a model to the device in channels_last layout (fastest for 3x3 convs there)."""
    return model.to(device=device, memory_format=torch.channels_last)
