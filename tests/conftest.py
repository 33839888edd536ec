"""Shared fixtures: the public data folder (skips when absent), a seeded RNG, one torch thread."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from shared_data import shared_data_dir


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or ``$NAPARI_UNET_DATA``); skips the test when it is absent."""
    root = shared_data_dir()
    if root is None:
        pytest.skip("../shared/data not found")
    return root


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests with one torch thread: on a busy shared CPU multi-threaded
    kernels stall waiting for each other (10x slower); one thread keeps run times
    predictable."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def notes(monkeypatch):
    """Notifications shown by the widgets, as (level, message); imports Qt only when a
    (widget) test asks for it."""
    from napari_unet._widgets import _ui

    got: list[tuple[str, str]] = []
    for level in ("error", "warning", "info"):
        monkeypatch.setattr(_ui, f"show_{level}",
                            lambda msg, level=level: got.append((level, str(msg))))
    return got
