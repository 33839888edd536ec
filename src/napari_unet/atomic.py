"""Write-to-temp-then-rename: one helper for every file or folder napari-unet writes.

A crash, a full disk or a Ctrl-C at any moment leaves either the old path untouched or the
new one complete, never a half-written file under the real name. Temporary names are hidden
siblings (same folder, hence same file system, so the rename is atomic) that start with
``.<name>.`` and end in ``.part`` so :func:`remove_stale_temporaries` can find what a killed
process left behind.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "move_into_place", "remove", "remove_stale_temporaries",
           "temp_sibling", "write_text"]

_SUFFIX = ".part"
# What follows ".<name>." in a temporary's name (see temp_sibling and move_into_place).
_TEMP_TAIL = re.compile(r"^[0-9a-f]{8}(\.old)?\.part(\..*)?$")


def temp_sibling(path: str | os.PathLike, keep_suffix: bool = False) -> Path:
    """A fresh hidden name next to ``path``.

    ``keep_suffix`` ends the name with the real name's suffix too (``.x.1a2b.part.tif``),
    for writers that choose the format from the suffix (tifffile picks OME-XML for .ome.tif).
    """
    p = Path(path)
    tail = "".join(p.suffixes) if keep_suffix else ""
    return p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}{_SUFFIX}{tail}")


def remove(path: str | os.PathLike) -> None:
    """Delete a file, link or folder if it is there (no error if not)."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink(missing_ok=True)


def move_into_place(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename ``tmp`` to ``final``, replacing it.

    rename() cannot replace a non-empty folder, so an existing ``final`` is first moved
    aside and restored if the swap fails; only then is the old copy deleted.
    """
    tmp, final = Path(tmp), Path(final)
    if not (final.exists() or final.is_symlink()):
        os.replace(tmp, final)
        return
    old = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.old{_SUFFIX}")
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    remove(old)


@contextmanager
def atomic_path(final: str | os.PathLike, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``final`` to write (a file or a folder); on success it
    replaces ``final``, on any error it is removed and ``final`` is left as it was.

        with atomic_path(out) as tmp:
            tifffile.imwrite(tmp, data)
    """
    tmp = temp_sibling(final, keep_suffix)
    try:
        yield tmp
        move_into_place(tmp, final)
    finally:
        remove(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small text file atomically (flushed to disk before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def remove_stale_temporaries(final: str | os.PathLike) -> list[Path]:
    """Delete the temporaries of ``final`` that a killed writer left (see module doc).

    Only call this while holding the output's lock: a live writer's temporary looks the same.
    """
    p = Path(final)
    if not p.parent.is_dir():
        return []
    prefix = f".{p.name}."
    stale = [q for q in p.parent.iterdir()
             if q.name.startswith(prefix) and _TEMP_TAIL.match(q.name[len(prefix):])]
    for q in stale:
        remove(q)
    return stale
