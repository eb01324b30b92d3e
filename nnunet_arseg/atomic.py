"""Atomic file writes: a reader, or a rerun after an interruption, sees the old file or the new one, never half."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable

from batchgenerators.utilities.file_and_folder_operations import save_json


def write_atomic(path: str | Path, writer: Callable[[str], None]) -> None:
    """Run ``writer(tmp)`` on a temporary name beside ``path``, flush it to the disk, then move it into place.

    The temporary name keeps the real file ending, so writers that pick the format from it (SimpleITK, PIL,
    matplotlib, ``np.savez``) still do.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        writer(str(tmp))
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def fsync_file(path: str | Path) -> None:
    """Flush a written file to the disk, so that a host crash after its rename cannot leave it empty."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_json_atomic(obj, path: str | Path, sort_keys: bool = False) -> None:
    """nnU-Net's ``save_json``, atomically."""
    write_atomic(path, lambda tmp: save_json(obj, tmp, sort_keys=sort_keys))
