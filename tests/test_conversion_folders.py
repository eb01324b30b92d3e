"""``nnUNetv2_arseg_convert_folders`` on layouts built from the bundled LIDC crops: ``images/`` + one folder per rater,
2 to 6 raters per case (some cases lacking raters, masks saved as 0/1 or 0/255), a two-label variant, bad input; and
end to end (convert, plan and preprocess, train the tiny AR-Seg, predict, evaluate) for a 2D PNG dataset with 2 to 6
raters per case and a 3D NIfTI dataset with 3 raters."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage

from dataset_conversion.folders import convert_folders
from dataset_conversion.folders import main as folders_main
from dataset_conversion.raw_dataset import ConversionError
from nnunet_arseg.training import raters

PY = sys.executable
BIN = Path(PY).parent
RATERS = ["raterA", "raterB", "raterC", "raterD", "raterE", "raterF"]  # rater k draws LIDC mask k % 4
# (patient, nodule, slice) -> the raters k that drew the case: 2 to 6 per case, some lacking a rater before others
PLAN_2D = {
    ("LIDC-IDRI-0005", 0, 0): [0, 1],
    ("LIDC-IDRI-0005", 1, 0): [2, 3, 5],
    ("LIDC-IDRI-0006", 0, 0): [0, 1, 2, 3],
    ("LIDC-IDRI-0006", 1, 0): [1, 2, 3, 4, 5],
    ("LIDC-IDRI-0010", 0, 0): [0, 1, 2, 3, 4, 5],
    ("LIDC-IDRI-0010", 1, 0): [0, 3],
    ("LIDC-IDRI-0011", 0, 0): [0, 1, 2],
    ("LIDC-IDRI-0011", 1, 0): [0, 1, 2, 3],
    ("LIDC-IDRI-0012", 0, 0): [0, 1, 2, 3, 4],
    ("LIDC-IDRI-0012", 1, 0): [0, 1, 2, 3, 4, 5],
}
PATIENT_REGEX = r"^(LIDC-IDRI-\d+)"
CROP_2D = (slice(32, 96), slice(32, 96))  # 64 x 64 around the nodule: a small 2D patch keeps the runs short


def _case(p: str, n: int, s: int) -> str:
    return f"{p}_n{n}_s{s}"


def _mask(lidc: Path, p: str, n: int, s: int, k: int) -> np.ndarray:
    """LIDC rater ``k % 4``'s mask (bool) of one slice, cropped as the 2D images."""
    return _png(lidc / p / f"nodule-{n}" / f"mask-{k % 4}" / f"slice-{s}.png")[CROP_2D] > 0


def _save_mask(mask: np.ndarray, path: Path, k: int) -> None:
    """Odd raters as 0/255, even ones as 0/1 (both are binary masks to the converter)."""
    path.parent.mkdir(exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * (255 if k % 2 else 1)).save(path)


