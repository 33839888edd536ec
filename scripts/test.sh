#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian/Ubuntu machine, then run it.
# Widget tests need a real (virtual) X display with OpenGL: Xvfb.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v xvfb-run >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq xvfb xauth libgl1 libegl1 libxkbcommon-x11-0 libxcb-icccm4 \
        libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 \
        libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libdbus-1-3 libfontconfig1 >/dev/null
fi

# Keep an existing torch (e.g. a CUDA build); otherwise take the CPU build.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
# A regular (not editable) install: the tests exercise the wheel, manifest included. The
# package names no Qt binding; the tests use the one napari 0.9 recommends (Qt6, PyQt6:
# what `napari[pyqt]` / `napari[all]` install).
python -m pip install -q ".[dev]" "napari[pyqt6]"

ruff check .
# Pin the binding for qtpy and pytest-qt alike, whatever else is installed: two bindings in
# one process crash. bioimage.io: never reach the network (packages are checked offline).
QT_API=pyqt6 PYTEST_QT_API=pyqt6 BIOIMAGEIO_PERFORM_IO_CHECKS=false \
    xvfb-run -a -s "-screen 0 1600x1000x24" python -m pytest -p no:cacheprovider "$@"
