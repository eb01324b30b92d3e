"""BraTS converter on the real BRATS 2013/2015 cases (cropped small) and on a fixture in the exact BraTS 2021 layout."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.dataset_conversion.Dataset137_BraTS21 import convert_labels_back_to_BraTS

from dataset_conversion.brats import FILES_2015, convert_brats, convert_brats_back
from dataset_conversion.raw_dataset import ConversionError

REPO = Path(__file__).resolve().parents[1]
CROP_XYZ = (48, 48, 32)
LUT_2015 = np.array([0, 2, 1, 2, 3])  # 2015 label -> nnU-Net: 1 necrosis and 3 non-enhancing -> 2 (NCR/NET)


def _arr(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _crop(img: sitk.Image, start_xyz) -> sitk.Image:
    return img[tuple(slice(s, s + n) for s, n in zip(start_xyz, CROP_XYZ))]


@pytest.fixture(scope="module")
def brats15_small(brats2015, tmp_path_factory) -> Path:
    """The six real cases, same layout and splits, cropped to 48x48x32 around the tumour."""
    root = tmp_path_factory.mktemp("brats15")
    for case_dir in sorted(brats2015.glob("*/brats_*")):
        seg = sitk.ReadImage(str(case_dir / FILES_2015["seg"]))
        zyx = np.argwhere(sitk.GetArrayFromImage(seg) > 0).mean(0).astype(int)
        size = seg.GetSize()
        start = [int(np.clip(c - n // 2, 0, s - n)) for c, n, s in zip(zyx[::-1], CROP_XYZ, size)]
        out = root / case_dir.parent.name / case_dir.name
        out.mkdir(parents=True)
        for f in (FILES_2015["flair"], FILES_2015["t1ce"], FILES_2015["seg"]):
            sitk.WriteImage(_crop(sitk.ReadImage(str(case_dir / f)), start), str(out / f))
    return root


@pytest.fixture(scope="module")
def brats21_small(brats15_small, tmp_path_factory) -> Path:
    """The cropped cases in the exact BraTS 2021 layout (flair and t1ce only; labels 0/1/2/4); one has no seg."""
    root = tmp_path_factory.mktemp("brats21")
    for i, case_dir in enumerate(sorted(brats15_small.glob("*/brats_*"))):
        case = f"BraTS2021_{i:05d}"
        (root / case).mkdir()
        shutil.copy(case_dir / FILES_2015["flair"], root / case / f"{case}_flair.nii.gz")
        shutil.copy(case_dir / FILES_2015["t1ce"], root / case / f"{case}_t1ce.nii.gz")
        if i < 5:
            seg = sitk.ReadImage(str(case_dir / FILES_2015["seg"]))
            arr = sitk.GetArrayFromImage(seg).astype(np.uint8)
            new = sitk.GetImageFromArray(np.where(arr == 3, 1, arr).astype(np.uint8))
            new.CopyInformation(seg)
            sitk.WriteImage(new, str(root / case / f"{case}_seg.nii.gz"))
    return root


def test_brats2015_labels_regions_and_split(brats15_small, tmp_path):
    ds_dir = convert_brats(brats15_small, tmp_path, 201, "BraTS15", sequences=("flair", "t1ce"), progress=False)
    ds = load_json(str(ds_dir / "dataset.json"))
    assert ds["channel_names"] == {"0": "Flair", "1": "T1ce"} and ds["file_ending"] == ".nii.gz"
    assert ds["labels"] == {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
    assert ds["regions_class_order"] == [1, 2, 3] and ds["numTraining"] == 4
    assert sorted(p.name for p in (ds_dir / "labelsTs").iterdir()) == [f"brats_2013_pat000{i}_1.nii.gz" for i in (1, 2)]
    seen = set()
    for src in sorted(brats15_small.glob("*/brats_*")):
        sub = "Ts" if src.parent.name == "test" else "Tr"
        seg = _arr(src / FILES_2015["seg"]).astype(int)
        seen |= set(np.unique(seg).tolist())
        np.testing.assert_array_equal(_arr(ds_dir / f"labels{sub}" / f"{src.name}.nii.gz"), LUT_2015[seg])
        np.testing.assert_array_equal(_arr(ds_dir / f"images{sub}" / f"{src.name}_0001.nii.gz"),
                                      _arr(src / FILES_2015["t1ce"]))
    assert seen == {0, 1, 2, 3, 4}  # the crops hold every 2015 label, label 3 included
    assert not list(tmp_path.rglob(".*"))  # no temporary or staging file left


def test_brats2021_layout_cli_roundtrip_and_integrity(brats21_small, nnunet_env, tmp_path):
    env = {**os.environ, **nnunet_env}
    cli = [sys.executable, "-m", "dataset_conversion.brats", "-i", str(brats21_small), "-d", "202",
           "--disable_progress_bar"]
    res = subprocess.run(cli, env=env, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 1 and "BraTS2021_00000_t1.nii.gz: t1 image is missing" in res.stderr
    assert "--sequences" in res.stderr and list(Path(nnunet_env["nnUNet_raw"]).iterdir()) == []
    res = subprocess.run(cli + ["--sequences", "flair", "t1ce"], env=env, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "train 5; test 1 (0 with labels)" in res.stdout
    ds_dir = Path(nnunet_env["nnUNet_raw"]) / "Dataset202_BraTS2021"
    assert sorted(p.name for p in (ds_dir / "imagesTs").iterdir()) == ["BraTS2021_00005_0000.nii.gz",
                                                                       "BraTS2021_00005_0001.nii.gz"]
    assert not list((ds_dir / "labelsTs").iterdir())
    # nnU-Net's own inverse mapping brings the labels back exactly
    for lab in sorted((ds_dir / "labelsTr").iterdir()):
        case = lab.name[: -len(".nii.gz")]
        np.testing.assert_array_equal(convert_labels_back_to_BraTS(_arr(lab)),
                                      _arr(brats21_small / case / f"{case}_seg.nii.gz"))
    back = [sys.executable, "-c", "from dataset_conversion.brats import main_back; main_back()",
            "-i", str(ds_dir / "labelsTr"), "-o", str(tmp_path / "back"), "--disable_progress_bar"]
    assert subprocess.run(back, env=env, capture_output=True).returncode == 0
    for f in sorted((tmp_path / "back").iterdir()):
        case = f.name[: -len(".nii.gz")]
        np.testing.assert_array_equal(_arr(f), _arr(brats21_small / case / f"{case}_seg.nii.gz"))
    res = subprocess.run(back, env=env, capture_output=True, text=True)
    assert res.returncode == 1 and "pass --overwrite" in res.stderr

    res = subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_extract_fingerprint"), "-d", "202",
                          "--verify_dataset_integrity", "-np", "1"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    fp = load_json(os.path.join(nnunet_env["nnUNet_preprocessed"], "Dataset202_BraTS2021", "dataset_fingerprint.json"))
    assert len(fp["shapes_after_crop"]) == 5


def test_convert_back_refuses_its_input(tmp_path):
    (tmp_path / "pred").mkdir()
    with pytest.raises(ConversionError, match="no .nii.gz prediction"):
        convert_brats_back(tmp_path / "pred", tmp_path / "out")
    img = sitk.GetImageFromArray(np.array([[[0, 1, 2, 3]]], np.uint8))
    sitk.WriteImage(img, str(tmp_path / "pred" / "a.nii.gz"))
    with pytest.raises(ConversionError, match="is the prediction folder"):
        convert_brats_back(tmp_path / "pred", tmp_path / "pred")
    (out,) = convert_brats_back(tmp_path / "pred", tmp_path / "out", progress=False)
    assert _arr(out).ravel().tolist() == [0, 2, 1, 4]


def _expect_failure(src: Path, raw: Path, match: str, **kw) -> None:
    with pytest.raises(ConversionError, match=match):
        convert_brats(src, raw, 210, sequences=("flair", "t1ce"), progress=False, **kw)
    assert not raw.exists() or list(raw.iterdir()) == []


def test_bad_inputs(brats15_small, tmp_path):
    src = tmp_path / "in"
    shutil.copytree(brats15_small / "train", src)
    raw = tmp_path / "raw"
    case = src / "brats_2013_pat0005_1"
    seg_path = case / FILES_2015["seg"]
    seg = sitk.ReadImage(str(seg_path))

    sitk.WriteImage(seg[:40], str(seg_path))
    _expect_failure(src, raw, r"OTMultiClass\.nii\.gz: size \(40, 48, 32\).*share one grid")
    bad = sitk.GetImageFromArray(np.where(sitk.GetArrayFromImage(seg) == 4, 5, sitk.GetArrayFromImage(seg)))
    bad.CopyInformation(seg)
    sitk.WriteImage(bad, str(seg_path))
    _expect_failure(src, raw, r"OTMultiClass\.nii\.gz: unexpected label values \[5\]")
    seg_path.write_bytes(b"\x1f\x8b garbage")
    _expect_failure(src, raw, r"OTMultiClass\.nii\.gz: cannot read the segmentation")
    sitk.WriteImage(seg, str(seg_path))

    flair = case / FILES_2015["flair"]
    flair.rename(tmp_path / "flair.nii.gz")
    _expect_failure(src, raw, r"Flair_subtrMeanDivStd\.nii\.gz: flair image is missing.*--sequences")
    (tmp_path / "flair.nii.gz").rename(flair)

    shutil.copytree(case, tmp_path / "dup" / "a" / case.name)
    shutil.copytree(case, tmp_path / "dup" / "b" / case.name)
    _expect_failure(tmp_path / "dup", raw, "duplicated case id 'brats_2013_pat0005_1'")
    (tmp_path / "empty").mkdir()
    _expect_failure(tmp_path / "empty", raw, "no BraTS case found")
    with pytest.raises(ConversionError, match="choose distinct ones"):
        convert_brats(src, raw, 210, sequences=("flair", "flair"), progress=False)

    first = convert_brats(src, raw, 210, sequences=("flair", "t1ce"), progress=False)
    stamp = (first / "dataset.json").stat().st_mtime_ns
    with pytest.raises(ConversionError, match="Dataset210_BraTS2021 exists; pass --overwrite"):
        convert_brats(src, raw, 210, sequences=("flair",), progress=False)
    assert (first / "dataset.json").stat().st_mtime_ns == stamp
    convert_brats(src, raw, 210, sequences=("flair",), overwrite=True, progress=False)
    assert load_json(str(first / "dataset.json"))["channel_names"] == {"0": "Flair"}
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset210_BraTS2021"]