def _build_2d(lidc: Path, root: Path, plan: dict = PLAN_2D) -> Path:
    (root / "images").mkdir(parents=True)
    for (p, n, s), ks in plan.items():
        case = _case(p, n, s)
        Image.fromarray(_png(lidc / p / f"nodule-{n}" / "images" / f"slice-{s}.png")[CROP_2D]).save(
            root / "images" / f"{case}.png")
        for k in ks:
            _save_mask(_mask(lidc, p, n, s, k), root / RATERS[k] / f"{case}.png", k)
    return root


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_variable_rater_counts_consensus_and_raters(lidc_demo, tmp_path):
    src = _build_2d(lidc_demo, tmp_path / "in")
    out = convert_folders(src, tmp_path / "raw", 530, "Folders", patient_regex=PATIENT_REGEX, test_fraction=0.2,
                          progress=False)
    dj = json.loads((out / "dataset.json").read_text())
    arseg = dj["arseg"]
    assert arseg["num_raters"] == 6 and arseg["rater_names"] == RATERS and dj["labels"] == {"background": 0,
                                                                                           "foreground": 1}
    assert arseg["raters_of_case"] == {_case(*key): ks for key, ks in PLAN_2D.items()}
    assert arseg["patient_of_case"] == {_case(*key): key[0] for key in PLAN_2D}
    test_cases = {p.name[:-len("_0000.png")] for p in (out / "imagesTs").glob("*.png")}
    assert len({arseg["patient_of_case"][c] for c in test_cases}) == 1 and dj["numTraining"] == 10 - len(test_cases)
    ties = 0
    for (p, n, s), ks in PLAN_2D.items():
        case, split = _case(p, n, s), "Ts" if _case(p, n, s) in test_cases else "Tr"
        image = out / f"images{split}" / f"{case}_0000.png"
        assert image.read_bytes() == (src / "images" / f"{case}.png").read_bytes()  # copied as it is
        written = sorted(f.name for f in (out / f"labels{split}_raters").glob(f"{case}_r*.png"))
        assert written == [f"{case}_r{k}.png" for k in ks]  # rater identity kept: the k-th folder is r<k>
        masks = []
        for k in ks:
            m = _png(out / f"labels{split}_raters" / f"{case}_r{k}.png")
            assert m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}  # 0/255 and 0/1 both became 0/1
            np.testing.assert_array_equal(m, _mask(lidc_demo, p, n, s, k))
            masks.append(m)
        votes = np.sum(masks, 0)
        np.testing.assert_array_equal(_png(out / f"labels{split}" / f"{case}.png"), 2 * votes > len(ks))
        ties += int((2 * votes == len(ks)).sum())
    assert ties > 0  # the data holds ties (R/2 raters), and they went to background
    # training reads the raters each case has; without raters_of_case every case needs all six
    case = _case("LIDC-IDRI-0006", 0, 0)
    split = "Ts" if case in test_cases else "Tr"
    dj["arseg"]["raters_folder"] = f"labels{split}_raters"
    assert [Path(f).name for f in raters.raw_rater_files(str(out), dj, case)] == [f"{case}_r{k}.png"
                                                                                 for k in range(4)]
    del dj["arseg"]["raters_of_case"]
    with pytest.raises(FileNotFoundError, match=rf"{case}_r4\.png is missing.*raters_of_case"):
        raters.raw_rater_files(str(out), dj, case)


def test_two_labels_declared_with_values_and_patients_from_csv(lidc_demo, tmp_path):
    """Masks holding two labels (the nodule at 128, its core, eroded, at 255) with --labels NAME=VALUE: labels 1 and 2,
    each label's consensus the strict majority of the raters for that label."""
    keys = [("LIDC-IDRI-0014", 0, s) for s in (1, 2, 3)]
    root = tmp_path / "in"
    (root / "images").mkdir(parents=True)
    expected = {}
    for p, n, s in keys:
        case = _case(p, n, s)
        Image.fromarray(_png(lidc_demo / p / f"nodule-{n}" / "images" / f"slice-{s}.png")[CROP_2D]).save(
            root / "images" / f"{case}.png")
        maps = []
        for k in range(3):
            m = _mask(lidc_demo, p, n, s, k)
            label = np.where(ndimage.binary_erosion(m, iterations=2), 2, m.astype(np.uint8))
            (root / RATERS[k]).mkdir(exist_ok=True)
            Image.fromarray(np.array([0, 128, 255], np.uint8)[label]).save(root / RATERS[k] / f"{case}.png")
            maps.append(label)
        expected[case] = maps
    (tmp_path / "patients.csv").write_text("case,patient\n" + "".join(f"{_case(*key)},P{key[2] % 2}\n"
                                                                        for key in keys))
    out = convert_folders(root, tmp_path / "raw", 531, "TwoLabels", labels=["nodule=128", "core=255"],
                          patient_csv=tmp_path / "patients.csv", progress=False)
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "nodule": 1, "core": 2} and "raters_of_case" not in dj["arseg"]
    assert dj["arseg"]["patient_of_case"] == {_case(*key): f"P{key[2] % 2}" for key in keys}
    for case, maps in expected.items():
        for k, label in enumerate(maps):
            np.testing.assert_array_equal(_png(out / "labelsTr_raters" / f"{case}_r{k}.png"), label)
        cons = _png(out / "labelsTr" / f"{case}.png")
        for lab in (1, 2):
            np.testing.assert_array_equal(cons == lab, 2 * np.sum([m == lab for m in maps], 0) > 3)
        assert {1, 2} <= set(np.unique(cons).tolist())


def _break_shape(root):
    m = _png(root / "raterB" / "LIDC-IDRI-0005_n0_s0.png")
    Image.fromarray(m[:50]).save(root / "raterB" / "LIDC-IDRI-0005_n0_s0.png")


def _break_values(root):
    m = _png(root / "raterA" / "LIDC-IDRI-0005_n0_s0.png").copy()
    m[:2, :2] = 128
    Image.fromarray(np.where(m == 1, 255, m).astype(np.uint8)).save(root / "raterA" / "LIDC-IDRI-0005_n0_s0.png")


def _empty_rater(root):
    (root / "raterC").mkdir()
    (root / "raterC" / "notes.txt").write_text("to do")


