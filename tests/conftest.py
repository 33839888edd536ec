"""Shared fixtures: the public data folder (skips when absent) and a seeded RNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_unet.datasets import shared_data_dir


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
