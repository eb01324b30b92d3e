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
from dataset_conversion.brats import main as brats_main
from dataset_conversion.raw_dataset import ConversionError

REPO = Path(__file__).resolve().parents[1]
LUT_2015 = np.array([0, 2, 1, 2, 3])  # 2015 label -> nnU-Net: 1 necrosis and 3 non-enhancing -> 2 (NCR/NET)


def _arr(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


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
    assert ("WARNING: 1 of 6 case(s) have no segmentation and go to imagesTs without a label: BraTS2021_00005"
            in res.stderr)
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
    written = sorted(f.name for f in (tmp_path / "back").iterdir())
    assert written == [f"BraTS2021_{i:05d}.nii.gz" for i in range(5)]  # every labelled case, nothing else
    for name in written:
        case = name[: -len(".nii.gz")]
        np.testing.assert_array_equal(_arr(tmp_path / "back" / name), _arr(brats21_small / case / f"{case}_seg.nii.gz"))
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


def test_left_out_inputs_named_with_why_or_refused(brats21_small, brats15_small, tmp_path, capsys):
    """Every input left out is named, with why, in one warning before anything is written; --strict refuses instead.
    A README, hidden files and DeepMedic's brainmask.nii.gz are no inputs; split folders are read in any case."""
    src = tmp_path / "in"
    shutil.copytree(brats21_small, src)
    (src / "BraTS2021_00001").rename(src / "BraTS2021_00001_rescan")  # its files keep the name BraTS2021_00001_*
    seg = src / "BraTS2021_00002" / "BraTS2021_00002_seg.nii.gz"
    seg.rename(seg.with_name("BraTS2021_00002_seg.NII.GZ"))
    case3 = src / "BraTS2021_00003"
    shutil.copy(case3 / "BraTS2021_00003_flair.nii.gz", case3 / "BraTS2021_00003_t2.nii")
    (src / "BraTS2021_00004.zip").write_bytes(b"PK")
    (src / "README.md").write_text("x")
    (src / "BraTS2021_00000" / ".DS_Store").write_text("x")
    layout = "not a file of the 2021 layout (<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz)"
    expected = {src / "BraTS2021_00001_rescan": "no BraTS case in it",
                src / "BraTS2021_00002" / "BraTS2021_00002_seg.NII.GZ": layout,
                case3 / "BraTS2021_00003_t2.nii": layout,
                src / "BraTS2021_00004.zip": "a file, not a case folder"}

    ds = convert_brats(src, tmp_path / "raw", 213, sequences=("flair", "t1ce"), progress=False)
    err = capsys.readouterr().err
    assert f"WARNING: {len(expected)} folder(s) or file(s)" in err
    for path, why in expected.items():
        assert f"  {path}: {why}\n" in err
    assert "README" not in err and "DS_Store" not in err
    assert (ds / "imagesTs" / "BraTS2021_00002_0000.nii.gz").is_file()  # without its seg: a test image
    assert len(load_json(ds / "dataset.json")["arseg_conversion"]["left_out"]) == len(expected)
    with pytest.raises(SystemExit) as refused:
        brats_main(["-i", str(src), "-o", str(tmp_path / "raw"), "-d", "214", "--sequences", "flair", "t1ce",
                    "--strict", "--disable_progress_bar"])
    message = str(refused.value.code)
    assert message.startswith(f"nnUNetv2_arseg_convert_brats: error: --strict: {len(expected)} folder(s) or file(s)")
    assert all(f"  {path}: {why}\n" in message for path, why in expected.items())
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["Dataset213_BraTS2021"]  # nothing written

    src15 = tmp_path / "in15"
    for split in ("train", "test"):
        shutil.copytree(brats15_small / split, src15 / split.capitalize())
    case = src15 / "Train" / "brats_2013_pat0005_1"
    shutil.copy(case / FILES_2015["seg"], case / "brainmask.nii.gz")
    (case / "License_CC_BY_NC_SA_3.0.txt").write_text("x")
    ds15 = convert_brats(src15, tmp_path / "raw", 215, sequences=("flair",), progress=False, strict=True)
    assert "WARNING" not in capsys.readouterr().err
    assert sorted(p.name for p in (ds15 / "imagesTs").iterdir()) == [f"brats_2013_pat000{i}_1_0000.nii.gz"
                                                                      for i in (1, 2)]


def _cut_in_half(path: Path) -> bytes:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return data


def test_truncated_nifti_is_an_error(brats21_small, nnunet_env, tmp_path):
    """A .nii.gz cut short (SimpleITK would read the missing planes as zeros) stops the CLI and names the file."""
    src = tmp_path / "in"
    shutil.copytree(brats21_small, src)
    env = {**os.environ, **nnunet_env}
    cli = [sys.executable, "-m", "dataset_conversion.brats", "-i", str(src), "-d", "203", "--sequences", "flair",
           "t1ce", "--disable_progress_bar"]
    for name in ("BraTS2021_00002_t1ce.nii.gz", "BraTS2021_00003_seg.nii.gz"):
        path = src / name[:15] / name
        original = _cut_in_half(path)
        res = subprocess.run(cli, env=env, cwd=REPO, capture_output=True, text=True)
        assert res.returncode == 1, res.stdout
        assert f"{name}: cannot read the" in res.stderr and "cut short" in res.stderr
        assert "replace the file or remove the case" in res.stderr
        assert list(Path(nnunet_env["nnUNet_raw"]).iterdir()) == []  # nothing half-written
        path.write_bytes(original)
    assert subprocess.run(cli, env=env, cwd=REPO, capture_output=True).returncode == 0


def _relabel(src: Path, dst: Path, old: int, new: int) -> np.ndarray:
    img = sitk.ReadImage(str(src))
    arr = sitk.GetArrayFromImage(img)
    out = sitk.GetImageFromArray(np.where(arr == old, new, arr).astype(np.uint8))
    out.CopyInformation(img)
    sitk.WriteImage(out, str(dst))
    return sitk.GetArrayFromImage(out)


def test_brats2023_labels_and_layout(brats21_small, tmp_path, capsys):
    cases = [f"BraTS2021_{i:05d}" for i in range(2)]
    # 2023 labels (3 = enhancing) in files named as in 2021: an error that explains, then the flag
    src = tmp_path / "in21"
    for case in cases:
        shutil.copytree(brats21_small / case, src / case)
        _relabel(brats21_small / case / f"{case}_seg.nii.gz", src / case / f"{case}_seg.nii.gz", 4, 3)
    raw = tmp_path / "raw"
    _expect_failure(src, raw, r"_seg\.nii\.gz: label 3 found.*BraTS 2023.*--label_convention 2023")
    ds = convert_brats(src, raw, 211, sequences=("flair", "t1ce"), progress=False, label_convention="2023")
    for case in cases:  # the same nnU-Net labels as the original 2021 files give
        expected = _arr(brats21_small / case / f"{case}_seg.nii.gz").astype(int)
        np.testing.assert_array_equal(_arr(ds / "labelsTr" / f"{case}.nii.gz"), np.array([0, 2, 1, 0, 3])[expected])

    # the 2023 file names are recognised by themselves: <case>/<case>-{t2f,t1c,seg}.nii.gz
    src23 = tmp_path / "in23"
    names = {}
    for i, case in enumerate(cases):
        new = f"BraTS-GLI-{i:05d}-000"
        names[new] = case
        (src23 / new).mkdir(parents=True)
        shutil.copy(brats21_small / case / f"{case}_flair.nii.gz", src23 / new / f"{new}-t2f.nii.gz")
        shutil.copy(brats21_small / case / f"{case}_t1ce.nii.gz", src23 / new / f"{new}-t1c.nii.gz")
        shutil.copy(src / case / f"{case}_seg.nii.gz", src23 / new / f"{new}-seg.nii.gz")
    (src23 / "BraTS-GLI-00009-000").mkdir()  # an empty folder: left out with a warning
    ds23 = convert_brats(src23, raw, 212, sequences=("flair", "t1ce"), progress=False)
    assert "WARNING: 1 folder(s)" in capsys.readouterr().err
    dj = load_json(str(ds23 / "dataset.json"))
    assert dj["arseg_conversion"]["layouts"] == ["2023"] and dj["arseg_conversion"]["label_conventions"] == ["2023"]
    for new, case in names.items():
        np.testing.assert_array_equal(_arr(ds23 / "labelsTr" / f"{new}.nii.gz"),
                                      _arr(ds / "labelsTr" / f"{case}.nii.gz"))
        np.testing.assert_array_equal(_arr(ds23 / "imagesTr" / f"{new}_0000.nii.gz"),
                                      _arr(brats21_small / case / f"{case}_flair.nii.gz"))
    # back to 2023 labels, as the prediction folder's dataset.json (nnU-Net copies it there) says
    pred = tmp_path / "pred"
    shutil.copytree(ds23 / "labelsTr", pred)
    shutil.copy(ds23 / "dataset.json", pred / "dataset.json")
    for f in convert_brats_back(pred, tmp_path / "back23", progress=False):
        np.testing.assert_array_equal(_arr(f), _arr(src23 / f.name[:-7] / f"{f.name[:-7]}-seg.nii.gz"))
    # 2021 labels in 2023 files: the other way round
    new = next(iter(names))
    shutil.copy(brats21_small / names[new] / f"{names[new]}_seg.nii.gz", src23 / new / f"{new}-seg.nii.gz")
    _expect_failure(src23, tmp_path / "raw2", r"-seg\.nii\.gz: label 4 found.*--label_convention 2021")