def _bad_case_id(root):
    for f in [root / "images" / "LIDC-IDRI-0005_n0_s0.png"] + list(root.glob("rater*/LIDC-IDRI-0005_n0_s0.png")):
        f.rename(f.with_name("LIDC IDRI 0005.png"))


@pytest.mark.parametrize("breaker, kwargs, message", [
    (lambda r: (r / "raterA" / "LIDC-IDRI-0005_n1_s0.png").unlink() or (r / "raterB" / "LIDC-IDRI-0005_n1_s0.png")
     .unlink(), {}, r"images/LIDC-IDRI-0005_n1_s0\.png: image of case 'LIDC-IDRI-0005_n1_s0' has no mask in any "
                    r"rater folder"),
    (_break_shape, {}, r"raterB/LIDC-IDRI-0005_n0_s0\.png: rater mask has shape \(1, 50, 64\) but its image has "
                       r"\(1, 64, 64\)"),
    (_break_values, {}, r"raterA/LIDC-IDRI-0005_n0_s0\.png: mask values \[0, 128, 255\] are not binary.*--labels"),
    (lambda r: None, {"labels": ["nodule=1", "core=2"]},
     r"raterB/LIDC-IDRI-0005_n0_s0\.png: mask values \[255\] are not among the declared labels \[1, 2\]"),
    (_empty_rater, {}, r"raterC: rater folder holds no \.png mask"),
    (_bad_case_id, {}, r"LIDC IDRI 0005\.png: derived case id 'LIDC IDRI 0005' is not a valid nnU-Net identifier"),
    (lambda r: None, {"patient_regex": r"^(LIDC-\d+)"}, r"case 'LIDC-IDRI-0005_n0_s0': --patient_regex"),
    (lambda r: (r / "raterA" / "LIDC-IDRI-9999.png").write_bytes(b""), {},
     r"raterA/LIDC-IDRI-9999\.png: rater mask of case 'LIDC-IDRI-9999', which has no image"),
])
def test_bad_input_names_the_file(lidc_demo, tmp_path, breaker, kwargs, message):
    plan = {("LIDC-IDRI-0005", 0, 0): [0, 1], ("LIDC-IDRI-0005", 1, 0): [0, 1]}
    root = _build_2d(lidc_demo, tmp_path / "in", plan)
    breaker(root)
    with pytest.raises(ConversionError, match=message):
        convert_folders(root, tmp_path / "raw", 532, "Bad", progress=False, **kwargs)
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())  # nothing left behind


def test_left_out_inputs_named_with_why_or_refused(lidc_demo, tmp_path, capsys):
    """Every input left out is named, with why, in one warning before anything is written; --strict refuses instead.
    A mask renamed to .PNG is read; a README, hidden files and Thumbs.db are no inputs."""
    plan = {("LIDC-IDRI-0005", 0, 0): [0, 1], ("LIDC-IDRI-0005", 1, 0): [0, 1, 2]}
    root = _build_2d(lidc_demo, tmp_path / "in", plan)
    case0, case1 = _case("LIDC-IDRI-0005", 0, 0), _case("LIDC-IDRI-0005", 1, 0)
    (root / "raterA" / f"{case0}.png").rename(root / "raterA" / f"{case0}.PNG")
    (root / "raterB" / f"{case1}.png").rename(root / "raterB" / f"{case1}.jpeg")
    (root / "images" / "rescan").mkdir()
    shutil.copy(root / "images" / f"{case0}.png", root / "images" / "rescan" / f"{case0}.png")
    (root / "raterC" / "round2").mkdir()
    shutil.copy(root / "raterC" / f"{case1}.png", root / "raterC" / "round2" / f"{case1}.png")
    shutil.copy(root / "images" / f"{case1}.png", root / f"{case1}.png")
    for other in (root / "README.md", root / "images" / ".DS_Store", root / "raterA" / "Thumbs.db"):
        other.write_text("x")
    expected = {root / f"{case1}.png": "a file beside images/ and the rater folders",
                root / "images" / "rescan": "a folder; images/ holds one file per case (or per channel)",
                root / "raterB" / f"{case1}.jpeg": "not a .png mask like the images",
                root / "raterC" / "round2": "a folder; a rater folder holds one mask file per case"}

    out = convert_folders(root, tmp_path / "raw", 533, "LeftOut", progress=False)
    err = capsys.readouterr().err
    assert f"WARNING: {len(expected)} folder(s) or file(s)" in err
    for path, why in expected.items():
        assert f"  {path}: {why}\n" in err
    assert "PNG" not in err and "README" not in err and "DS_Store" not in err and "Thumbs" not in err
    raters_of_case = json.loads((out / "dataset.json").read_text())["arseg"]["raters_of_case"]
    assert raters_of_case == {case0: [0, 1], case1: [0, 2]}
    with pytest.raises(SystemExit) as refused:
        folders_main(["-i", str(root), "-o", str(tmp_path / "raw"), "-d", "534", "--strict",
                      "--disable_progress_bar"])
    message = str(refused.value.code)
    assert message.startswith(f"nnUNetv2_arseg_convert_folders: error: --strict: {len(expected)} folder(s)")
    assert all(f"  {path}: {why}\n" in message for path, why in expected.items())
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["Dataset533_LeftOut"]  # nothing written


