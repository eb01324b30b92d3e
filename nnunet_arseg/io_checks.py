"""Whole-file checks before a reader sees a file, so that a file cut short is an error that names it.

SimpleITK reads a ``.nii.gz`` (or ``.nii``) that was cut short without complaint: the missing voxels come back as
zeros. PIL's error for a cut PNG names no file. ``check_complete(path)`` reads the file to its end:

- gzip (``*.gz``): every member decompressed, its CRC and length trailer checked;
- NIfTI (``.nii``, ``.nii.gz``): the (decompressed) file holds every voxel its header announces;
- PNG: every chunk present with a correct CRC, up to ``IEND``.

Other formats pass unchecked (their readers fail on a short file themselves).
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

__all__ = ["IncompleteFileError", "check_complete"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHUNK = 1 << 20
_REFETCH = "copy or download it again from its source"


class IncompleteFileError(ValueError):
    """A file that is cut short or corrupt; the message is ``"{path}: {reason}: {fix}"``."""

    def __init__(self, path: Path, reason: str, fix: str):
        super().__init__(f"{path}: {reason}: {fix}")
        self.path, self.reason, self.fix = path, reason, fix


def check_complete(path: str | Path, fix: str = _REFETCH) -> None:
    """Raise ``IncompleteFileError`` (message: ``path``, what is wrong, then ``fix``) if ``path`` is cut short.

    A missing file raises ``FileNotFoundError`` as ``open`` does.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".gz"):
        head, size = _gunzip_to_end(path, fix)
        if name.endswith(".nii.gz"):
            _check_nifti_size(path, head, size, fix)
    elif name.endswith(".nii"):
        with open(path, "rb") as f:
            head = f.read(540)
        _check_nifti_size(path, head, path.stat().st_size, fix)
    elif name.endswith(".png"):
        _check_png_chunks(path, fix)


def _gunzip_to_end(path: Path, fix: str) -> tuple[bytes, int]:
    """The first 540 decompressed bytes and the decompressed size; every member's trailer is checked."""
    head, size = b"", 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                if len(head) < 540:
                    head += chunk[:540 - len(head)]
                size += len(chunk)
    except EOFError as e:
        raise IncompleteFileError(path, f"the gzip data ends early ({e}); the file was cut short (an interrupted "
                                        "copy or download?)", fix) from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise IncompleteFileError(path, f"corrupt gzip data ({e.__class__.__name__}: {e})", fix) from None
    return head, size


def _check_nifti_size(path: Path, head: bytes, size: int, fix: str) -> None:
    """Compare the voxel bytes a single-file NIfTI-1/-2 header announces with ``size``; other headers pass."""
    for endian in "<>":
        if len(head) >= 4 and struct.unpack(endian + "i", head[:4])[0] in (348, 540):
            break
    else:
        return
    if struct.unpack(endian + "i", head[:4])[0] == 348 and len(head) >= 348 and head[344:347] == b"n+1":
        dims = struct.unpack(endian + "8h", head[40:56])
        bitpix = struct.unpack(endian + "h", head[72:74])[0]
        vox_offset = int(struct.unpack(endian + "f", head[108:112])[0])
    elif len(head) >= 540 and head[4:7] == b"n+2":
        bitpix = struct.unpack(endian + "h", head[14:16])[0]
        dims = struct.unpack(endian + "8q", head[16:80])
        vox_offset = struct.unpack(endian + "q", head[168:176])[0]
    else:  # a header-only file (data in a separate .img) or not NIfTI at all
        return
    if not 1 <= dims[0] <= 7 or bitpix <= 0 or any(d <= 0 for d in dims[1:dims[0] + 1]):
        return
    num_voxels = 1
    for d in dims[1:dims[0] + 1]:
        num_voxels *= d
    expected = vox_offset + num_voxels * bitpix // 8
    if size < expected:
        raise IncompleteFileError(
            path, f"the NIfTI header announces {'x'.join(map(str, dims[1:dims[0] + 1]))} voxels ({expected} bytes "
                  f"with the header) but the {'decompressed ' if path.name.lower().endswith('.gz') else ''}file "
                  f"holds only {size} bytes; it was cut short (an interrupted copy or write?)", fix)


def _check_png_chunks(path: Path, fix: str) -> None:
    with open(path, "rb") as f:
        if f.read(8) != _PNG_SIGNATURE:
            raise IncompleteFileError(path, "not a PNG file (no PNG signature)", fix)
        while True:
            header = f.read(8)
            if len(header) < 8:
                raise IncompleteFileError(path, "the PNG ends before its IEND chunk; the file was cut short", fix)
            length, kind = struct.unpack(">I4s", header)
            body = f.read(length + 4)
            if len(body) < length + 4:
                raise IncompleteFileError(path, f"the PNG's {kind.decode('latin-1')} chunk is cut short ({len(body)} "
                                                f"of {length + 4} bytes); the file was cut short", fix)
            if zlib.crc32(kind + body[:length]) != struct.unpack(">I", body[length:])[0]:
                raise IncompleteFileError(path, f"the PNG's {kind.decode('latin-1')} chunk is corrupt (CRC mismatch)",
                                          fix)
            if kind == b"IEND":
                return
