"""``check_complete``: files cut short are found (SimpleITK reads them as zeros), complete real files pass; atomic
writes reach the disk before their rename."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from nnunet_arseg.atomic import write_atomic
from nnunet_arseg.io_checks import IncompleteFileError, check_complete


@pytest.fixture(scope="module")
def real_volume(lidc_demo) -> np.ndarray:
    """A (Z, 128, 128) uint8 CT stack: the image crops of one real nodule."""
    images = sorted((lidc_demo / "LIDC-IDRI-0002" / "nodule-0" / "images").glob("slice-*.png"),
                    key=lambda p: int(p.stem.split("-")[1]))
    return np.stack([np.asarray(Image.open(p)) for p in images])


def _cut(src: Path, dst: Path, keep: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
def test_nifti_cut_short(real_volume, tmp_path, ending):
    full = tmp_path / f"full{ending}"
    sitk.WriteImage(sitk.GetImageFromArray(real_volume), str(full))
    check_complete(full)
    cut = _cut(full, tmp_path / f"cut{ending}", 0.6)
    # the reason this module exists: SimpleITK reads the cut file without an error
    read_back = sitk.GetArrayFromImage(sitk.ReadImage(str(cut)))
    assert read_back.shape == real_volume.shape and not np.array_equal(read_back, real_volume)
    with pytest.raises(IncompleteFileError, match=rf"cut{ending}: .*cut short.*: redo it") as e:
        check_complete(cut, fix="redo it")
    assert e.value.path == cut and e.value.fix == "redo it"


def test_valid_gzip_of_a_cut_nifti(real_volume, tmp_path):
    """The gzip stream is intact, but the NIfTI inside holds fewer voxels than its header announces."""
    raw = tmp_path / "full.nii"
    sitk.WriteImage(sitk.GetImageFromArray(real_volume), str(raw))
    data = raw.read_bytes()
    bad = tmp_path / "short.nii.gz"
    bad.write_bytes(gzip.compress(data[: len(data) - 128 * 128]))
    with pytest.raises(IncompleteFileError, match=r"short\.nii\.gz: the NIfTI header announces 128x128x\d+ voxels"):
        check_complete(bad)


def test_png_cut_or_corrupt(lidc_demo, tmp_path):
    src = lidc_demo / "LIDC-IDRI-0002" / "nodule-0" / "images" / "slice-5.png"
    check_complete(src)
    with pytest.raises(IncompleteFileError, match=r"cut\.png: the PNG's IDAT chunk is cut short"):
        check_complete(_cut(src, tmp_path / "cut.png", 0.5))
    no_end = tmp_path / "no_end.png"
    no_end.write_bytes(src.read_bytes()[:-12])  # everything but the IEND chunk
    with pytest.raises(IncompleteFileError, match="ends before its IEND chunk"):
        check_complete(no_end)
    flipped = bytearray(src.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    (tmp_path / "flipped.png").write_bytes(bytes(flipped))
    with pytest.raises(IncompleteFileError, match="CRC mismatch"):
        check_complete(tmp_path / "flipped.png")
    (tmp_path / "text.png").write_text("not a png")
    with pytest.raises(IncompleteFileError, match="not a PNG file"):
        check_complete(tmp_path / "text.png")


def test_atomic_write_is_flushed_before_its_rename(lidc_demo, tmp_path, monkeypatch):
    """``write_atomic`` fsyncs the written temporary before moving it into place, so a host crash after the rename
    cannot leave an empty or partial file under the real name, then the folder, so the rename itself is on disk (the
    real calls run; they are only recorded)."""
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_ino)), fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("replace", os.stat(src).st_ino)),
                                                          replace(src, dst)))
    image = Image.open(lidc_demo / "LIDC-IDRI-0002" / "nodule-0" / "images" / "slice-0.png")
    path = tmp_path / "slice.png"
    write_atomic(path, lambda tmp: image.save(tmp))
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert events[0][1] == events[1][1] == path.stat().st_ino and events[2][1] == tmp_path.stat().st_ino
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))