# ---------------------------------------------------------------- end to end with the real nnU-Net commands
def _run(cmd: list[str], env: dict, timeout: int = 900) -> str:
    res = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=timeout)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n{out[-4000:]}"
    return out


def _nnunet_env(root: Path) -> dict:
    paths = {k: str(root / k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for p in paths.values():
        os.makedirs(p)
    ext_dir = str(Path(__import__("nnunet_arseg.nnunet_ext", fromlist=["EXT_DIR"]).EXT_DIR))
    return {**{k: v for k, v in os.environ.items() if k != "nnUNet_n_proc_DA"}, **paths, "nnUNet_def_n_proc": "1",
            "nnUNet_extTrainer": ext_dir}


def _train_predict_evaluate(env: dict, dataset_id: int, configuration: str, fold: str, ext: str) -> tuple[dict, dict]:
    """Plan and preprocess, train the tiny AR-Seg, predict the test images (2 samples) and evaluate them; returns
    the raw dataset.json and the evaluator's summary."""
    _run([BIN / "nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", configuration, "-np", "1", "-npfp", "1",
          "--no_pbar"], env)
    trainer = "nnUNetTrainerARSeg_tiny"
    _run([BIN / "nnUNetv2_train", dataset_id, configuration, fold, "-tr", trainer, "-device", "cpu"],
         {**env, "nnUNet_n_proc_DA": "0"})
    raw = next(Path(env["nnUNet_raw"]).glob(f"Dataset{dataset_id}_*"))
    model = Path(env["nnUNet_results"]) / raw.name / f"{trainer}__nnUNetPlans__{configuration}" / f"fold_{fold}"
    val = json.loads((model / "validation" / "summary_arseg.json").read_text())
    assert val["metric_per_case"] and all(np.isfinite(val["mean"]["0"][k]) for k in ("GED", "HM-IoU", "Soft-Dice"))
    pred = Path(env["nnUNet_raw"]).parent / "pred"
    _run([BIN / "nnUNetv2_arseg_predict", "-i", raw / "imagesTs", "-o", pred, "-d", dataset_id, "-c", configuration,
          "-f", fold, "-tr", trainer, "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_progress_bar",
          "--num_samples", "2", "--save_samples"], env)
    _run([BIN / "nnUNetv2_arseg_evaluate", "-i", pred, "-d", dataset_id], env)
    dj = json.loads((raw / "dataset.json").read_text())
    summary = json.loads((pred / "summary_arseg.json").read_text())
    test_cases = sorted(p.name[:-len("_0000" + ext)] for p in (raw / "imagesTs").glob(f"*_0000{ext}"))
    assert test_cases and sorted(e["case"] for e in summary["metric_per_case"]) == test_cases
    return dj, summary


@pytest.mark.e2e
def test_2d_png_two_to_six_raters_end_to_end(lidc_demo, tmp_path):
    src = _build_2d(lidc_demo, tmp_path / "in")
    env = _nnunet_env(tmp_path)
    _run([BIN / "nnUNetv2_arseg_convert_folders", "-i", src, "-d", "533", "-n", "Folders2D", "--patient_regex",
          PATIENT_REGEX, "--test_fraction", "0.2", "--disable_progress_bar"], env)
    dj, summary = _train_predict_evaluate(env, 533, "2d", "0", ".png")
    # each case's preprocessed stack holds the raters it has, and the training dataset draws among them
    pre = Path(env["nnUNet_preprocessed"]) / "Dataset533_Folders2D"
    stacks = {f.stem: np.load(f)["raters"] for f in (pre / "nnUNetPlans_2d_raters").glob("*.npz")}
    assert stacks and {c: len(s) for c, s in stacks.items()} == {c: len(dj["arseg"]["raters_of_case"][c])
                                                                  for c in stacks}
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    folder = str(pre / "nnUNetPlans_2d")
    case = _case("LIDC-IDRI-0010", 0, 0) if _case("LIDC-IDRI-0010", 0, 0) in stacks else _case("LIDC-IDRI-0012", 1, 0)
    dataset = raters.rater_dataset_class(infer_dataset_class(folder))(folder, [case])
    distinct = {stacks[case][k].tobytes() for k in range(len(stacks[case]))}
    np.random.seed(0)
    drawn = {np.asarray(dataset.load_case(case)[1]).astype(np.int8).tobytes() for _ in range(40)}
    assert len(distinct) > 1 and drawn == distinct
    for entry in summary["metric_per_case"]:
        assert entry["metrics"]["1"]["M"] == len(dj["arseg"]["raters_of_case"][entry["case"]])
        assert [Path(f).name for f in entry["rater_files"]] == [f"{entry['case']}_r{k}.png" for k in
                                                                dj["arseg"]["raters_of_case"][entry["case"]]]


def _build_3d(lidc: Path, root: Path, volumes: list[tuple[str, int, int]], depth: int = 6) -> None:
    """NIfTI volumes of ``depth`` consecutive slices (48 x 48 around the nodule) with LIDC raters 0-2, spacing
    0.7 x 0.7 x 2.0 mm; raters 0 and 2 as 0/1, rater 1 as 0/255."""
    (root / "images").mkdir(parents=True)
    yx = (slice(40, 88), slice(40, 88))
    for p, n, z0 in volumes:
        case = f"{p}_n{n}_z{z0}"
        nodule = lidc / p / f"nodule-{n}"
        image = np.stack([_png(nodule / "images" / f"slice-{z}.png")[yx] for z in range(z0, z0 + depth)])
        arrays = {"images": image.astype(np.int16)}
        for k in range(3):
            arrays[RATERS[k]] = np.stack([_png(nodule / f"mask-{k}" / f"slice-{z}.png")[yx] > 0
                                          for z in range(z0, z0 + depth)]).astype(np.uint8) * (255 if k == 1 else 1)
        for folder, arr in arrays.items():
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing((0.7, 0.7, 2.0))
            img.SetOrigin((-10.0, 5.0, 30.0 + 2 * z0))
            (root / folder).mkdir(exist_ok=True)
            sitk.WriteImage(img, str(root / folder / f"{case}.nii.gz"))


@pytest.mark.e2e
def test_3d_nifti_three_raters_end_to_end(lidc_demo, tmp_path):
    _build_3d(lidc_demo, tmp_path / "in", [("LIDC-IDRI-0002", 0, z) for z in (0, 6, 12, 18)]
              + [("LIDC-IDRI-0015", 0, z) for z in (0, 6, 12)])
    _build_3d(lidc_demo, tmp_path / "test_in", [("LIDC-IDRI-0014", 0, 0)])
    env = _nnunet_env(tmp_path)
    _run([BIN / "nnUNetv2_arseg_convert_folders", "-i", tmp_path / "in", "--test_input", tmp_path / "test_in",
          "-d", "534", "-n", "Folders3D", "--patient_regex", PATIENT_REGEX, "--channel_names", "CT",
          "--disable_progress_bar"], env)
    raw = Path(env["nnUNet_raw"]) / "Dataset534_Folders3D"
    case = "LIDC-IDRI-0015_n0_z6"
    src = sitk.ReadImage(str(tmp_path / "in" / "raterB" / f"{case}.nii.gz"))
    for f in (raw / "labelsTr" / f"{case}.nii.gz", raw / "labelsTr_raters" / f"{case}_r1.nii.gz"):
        out = sitk.ReadImage(str(f))  # the image's grid, 0/1
        assert out.GetSpacing() == src.GetSpacing() and out.GetOrigin() == src.GetOrigin()
        assert set(np.unique(sitk.GetArrayFromImage(out))) == {0, 1}
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTr_raters" /
                                                                            f"{case}_r1.nii.gz"))),
                                  sitk.GetArrayFromImage(src) > 0)
    dj, summary = _train_predict_evaluate(env, 534, "3d_fullres", "0", ".nii.gz")
    assert dj["channel_names"] == {"0": "CT"} and "raters_of_case" not in dj["arseg"]
    assert [e["metrics"]["1"]["M"] for e in summary["metric_per_case"]] == [3]
    assert all(np.isfinite(summary["mean"]["1"][k]) for k in ("GED", "HM-IoU", "Soft-Dice"))
