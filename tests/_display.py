"""Shared guard of the widget test modules: skip them where Qt cannot open a window."""

from __future__ import annotations

import os
import sys

import pytest


def require_display() -> None:
    """Skip the calling test module without a display (Qt would abort the whole pytest
    process) or without napari / pytest-qt."""
    if sys.platform.startswith("linux") and not (
            os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
            or os.environ.get("QT_QPA_PLATFORM")):
        pytest.skip("widget tests need a display: run them under xvfb-run -a",
                    allow_module_level=True)
    pytest.importorskip("napari")
    pytest.importorskip("pytestqt")
