"""LIDC converter on the real crops: demo (LIDC-IDRI-slices layout), CIMD-28 (JPEG) and the DeepMind layout."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
from PIL import Image

from dataset_conversion.lidc import convert_lidc, find_lidc_slices, split_by_patient
from dataset_conversion.lidc import main as lidc_main
from dataset_conversion.raw_dataset import ConversionError

REPO = Path(__file__).resolve().parents[1]


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _cases(folder: Path) -> list[str]:
    return sorted(p.name[: -len("_0000.png")] for p in folder.glob("*_0000.png"))


def _convert(src, raw, did, **kw) -> Path:
    return convert_lidc(src, raw, did, progress=False, **kw)


@pytest.fixture(scope="module")
def demo_ds(lidc_demo, tmp_path_factory) -> Path:
    return _convert(lidc_demo, tmp_path_factory.mktemp("raw"), 101)


@pytest.fixture(scope="module")
def deepmind_input(lidc_demo, tmp_path_factory) -> Path:
    """The demo crops in the exact DeepMind layout, padded 128 -> 180; 5 train, 1 val, 2 test patients."""
    root = tmp_path_factory.mktemp("deepmind")
    patients = sorted({s.patient for s in find_lidc_slices(lidc_demo)})
    split = {p: "train" if i < 5 else "val" if i == 5 else "test" for i, p in enumerate(patients)}
    for s in find_lidc_slices(lidc_demo):
        name = f"z-{s.slice_index}.0_c{s.nodule}"
        img_dir, gt_dir = (root / split[s.patient] / d / s.patient for d in ("images", "gt"))
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.pad(_png(s.image), 26)).save(img_dir / f"{name}.png")
        for k, m in enumerate(s.rater_masks):
            Image.fromarray(np.pad(_png(m), 26)).save(gt_dir / f"{name}_l{k}.png")
    return root


@pytest.fixture
def small_lidc(lidc_demo, tmp_path) -> Path:
    """A writable copy of two demo patients, for the bad-input tests."""
    root = tmp_path / "in"
    for p in ("LIDC-IDRI-0002", "LIDC-IDRI-0005"):
        shutil.copytree(lidc_demo / p, root / p)
    return root


def test_find_lidc_slices_sorted_numerically(lidc_demo):
    slices = find_lidc_slices(lidc_demo)
    assert len(slices) == 162
    assert len({s.patient for s in slices}) == 8 and len({(s.patient, s.nodule) for s in slices}) == 35
    keys = [(s.patient, s.nodule, s.slice_index) for s in slices]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    first = [s.slice_index for s in slices if (s.patient, s.nodule) == ("LIDC-IDRI-0002", 0)]
    assert first == list(range(len(first))) and len(first) > 10  # 10 after 9, not after 1
    assert all(len(s.rater_masks) == 4 and all(m.is_file() for m in s.rater_masks) for s in slices)


def test_demo_counts_patients_and_raters(demo_ds):
    ds = load_json(str(demo_ds / "dataset.json"))
    tr, ts = _cases(demo_ds / "imagesTr"), _cases(demo_ds / "imagesTs")
    assert len(tr) + len(ts) == 162 and ds["numTraining"] == len(tr)
    assert ds["file_ending"] == ".png" and ds["labels"] == {"background": 0, "nodule": 1}
    arseg = ds["arseg"]
    assert arseg["num_raters"] == 4 and arseg["raters_folder"] == "labelsTr_raters"
    pat = arseg["patient_of_case"]
    assert set(pat) == set(tr) | set(ts)
    tr_p, ts_p = {pat[c] for c in tr}, {pat[c] for c in ts}
    assert not tr_p & ts_p and len(ts_p) == 2 and len(tr_p) == 6  # round(0.2 * 8) patients held out
    assert "LIDC0002_n0_s03" in pat and pat["LIDC0002_n0_s03"] == "LIDC-IDRI-0002"
    for s, cases in (("Tr", tr), ("Ts", ts)):
        assert sorted(p.name for p in (demo_ds / f"labels{s}").iterdir()) == sorted(f"{c}.png" for c in cases)
        assert len(list((demo_ds / f"labels{s}_raters").iterdir())) == 4 * len(cases)
    assert not list(demo_ds.rglob(".tmp-*")) and not list(demo_ds.parent.glob(".*partial"))


def test_demo_pixels_raters_and_majority(lidc_demo, demo_ds):
    pat = load_json(str(demo_ds / "dataset.json"))["arseg"]["patient_of_case"]
    n_ties = 0
    for s in find_lidc_slices(lidc_demo)[::3]:
        case = f"LIDC{s.patient[-4:]}_n{s.nodule}_s{s.slice_index:02d}"
        sub = "Ts" if (demo_ds / "imagesTs" / f"{case}_0000.png").exists() else "Tr"
        assert pat[case] == s.patient
        np.testing.assert_array_equal(_png(demo_ds / f"images{sub}" / f"{case}_0000.png"), _png(s.image))
        src = np.stack([_png(m) == 255 for m in s.rater_masks])
        raters = np.stack([_png(demo_ds / f"labels{sub}_raters" / f"{case}_r{k}.png") for k in range(4)])
        np.testing.assert_array_equal(raters, src.astype(np.uint8))
        votes = src.sum(0)
        n_ties += int((votes == 2).any())
        np.testing.assert_array_equal(_png(demo_ds / f"labels{sub}" / f"{case}.png"), (votes >= 3).astype(np.uint8))
    assert n_ties > 0  # the 2-of-4 tie (-> background) really occurs in the checked slices


def test_split_seeded_and_grouped():
    patients = [f"p{i}" for i in range(10) for _ in range(3)]
    assert split_by_patient(patients, 0.2, 1) == split_by_patient(patients, 0.2, 1)
    assert len(split_by_patient(patients, 0.2, 1)) == 2 and split_by_patient(patients, 0.0, 1) == set()
    assert len({frozenset(split_by_patient(patients, 0.3, s)) for s in range(5)}) > 1
    with pytest.raises(ConversionError, match="test_fraction"):
        split_by_patient(patients, 1.0, 1)


def test_cimd_jpeg_needs_threshold(lidc_cimd28, tmp_path):
    with pytest.raises(ConversionError, match=r"label\d_\.jpg.*--threshold 127"):
        _convert(lidc_cimd28, tmp_path, 102)
    assert list(tmp_path.iterdir()) == []  # nothing half-written left
    ds_dir = _convert(lidc_cimd28, tmp_path, 102, threshold=127)
    ds = load_json(str(ds_dir / "dataset.json"))
    assert ds["numTraining"] == 19 and len(_cases(ds_dir / "imagesTs")) == 9  # the layout's own split
    case_dir = lidc_cimd28 / "training" / "3"
    jpeg = np.stack([_png(case_dir / f"label{k}_.jpg") > 127 for k in range(4)])
    raters = np.stack([_png(ds_dir / "labelsTr_raters" / f"CIMD_tr003_r{k}.png") for k in range(4)])
    np.testing.assert_array_equal(raters, jpeg.astype(np.uint8))
    np.testing.assert_array_equal(_png(ds_dir / "labelsTr" / "CIMD_tr003.png"), (jpeg.sum(0) > 2).astype(np.uint8))
    assert ds["arseg"]["patient_of_case"]["CIMD_ts012"] == "CIMD_ts012"


def test_deepmind_layout_split_and_crop(lidc_demo, deepmind_input, tmp_path):
    ds_dir = _convert(deepmind_input, tmp_path, 103)
    pat = load_json(str(ds_dir / "dataset.json"))["arseg"]["patient_of_case"]
    tr, ts = _cases(ds_dir / "imagesTr"), _cases(ds_dir / "imagesTs")
    test_patients = {p.name for p in (deepmind_input / "test" / "images").iterdir()}
    assert {pat[c] for c in ts} == test_patients and not {pat[c] for c in tr} & test_patients
    assert len(tr) + len(ts) == 162
    s = find_lidc_slices(lidc_demo)[5]
    case = f"LIDC{s.patient[-4:]}_z{s.slice_index}p0_c{s.nodule}"
    sub = "Ts" if s.patient in test_patients else "Tr"
    np.testing.assert_array_equal(_png(ds_dir / f"images{sub}" / f"{case}_0000.png"), _png(s.image))  # 180 -> 128
    np.testing.assert_array_equal(_png(ds_dir / f"labels{sub}_raters" / f"{case}_r1.png"), _png(s.rater_masks[1]) > 0)
    keep = _convert(deepmind_input, tmp_path, 104, no_crop=True, test_fraction=0.25)
    assert _png(next((keep / "imagesTr").iterdir())).shape == (180, 180)
    assert len({pat[c] for c in _cases(keep / "imagesTs")}) == 2  # re-split by patient when asked


def test_cli_and_nnunet_integrity(lidc_demo, lidc_cimd28, nnunet_env):
    env = {**os.environ, **nnunet_env}
    cli = [sys.executable, "-m", "dataset_conversion.lidc", "-i", str(lidc_cimd28), "-d", "2", "--disable_progress_bar"]
    res = subprocess.run(cli + ["--threshold", "127"], env=env, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "28 cases from 28 patients, 4 raters" in res.stdout and "empty masks" in res.stdout
    res = subprocess.run(cli + ["--threshold", "127"], env=env, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 1 and "Dataset002_LIDC exists; pass --overwrite" in res.stderr
    raw, pre = Path(nnunet_env["nnUNet_raw"]), Path(nnunet_env["nnUNet_preprocessed"])
    _convert(lidc_demo, raw, 1)
    bin_dir = Path(sys.executable).parent
    res = subprocess.run([str(bin_dir / "nnUNetv2_plan_and_preprocess"), "-d", "2", "-c", "2d",
                          "--verify_dataset_integrity", "-np", "1", "-npfp", "1"],
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert len(list((pre / "Dataset002_LIDC" / "nnUNetPlans_2d").glob("*.pkl"))) == 19
    # the demo: nnU-Net's integrity check and fingerprint only, to keep the test short
    res = subprocess.run([str(bin_dir / "nnUNetv2_extract_fingerprint"), "-d", "1", "--verify_dataset_integrity",
                          "-np", "1"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    fingerprint = load_json(str(pre / "Dataset001_LIDC" / "dataset_fingerprint.json"))
    n_tr = load_json(str(raw / "Dataset001_LIDC" / "dataset.json"))["numTraining"]
    assert len(fingerprint["shapes_after_crop"]) == n_tr


def _expect_failure(src: Path, raw: Path, match: str, **kw) -> None:
    with pytest.raises(ConversionError, match=match):
        _convert(src, raw, 110, **kw)
    assert not raw.exists() or list(raw.iterdir()) == []


def test_bad_inputs(small_lidc, tmp_path):
    raw = tmp_path / "raw"
    nod = small_lidc / "LIDC-IDRI-0005" / "nodule-1"
    mask = nod / "mask-2" / "slice-1.png"
    original = mask.read_bytes()

    mask.unlink()
    _expect_failure(small_lidc, raw, r"mask-2/slice-1\.png: rater 2 mask is missing")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(mask)
    _expect_failure(small_lidc, raw, r"slice-1\.png: rater 2 mask is 64x64 but its image .* is 128x128")
    grey = np.zeros((128, 128), np.uint8)
    grey[40:60, 40:60], grey[60:70, 60:70] = 200, 100
    Image.fromarray(grey).save(mask)
    _expect_failure(small_lidc, raw, r"slice-1\.png: mask values \[0, 100, 200\] are not binary.*--threshold")
    assert (_convert(small_lidc, raw, 110, threshold=150) / "dataset.json").is_file()  # accepted when asked
    shutil.rmtree(raw)
    mask.write_bytes(original)

    image = nod / "images" / "slice-0.png"
    image_bytes = image.read_bytes()
    image.write_bytes(b"not a png")
    _expect_failure(small_lidc, raw, r"images/slice-0\.png: cannot read the image")
    image.write_bytes(image_bytes)

    dup = nod / "images" / "slice-02.png"
    shutil.copy(nod / "images" / "slice-2.png", dup)
    for k in range(4):
        shutil.copy(nod / f"mask-{k}" / "slice-2.png", nod / f"mask-{k}" / "slice-02.png")
    _expect_failure(small_lidc, raw, r"duplicated case id 'LIDC0005_n1_s02'")
    for p in nod.rglob("slice-02.png"):
        p.unlink()

    (tmp_path / "empty").mkdir()
    _expect_failure(tmp_path / "empty", raw, "no LIDC crops found")
    (tmp_path / "empty" / "LIDC-IDRI-0001").mkdir()
    _expect_failure(tmp_path / "empty", raw, "holds no image")
    _expect_failure(tmp_path / "absent", raw, "does not exist")
    # the bad files above were never modified by the converter
    assert mask.read_bytes() == original and image.read_bytes() == image_bytes


def test_existing_output_and_overwrite(small_lidc, tmp_path):
    raw = tmp_path / "raw"
    first = _convert(small_lidc, raw, 120, test_fraction=0.5)
    marker = first / "imagesTr" / "user_note.txt"
    marker.write_text("mine")
    with pytest.raises(ConversionError, match=r"Dataset120_LIDC exists; pass --overwrite"):
        _convert(small_lidc, raw, 120, test_fraction=0.0)
    assert marker.read_text() == "mine"
    with pytest.raises(ConversionError, match="already uses dataset id 120"):
        _convert(small_lidc, raw, 120, name="Other", overwrite=True)
    # an interrupted earlier run leaves a staging folder; it is never trusted
    stale = raw / ".Dataset120_LIDC.partial" / "imagesTr"
    stale.mkdir(parents=True)
    (stale / "LIDC9999_n0_s00_0000.png").write_bytes(b"half")
    second = _convert(small_lidc, raw, 120, test_fraction=0.0, overwrite=True)
    ds = load_json(str(second / "dataset.json"))
    assert not marker.exists() and not (second / "imagesTr" / "LIDC9999_n0_s00_0000.png").exists()
    assert ds["numTraining"] == len(ds["arseg"]["patient_of_case"]) and sorted(p.name for p in raw.iterdir()) == [
        "Dataset120_LIDC"]
    # a folder this converter did not write is never replaced
    foreign = raw / "Dataset121_LIDC"
    foreign.mkdir()
    save_json({"name": "someone else's"}, str(foreign / "dataset.json"))
    with pytest.raises(ConversionError, match="not written by this converter"):
        _convert(small_lidc, raw, 121, overwrite=True)
    assert load_json(str(foreign / "dataset.json")) == {"name": "someone else's"}


def test_explicit_test_folder(lidc_demo, tmp_path):
    """``--test_input``: every case of the second folder is a test case, every case of -i a training case."""
    train_in, test_in = tmp_path / "train", tmp_path / "test"
    for folder, patients in ((train_in, ("LIDC-IDRI-0002", "LIDC-IDRI-0005")), (test_in, ("LIDC-IDRI-0014",))):
        folder.mkdir()
        for p in patients:
            (folder / p).symlink_to(lidc_demo / p)
    ds = _convert(train_in, tmp_path / "raw", 105, test_input_folder=test_in)
    patient_of_case = load_json(ds / "dataset.json")["arseg"]["patient_of_case"]
    assert {patient_of_case[c] for c in _cases(ds / "imagesTs")} == {"LIDC-IDRI-0014"}
    assert {patient_of_case[c] for c in _cases(ds / "imagesTr")} == {"LIDC-IDRI-0002", "LIDC-IDRI-0005"}
    assert len(_cases(ds / "imagesTs")) == len(find_lidc_slices(test_in))
    with pytest.raises(ConversionError, match="duplicated case id"):
        _convert(train_in, tmp_path / "raw2", 106, test_input_folder=train_in)


def test_unusual_names_read_and_leftovers_named(lidc_demo, tmp_path, capsys):
    """``LIDC-IDRI-0002_rescan``, ``Images/`` and ``slice-1.PNG`` are read; what does not fit is named, with a count."""
    src = tmp_path / "in"
    shutil.copytree(lidc_demo / "LIDC-IDRI-0002", src / "LIDC-IDRI-0002_rescan")
    for p in ("LIDC-IDRI-0005", "LIDC-IDRI-0006"):
        shutil.copytree(lidc_demo / p, src / p)
    for nodule in (src / "LIDC-IDRI-0005").iterdir():
        (nodule / "images").rename(nodule / "Images")
    images = src / "LIDC-IDRI-0006" / "nodule-0" / "images"
    (images / "slice-1.png").rename(images / "slice-1.PNG")
    (src / "to_check").mkdir()
    (images / "slice-1.txt").write_text("notes")
    expected = [s for s in find_lidc_slices(lidc_demo) if s.patient in ("LIDC-IDRI-0002", "LIDC-IDRI-0005",
                                                                          "LIDC-IDRI-0006")]

    ds = _convert(src, tmp_path / "raw", 130, test_fraction=0.34)
    pat = load_json(ds / "dataset.json")["arseg"]["patient_of_case"]
    assert len(pat) == len(expected) == len(_cases(ds / "imagesTr")) + len(_cases(ds / "imagesTs"))
    assert sorted(set(pat.values())) == ["LIDC-IDRI-0002", "LIDC-IDRI-0005", "LIDC-IDRI-0006"]
    rescan = [c for c in pat if c.startswith("LIDC0002_rescan_n")]
    assert len(rescan) == sum(s.patient == "LIDC-IDRI-0002" for s in expected)  # kept with its patient
    sub = "Ts" if (ds / "imagesTs" / "LIDC0006_n0_s01_0000.png").exists() else "Tr"
    np.testing.assert_array_equal(_png(ds / f"images{sub}" / "LIDC0006_n0_s01_0000.png"),
                                  _png(lidc_demo / "LIDC-IDRI-0006" / "nodule-0" / "images" / "slice-1.png"))
    err = capsys.readouterr().err
    assert "WARNING: 2 folder(s) or file(s)" in err and "to_check" in err and "slice-1.txt" in err
    assert len(load_json(ds / "dataset.json")["arseg_conversion"]["left_out"]) == 2


def test_left_out_inputs_named_with_why_or_refused(lidc_demo, tmp_path, capsys):
    """Every input left out is named, with why, in one warning before anything is written; --strict refuses instead.
    The renames of ``test_unusual_names_read_and_leftovers_named`` are read, so they are not named; hidden files,
    ``__MACOSX`` and a README beside the patient folders are no inputs."""
    src = tmp_path / "in"
    shutil.copytree(lidc_demo / "LIDC-IDRI-0002", src / "LIDC-IDRI-0002_rescan")
    for p in ("LIDC-IDRI-0005", "LIDC-IDRI-0006"):
        shutil.copytree(lidc_demo / p, src / p)
    shutil.copytree(lidc_demo / "LIDC-IDRI-0010", src / "LIDC_IDRI_0010")
    (src / "LIDC-IDRI-0011.zip").write_bytes(b"PK")
    (src / "LIDC-IDRI-0005" / "nodule-0" / "images").rename(src / "LIDC-IDRI-0005" / "nodule-0" / "Images")
    (src / "LIDC-IDRI-0005" / "nodule-2" / "images").rename(src / "LIDC-IDRI-0005" / "nodule-2" / "imgs")
    nod = src / "LIDC-IDRI-0006" / "nodule-0"
    (nod / "images" / "slice-1.png").rename(nod / "images" / "slice-1.PNG")
    (nod / "images" / "slice-0.png").rename(nod / "images" / "slice-0.jpg")
    for hidden in (src / ".DS_Store", nod / "images" / ".DS_Store", src / "README.md"):
        hidden.write_text("x")
    (src / "__MACOSX").mkdir()
    expected = {src / "LIDC-IDRI-0005" / "nodule-2": "no images/ folder in it",
                nod / "images" / "slice-0.jpg": "not a slice-N.png image",
                **{nod / f"mask-{k}" / "slice-0.png": "no image images/slice-0.png goes with this mask"
                   for k in range(4)},
                src / "LIDC-IDRI-0011.zip": "not a patient folder (LIDC-IDRI-XXXX/)",
                src / "LIDC_IDRI_0010": "not a patient folder (LIDC-IDRI-XXXX/)"}
    n_read = sum(s.patient in ("LIDC-IDRI-0002", "LIDC-IDRI-0005", "LIDC-IDRI-0006")
                 for s in find_lidc_slices(lidc_demo)) - len(list((src / "LIDC-IDRI-0005" / "nodule-2" / "imgs")
                                                                 .iterdir())) - 1

    ds = _convert(src, tmp_path / "raw", 140, test_fraction=0.34)
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1 and f"WARNING: {len(expected)} folder(s) or file(s)" in err
    for path, why in expected.items():
        assert f"  {path}: {why}\n" in err
    for read in ("LIDC-IDRI-0002_rescan", "Images", "slice-1.PNG", "DS_Store", "README", "MACOSX"):
        assert read not in err
    assert len(load_json(ds / "dataset.json")["arseg"]["patient_of_case"]) == n_read
    assert len(load_json(ds / "dataset.json")["arseg_conversion"]["left_out"]) == len(expected)

    with pytest.raises(SystemExit) as refused:
        lidc_main(["-i", str(src), "-o", str(tmp_path / "raw"), "-d", "141", "--strict", "--disable_progress_bar"])
    message = str(refused.value.code)
    assert message.startswith(f"nnUNetv2_arseg_convert_lidc: error: --strict: {len(expected)} folder(s) or file(s)")
    assert all(f"  {path}: {why}\n" in message for path, why in expected.items())
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["Dataset140_LIDC"]  # nothing written


def test_empty_test_set_is_an_error(lidc_demo, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "LIDC-IDRI-0002").symlink_to(lidc_demo / "LIDC-IDRI-0002")
    _expect_failure(src, tmp_path / "raw", r"1 patient\(s\) \(LIDC-IDRI-0002\) give an empty test set.*--test_input")
    ds = _convert(src, tmp_path / "raw", 110, test_fraction=0.0)  # asked for: everything is training data
    assert _cases(ds / "imagesTs") == [] and load_json(ds / "dataset.json")["numTraining"] > 0


def test_dataset_id_checked_across_nnunet_folders(small_lidc, nnunet_env):
    env = {**os.environ, **nnunet_env}
    raw = Path(nnunet_env["nnUNet_raw"])
    cli = [sys.executable, "-m", "dataset_conversion.lidc", "-i", str(small_lidc), "-d", "8", "--disable_progress_bar"]
    for key in ("nnUNet_preprocessed", "nnUNet_results"):
        other = Path(nnunet_env[key]) / "Dataset008_Other"
        other.mkdir()
        res = subprocess.run(cli, env=env, cwd=REPO, capture_output=True, text=True)
        assert res.returncode == 1 and f"Dataset008_Other ({key}) already uses dataset id 8" in res.stderr
        assert "choose another -d" in res.stderr and list(raw.iterdir()) == []
        other.rmdir()
    (Path(nnunet_env["nnUNet_results"]) / "Dataset008_Other").mkdir()
    res = subprocess.run(cli + ["-n", "Other"], env=env, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr  # the same name is the same dataset
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset008_Other"]


def test_truncated_png_named(small_lidc, tmp_path):
    mask = small_lidc / "LIDC-IDRI-0005" / "nodule-1" / "mask-3" / "slice-2.png"
    mask.write_bytes(mask.read_bytes()[:-40])
    _expect_failure(small_lidc, tmp_path / "raw", r"mask-3/slice-2\.png: cannot read the rater 3 mask: .*cut short")
