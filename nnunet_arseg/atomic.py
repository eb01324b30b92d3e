"""Atomic file writes: a reader, or a rerun after an interruption or a crash of the host, sees the old file or the new
one, never half."""
from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Callable

from batchgenerators.utilities.file_and_folder_operations import save_json

TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{8}-(.+)")  # the name of a temporary (``temporary_name``) of the file named (.+)


def temporary_name(path: str | Path) -> Path:
    """A fresh temporary name beside ``path`` that keeps its name, so its ending too (``TEMPORARY`` matches it)."""
    path = Path(path)
    return path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")


def fsync(path: str | Path, folder: bool = False) -> None:
    """Flush ``path`` to the disk; for a folder (its entries: a rename) where the file system allows it."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if folder else 0))
    try:
        os.fsync(fd)
    except OSError:
        if not folder:  # some file systems refuse to flush a folder; a file must be flushed
            raise
    finally:
        os.close(fd)


def write_atomic(path: str | Path, writer: Callable[[str], None]) -> None:
    """Run ``writer(tmp)`` on a temporary name beside ``path``, flush it to the disk, then move it into place.

    The temporary name keeps the real file ending, so writers that pick the format from it (SimpleITK, PIL,
    matplotlib, ``np.savez``) still do.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        writer(str(tmp))
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent, folder=True)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_temporaries(folder: str | Path, names: tuple[str, ...]) -> list[str]:
    """Remove what ``write_atomic`` left in ``folder`` (not below it) when a process was killed while it wrote one of
    ``names`` (file names; ``*`` matches anything). Only the process that alone writes these files there calls this;
    returns the removed names."""
    written = re.compile("|".join(re.escape(n).replace(r"\*", ".*") for n in names))
    removed = []
    for entry in os.scandir(folder):
        m = TEMPORARY.fullmatch(entry.name)
        if m and written.fullmatch(m.group(1)) and entry.is_file(follow_symlinks=False):
            try:
                os.remove(entry.path)
                removed.append(entry.name)
            except FileNotFoundError:
                pass
    return removed


def save_json_atomic(obj, path: str | Path, sort_keys: bool = False) -> None:
    """nnU-Net's ``save_json``, atomically."""
    write_atomic(path, lambda tmp: save_json(obj, tmp, sort_keys=sort_keys))
