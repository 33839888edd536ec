"""Checks on where results will be written, made before any work starts.

A run that trains for an hour and then fails on a typo in the output name loses the hour;
these checks turn such mistakes into an immediate, clear message.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path


def check_writable_folder(folder: str | os.PathLike, what: str = "output") -> None:
    """Raise unless ``folder`` exists, is a folder and accepts new files.

    Writability is probed by creating (and removing) a temporary file: permission bits say
    nothing for root or on read-only mounts.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(errno.ENOENT, f"the folder for the {what} does not exist "
                                "(create it first, or pick another path)", str(folder))
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"the {what} would go inside a file, not a "
                                 "folder", str(folder))
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".napari-unet-probe-"):
            pass
    except OSError as exc:
        raise type(exc)(exc.errno, f"cannot write the {what} into this folder "
                        f"({exc.strerror}); pick a writable folder", str(folder)) from exc


def check_output(path: str | os.PathLike, *, suffixes: Sequence[str], what: str,
                 overwrite: bool | None = None) -> Path:
    """Check an output path before any work: its suffix, its folder, and (unless
    ``overwrite`` is None, meaning "the caller resumes or replaces outputs itself") that it
    does not exist yet when ``overwrite`` is False. Returns the path.
    """
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        names = ", ".join(suffixes[:-1]) + " or " * (len(suffixes) > 1) + suffixes[-1]
        raise ValueError(f"{path}: the {what} must end in {names}, "
                         f"not {path.suffix or '(no suffix)'!r}")
    if overwrite is False and path.exists():
        raise FileExistsError(errno.EEXIST, f"the {what} exists; pass --overwrite "
                              "(overwrite=True) or pick another name", str(path))
    check_writable_folder(path.parent if str(path.parent) else Path("."), what)
    return path
