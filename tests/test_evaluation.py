"""Multi-rater metrics, region Dice and ``nnUNetv2_arseg_evaluate`` on real LIDC, spleen and BraTS masks."""
from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
from nnunetv2.dataset_conversion.Dataset137_BraTS21 import copy_BraTS_segmentation_and_convert_labels_to_nnUNet
from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO
from scipy.optimize import linear_sum_assignment
from skimage.io import imread

from nnunet_arseg.evaluation import (consensus_dice, d_max, dice_per_region, ged, hm_iou, iou_distance_matrix,
                                     multirater_metrics_batch, soft_dice)
from nnunet_arseg.evaluation.evaluate import evaluate_case, evaluate_multirater_folder, main
from nnunet_arseg.evaluation.regions import BRATS_2021_LABELS, BRATS_2021_REGIONS_CLASS_ORDER
from nnunet_arseg.prediction_files import ARGS_FILE, case_record_file, sample_file

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- straightforward loop reference (obviously correct)
def ref_iou(a, b, empty=1.0):
    union = np.logical_or(a, b).sum()
    return empty if union == 0 else np.logical_and(a, b).sum() / union


def ref_dice(a, b, empty):
    total = a.sum() + b.sum()
    return empty if total == 0 else 2 * np.logical_and(a, b).sum() / total


def ref_ged(ss, ys):
    d = lambda a, b: 1 - ref_iou(a, b)  # noqa: E731
    n, m = len(ss), len(ys)
    return (2 / (n * m) * sum(d(s, y) for s in ss for y in ys) - sum(d(a, b) for a in ss for b in ss) / n ** 2
            - sum(d(a, b) for a in ys for b in ys) / m ** 2)


def ref_hm_iou(ss, ys):
    big_l = math.lcm(len(ss), len(ys))
    ss_rep, ys_rep = list(ss) * (big_l // len(ss)), list(ys) * (big_l // len(ys))
    cost = np.array([[1 - ref_iou(y, s) for s in ss_rep] for y in ys_rep])
    rows, cols = linear_sum_assignment(cost)
    return np.mean(1 - cost[rows, cols])


def ref_soft_dice(ss, ys):
    p, g = np.mean(ss, axis=0), np.mean(ys, axis=0)
    vals = []
    for tau in (0.1, 0.3, 0.5, 0.7, 0.9):
        pt, gt = p > tau, g > tau
        vals.append((2 * np.logical_and(pt, gt).sum() + 1e-6) / (pt.sum() + gt.sum() + 1e-6))
    return np.mean(vals)


def ref_d_max(ss, ys, empty=1.0):
    return np.mean([max(ref_dice(s, y, empty) for y in ys) for s in ss])


def ref_consensus(ss, ys, empty=0.0):
    vote = np.sum(ss, axis=0) > len(ss) / 2
    return [ref_dice(vote, y, empty) for y in ys]


# ---------------------------------------------------------------- real masks
def lidc_slices(root: Path) -> list[np.ndarray]:
    """(4, 128, 128) boolean rater stacks of consecutive slices of each demo nodule, as lists per nodule."""
    nodules = []
    for nodule in sorted(root.glob("LIDC-IDRI-*/nodule-*")):
        n_slices = len(list((nodule / "images").glob("slice-*.png")))
        nodules.append([np.stack([imread(nodule / f"mask-{r}" / f"slice-{k}.png") > 127 for r in range(4)])
                        for k in range(n_slices)])
    return nodules


@pytest.fixture(scope="module")
def lidc(lidc_demo) -> list[list[np.ndarray]]:
    return lidc_slices(lidc_demo)


@pytest.fixture(scope="module")
def nodule_mask(lidc) -> tuple[np.ndarray, np.ndarray]:
    """A real non-empty rater mask A and a disjoint copy B (A rolled by half the crop)."""
    a = next(r for slices in lidc for s in slices for r in s if r.sum() > 50)
    b = np.roll(a, 64, axis=1)
    assert a.any() and not (a & b).any() and a.sum() == b.sum()
    return a, b


# ---------------------------------------------------------------- hand-checkable cases (docs metrics.md)
def test_identical_samples_and_raters(lidc):
    raters = lidc[0][len(lidc[0]) // 2]
    assert ged(raters, raters) == pytest.approx(0, abs=1e-12)
    assert hm_iou(raters, raters) == 1.0
    assert soft_dice(raters, raters) == 1.0


def test_empty_and_constant(nodule_mask):
    a, _ = nodule_mask
    empty = np.zeros((16,) + a.shape, bool)
    assert ged(empty, empty[:4]) == 0.0
    assert hm_iou(empty, empty[:4]) == 1.0
    assert soft_dice(empty, empty[:4]) == 1.0
    raters = np.stack([a] * 4)
    assert ged(empty, raters) == 2.0
    assert hm_iou(empty, raters) == 0.0
    # the empty-mask rule is a parameter: with d(empty, empty) = 1 every pair is at distance 1
    assert hm_iou(empty, empty[:4], empty_distance=1.0) == 0.0
    # one empty sample against {empty, A}: 2*(0+1)/2 - 0 - (0+1+1+0)/4 = 0.5; with d(empty, empty) = 1: 2 - 1 - 3/4
    assert ged(empty[:1], [empty[0], a]) == pytest.approx(0.5)
    assert ged(empty[:1], [empty[0], a], empty_distance=1.0) == pytest.approx(0.25)


def test_two_disjoint_raters(nodule_mask):
    a, b = nodule_mask
    assert ged([a, b], [a, b]) == pytest.approx(0.0)
    assert ged([a, a], [a, b]) == pytest.approx(2 * 0.5 - 0 - 0.5)
    assert hm_iou([a, a], [a, b]) == pytest.approx(0.5)
    # P = 1 on A, G = 0.5 on A and B (|A| = |B|): tau 0.1, 0.3 -> 2|A|/3|A|; tau >= 0.5 -> G_tau empty (strict >)
    n = int(a.sum())
    low, high = (2 * n + 1e-6) / (3 * n + 1e-6), 1e-6 / (n + 1e-6)
    assert soft_dice([a, a], [a, b]) == pytest.approx((2 * low + 3 * high) / 5, rel=1e-12)
    assert soft_dice([a, a], [a, b], thresholds=(0.3,)) == pytest.approx(2 / 3, rel=1e-6)


def test_hm_iou_replicates_to_lcm(nodule_mask):
    a, b = nodule_mask
    # N = 4, M = 2: raters {A, B, A, B} against {A, A, A, B}: three perfect matches and one A-B pair.
    assert hm_iou([a, a, a, b], [a, b]) == pytest.approx(3 / 4)
    # N = 3, M = 2 (L = 6): samples x2 = 4 A + 2 B, raters x3 = 3 A + 3 B -> 5 matches of 6.
    assert hm_iou([a, a, b], [a, b]) == pytest.approx(5 / 6)
    # matching the raw N x M matrix would score only M samples and give 1.0 here
    assert hm_iou([a, a, a, b], [a, b]) < 1.0


def test_d_max_and_consensus_dice(nodule_mask):
    a, b = nodule_mask
    empty = np.zeros_like(a)
    assert d_max([a, empty], [a, empty]) == 1.0
    assert d_max([a, empty], [a, empty], empty_dice=0.0) == 0.5
    assert np.isnan(d_max([a, empty], [a, empty], empty_dice=float("nan")))
    assert d_max([a, b], [a, a]) == 0.5
    assert consensus_dice([a, a, b], [a, b]) == {"per_rater": [1.0, 0.0], "mean": 0.5}
    # {A, B}: no pixel has a strict majority, the consensus is empty
    assert consensus_dice([a, b], [empty, a]) == {"per_rater": [0.0, 0.0], "mean": 0.0}
    assert consensus_dice([a, b], [empty, a], empty_dice=1.0) == {"per_rater": [1.0, 0.0], "mean": 0.5}


# ---------------------------------------------------------------- agreement with the loop reference on real masks
def neighbour_pairs(lidc, n_samples: int):
    """(samples, raters): raters of slices k-1 and k+1 (first ``n_samples``) against the raters of the middle
    slice k of each nodule, then of the slice above it, so consecutive pairs come from different nodules."""
    for offset in (0, 1):
        for slices in lidc:
            k = len(slices) // 2 + offset
            if 1 <= k < len(slices) - 1:
                yield np.concatenate([slices[k - 1], slices[k + 1]])[:n_samples], slices[k]


@pytest.mark.parametrize("n_samples", [8, 6, 3])
def test_agrees_with_loop_reference_on_lidc(lidc, n_samples):
    pairs = list(itertools.islice(neighbour_pairs(lidc, n_samples), 12))
    assert len(pairs) == 12
    batch = multirater_metrics_batch(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]), chunk=5)
    for i, (ss, ys) in enumerate(pairs):
        expected = {"GED": ref_ged(ss, ys), "HM-IoU": ref_hm_iou(ss, ys), "Soft-Dice": ref_soft_dice(ss, ys),
                    "D_max": ref_d_max(ss, ys), "D_consensus": np.mean(ref_consensus(ss, ys))}
        got = {"GED": ged(ss, ys), "HM-IoU": hm_iou(ss, ys), "Soft-Dice": soft_dice(ss, ys),
               "D_max": d_max(ss, ys), "D_consensus": consensus_dice(ss, ys)["mean"]}
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-10), (key, i)
            assert batch[key][i] == pytest.approx(value, abs=1e-10), (key, i)
        np.testing.assert_allclose(batch["D_consensus_per_rater"][i], ref_consensus(ss, ys), atol=1e-10)
    assert len({round(v, 6) for v in batch["GED"]}) > 3  # the cases are not all alike


def test_3d_shifted_spleen(spleen_crop):
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(spleen_crop / "sub-spleen2_ct_seg-manual.nii.gz"))) > 0
    seg = seg[::2, ::2, ::2]
    shifts = [(0, 0, 0), (1, 0, 0), (0, 3, 0), (0, 0, -4), (2, 2, 2), (0, 8, 8)]
    masks = np.stack([np.roll(seg, s, axis=(0, 1, 2)) for s in shifts])
    ss, ys = masks[:4], masks[[0, 3, 5]]
    np.testing.assert_allclose(iou_distance_matrix(ss, ys), [[1 - ref_iou(s, y) for y in ys] for s in ss], atol=1e-12)
    assert ged(ss, ys) == pytest.approx(ref_ged(ss, ys), abs=1e-10)
    assert hm_iou(ss, ys) == pytest.approx(ref_hm_iou(ss, ys), abs=1e-10)
    assert soft_dice(ss, ys) == pytest.approx(ref_soft_dice(ss, ys), abs=1e-10)
    assert d_max(ss, ys) == pytest.approx(ref_d_max(ss, ys), abs=1e-10)
    assert 0 < ged(ss, ys) < 1 and 0 < hm_iou(ss, ys) < 1
    assert ged(masks, masks) == pytest.approx(0, abs=1e-12)
    # torch tensors (any device) give the same numbers
    assert ged(torch.from_numpy(ss), torch.from_numpy(ys)) == ged(ss, ys)


def test_pure_function_bad_input(nodule_mask):
    a, _ = nodule_mask
    with pytest.raises(ValueError, match="spatial shape"):
        ged([a], [a[:64]])
    with pytest.raises(ValueError, match="N = 0"):
        hm_iou(np.zeros((0,) + a.shape, bool), [a])
    with pytest.raises(ValueError, match="binar"):
        soft_dice([a * 0.7], [a])


# ---------------------------------------------------------------- region Dice (BraTS)
def crop_brats(brats2015, box, out_file: Path) -> None:
    """Crop the real 2015 label, fold non-enhancing (3) into NCR (1) as BraTS 2017+ did, then nnU-Net's own
    Dataset137 conversion (BraTS 1 NCR, 2 ED, 4 ET -> nnU-Net 2, 1, 3)."""
    img = sitk.ReadImage(str(brats2015 / "test" / "brats_2013_pat0001_1" / "OTMultiClass.nii.gz"))
    arr = sitk.GetArrayFromImage(img)[box].astype(np.uint8)
    arr[arr == 3] = 1
    tmp = out_file.with_name("brats2021_" + out_file.name)
    cropped = sitk.GetImageFromArray(arr)
    cropped.SetSpacing(img.GetSpacing())
    sitk.WriteImage(cropped, str(tmp))
    copy_BraTS_segmentation_and_convert_labels_to_nnUNet(str(tmp), str(out_file))
    tmp.unlink()


def test_brats_region_dice(brats2015, tmp_path):
    ref, pred = tmp_path / "labelsTs", tmp_path / "pred"
    ref.mkdir(), pred.mkdir()
    tumour, no_tumour = np.s_[60:72, 100:148, 60:100], np.s_[0:6, 0:20, 0:20]
    crop_brats(brats2015, tumour, ref / "BraTS_001.nii.gz")
    crop_brats(brats2015, no_tumour, ref / "BraTS_002.nii.gz")
    ref_arr = sitk.GetArrayFromImage(sitk.ReadImage(str(ref / "BraTS_001.nii.gz")))
    assert set(np.unique(ref_arr)) == {0, 1, 2, 3}
    pred_arr = np.roll(ref_arr, 2, axis=1)  # a prediction two voxels off, with the enhancing tumour exact
    pred_arr[pred_arr == 3] = 2
    pred_arr[ref_arr == 3] = 3
    for name, arr in (("BraTS_001", pred_arr), ("BraTS_002", np.zeros((6, 20, 20), np.uint8))):
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(pred / f"{name}.nii.gz"))
    dj = {"channel_names": {"0": "FLAIR"}, "labels": BRATS_2021_LABELS,
          "regions_class_order": BRATS_2021_REGIONS_CLASS_ORDER, "file_ending": ".nii.gz", "numTraining": 2}
    save_json(dj, str(tmp_path / "dataset.json"))
    out = tmp_path / "summary_regions.json"
    main(["-i", str(pred), "-ref", str(ref), "-djfile", str(tmp_path / "dataset.json"), "-o", str(out)])
    summary = load_json(str(out))
    expected = {}
    for key, labels in (("(1, 2, 3)", [1, 2, 3]), ("(2, 3)", [2, 3]), ("(3,)", [3])):
        a, b = np.isin(ref_arr, labels), np.isin(pred_arr, labels)
        expected[key] = 2 * (a & b).sum() / (a.sum() + b.sum())
        per_case = {c["case"]: c["metrics"][key]["Dice"] for c in summary["metric_per_case"]}
        assert per_case["BraTS_001"] == pytest.approx(expected[key])
        assert per_case["BraTS_002"] == 1.0  # empty reference and empty prediction
        assert summary["mean"][key]["Dice"] == pytest.approx((expected[key] + 1) / 2)
    assert expected["(3,)"] == 1.0 and 0.5 < expected["(1, 2, 3)"] < 1
    assert summary["foreground_mean"]["Dice"] == pytest.approx(np.mean([(v + 1) / 2 for v in expected.values()]))
    assert "scores 1.0" in summary["conventions"]["Dice"]
    direct = dice_per_region(ref_arr, pred_arr, [(1, 2, 3)])
    assert direct[(1, 2, 3)]["Dice"] == pytest.approx(expected["(1, 2, 3)"])


# ---------------------------------------------------------------- the CLI on a tiny raw dataset + prediction folder
CASES = ("LIDC_0001", "LIDC_0002", "LIDC_0003")


@pytest.fixture
def tiny_dataset(lidc, nnunet_env, tmp_path):
    """Raw Dataset901 with 4 raters per test case (real demo masks, 0/1 PNGs) and a prediction folder with 8
    samples per case (the raters of the neighbouring slices); returns (raw, pred, {case: (samples, raters)})."""
    raw = Path(nnunet_env["nnUNet_raw"]) / "Dataset901_LIDCTiny"
    pred = tmp_path / "pred"
    for sub in ("labelsTs", "labelsTs_raters", "labelsTr"):
        (raw / sub).mkdir(parents=True)
    (pred / "samples").mkdir(parents=True)
    rw = NaturalImage2DIO()
    arrays = {}
    pairs = list(neighbour_pairs(lidc, 8))
    for case, (ss, ys) in zip(CASES, [pairs[6], pairs[7], pairs[0]]):  # two with 4 raters, one with 2 empty
        for k, y in enumerate(ys):
            rw.write_seg(y[None].astype(np.uint8), str(raw / "labelsTs_raters" / f"{case}_r{k}.png"), {})
        rw.write_seg((ys.sum(0) > 2)[None].astype(np.uint8), str(raw / "labelsTs" / f"{case}.png"), {})
        for k, s in enumerate(ss):
            rw.write_seg(s[None].astype(np.uint8), str(pred / "samples" / f"{case}_sample{k:02d}.png"), {})
        rw.write_seg((ss.sum(0) > 4)[None].astype(np.uint8), str(pred / f"{case}.png"), {})
        arrays[case] = (ss, ys)
    save_json({"channel_names": {"0": "CT"}, "labels": {"background": 0, "nodule": 1}, "numTraining": 0,
               "file_ending": ".png",
               "arseg": {"num_raters": 4, "raters_folder": "labelsTr_raters", "test_raters_folder": "labelsTs_raters",
                         "patient_of_case": {c: "LIDC-IDRI-0001" for c in CASES}}}, str(raw / "dataset.json"))
    return raw, pred, arrays


def test_cli_subprocess(tiny_dataset):
    raw, pred, arrays = tiny_dataset
    proc = subprocess.run([sys.executable, "-m", "nnunet_arseg.evaluation.evaluate", "-i", str(pred), "-d", "901"],
                          capture_output=True, text=True, env=os.environ.copy(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (pred / "summary_arseg.json").is_file() and not (pred / "summary.json").exists()
    summary = load_json(str(pred / "summary_arseg.json"))
    assert [c["case"] for c in summary["metric_per_case"]] == list(CASES)
    for entry in summary["metric_per_case"]:
        ss, ys = arrays[entry["case"]]
        m = entry["metrics"]["1"]
        assert (m["N"], m["M"]) == (8, 4) and len(entry["sample_files"]) == 8
        assert m["GED"] == pytest.approx(ref_ged(ss, ys), abs=1e-10)
        assert m["HM-IoU"] == pytest.approx(ref_hm_iou(ss, ys), abs=1e-10)
        assert m["Soft-Dice"] == pytest.approx(ref_soft_dice(ss, ys), abs=1e-10)
        assert m["D_max"] == pytest.approx(ref_d_max(ss, ys), abs=1e-10)
        assert m["D_consensus_per_rater"] == pytest.approx(ref_consensus(ss, ys), abs=1e-10)
    for key in ("GED", "HM-IoU", "Soft-Dice", "D_max", "D_consensus"):
        per_case = [c["metrics"]["1"][key] for c in summary["metric_per_case"]]
        assert summary["mean"]["1"][key] == pytest.approx(np.mean(per_case))
    conv = summary["conventions"]
    assert conv["N"] == [8] and conv["M"] == [4] and conv["empty_distance"] == 0.0
    assert (conv["samples"]["kind"], conv["samples"]["N"]) == ("samples", 8)
    assert conv["Soft-Dice"]["thresholds"] == [0.1, 0.3, 0.5, 0.7, 0.9] and "lcm" in conv["HM-IoU"]
    assert "all 3 cases" in conv["images"] and "max Dice over the raters" in conv["D_max"]
    assert "GED" in proc.stdout


def test_folder_api_with_reference_and_raw(tiny_dataset):
    raw, pred, arrays = tiny_dataset
    out = pred / "other.json"
    main(["-i", str(pred), "-raw", str(raw), "--regions", "-o", str(out)])
    summary = load_json(str(out))
    direct = evaluate_multirater_folder(str(pred), str(raw), [str(raw / "labelsTs_raters")], [str(raw / "labelsTs")],
                                        verbose=False)
    assert summary["mean"]["1"] == pytest.approx(direct["mean"]["1"])
    ss, ys = arrays[CASES[0]]
    vote, consensus = ss.sum(0) > 4, ys.sum(0) > 2
    dice = 2 * (vote & consensus).sum() / (vote.sum() + consensus.sum())
    assert summary["metric_per_case"][0]["metrics"]["1"]["Dice"] == pytest.approx(dice)
    assert 0.3 < dice < 1
    case = evaluate_case(ss.astype(np.uint8), ys.astype(np.uint8))
    assert case[1]["GED"] == pytest.approx(summary["metric_per_case"][0]["metrics"]["1"]["GED"])
    ss, ys = arrays[CASES[2]]
    assert not (ss.sum(0) > 4).any() and not (ys.sum(0) > 2).any()
    assert summary["metric_per_case"][2]["metrics"]["1"]["Dice"] == 1.0  # empty reference, empty prediction


def run_main_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_cli_bad_input(tiny_dataset, capsys):
    raw, pred, _ = tiny_dataset
    err = run_main_error(capsys, ["-i", str(pred), "-d", "999"])
    assert "-d 999" in err and "unknown dataset" in err and "-raw" in err

    rater = raw / "labelsTs_raters" / f"{CASES[1]}_r3.png"
    rater.rename(rater.with_suffix(".bak"))
    err = run_main_error(capsys, ["-i", str(pred), "-d", "901"])
    assert CASES[1] in err and "num_raters" in err
    for k in range(3):
        (raw / "labelsTs_raters" / f"{CASES[1]}_r{k}.png").unlink()
    err = run_main_error(capsys, ["-i", str(pred), "-d", "901"])
    assert f"case {CASES[1]}" in err and "no rater files" in err

    for f in (pred / "samples").glob(f"{CASES[1]}_sample*.png"):
        f.unlink()
    err = run_main_error(capsys, ["-i", str(pred), "-d", "901"])
    assert f"case {CASES[1]}" in err and "N = 0" in err and "--save_samples" in err
    (pred / f"{CASES[1]}.png").unlink()

    rw = NaturalImage2DIO()
    bad = pred / "samples" / f"{CASES[2]}_sample03.png"
    rw.write_seg(np.zeros((1, 64, 128), np.uint8), str(bad), {})
    err = run_main_error(capsys, ["-i", str(pred), "-d", "901"])
    assert "shape mismatch" in err and bad.name in err

    rw.write_seg(np.zeros((1, 128, 128), np.uint8), str(bad), {})
    rw.write_seg(np.full((1, 128, 128), 255, np.uint8), str(raw / "labelsTs_raters" / f"{CASES[2]}_r0.png"), {})
    err = run_main_error(capsys, ["-i", str(pred), "-d", "901"])
    assert f"{CASES[2]}_r0.png" in err and "0/255" in err

    (pred / "samples" / f"{CASES[0]}_sample05.png").unlink()
    err = run_main_error(capsys, ["-i", str(pred), "-d", "901"])
    assert f"{CASES[0]}_sample5.png" in err or f"{CASES[0]}_sample05.png" in err
    assert not (pred / "summary_arseg.json").exists()


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-40])


def test_cli_truncated_sample_png(tiny_dataset, capsys):
    raw, pred, _ = tiny_dataset
    bad = Path(sample_file(str(pred), CASES[0], 2, ".png"))
    _cut(bad)
    err = run_main_error(capsys, ["-i", str(pred), "-d", "901"])
    assert f"{bad}: the PNG's IDAT chunk is cut short" in err and "predict this case again" in err
    assert not (pred / "summary_arseg.json").exists()


def test_cli_one_case_with_fewer_samples(tiny_dataset, capsys):
    raw, pred, _ = tiny_dataset
    for k in (6, 7):
        Path(sample_file(str(pred), CASES[1], k, ".png")).unlink()
    err = run_main_error(capsys, ["-i", str(pred), "-d", "901"])
    assert "different numbers of samples" in err and f"{CASES[1]} has N = 6" in err and "2 cases have N = 8" in err
    assert not (pred / "summary_arseg.json").exists()


def test_cli_missing_cases(tiny_dataset, capsys):
    """A prediction folder without one case of the raters is an error; --allow_missing scores the rest on purpose."""
    raw, pred, arrays = tiny_dataset
    for f in [pred / f"{CASES[2]}.png", *(pred / "samples").glob(f"{CASES[2]}_s*.png")]:
        f.unlink()
    err = run_main_error(capsys, ["-i", str(pred), "-d", "901"])
    assert f"1 of the 3 cases of {raw / 'labelsTs_raters'} have no prediction: {CASES[2]}" in err
    assert "--allow_missing" in err and not (pred / "summary_arseg.json").exists()

    main(["-i", str(pred), "-d", "901", "--allow_missing"])
    out = capsys.readouterr().out
    assert f"WARNING: 1 of the 3 cases of {raw / 'labelsTs_raters'} have no prediction" in out and CASES[2] in out
    summary = load_json(str(pred / "summary_arseg.json"))
    assert [c["case"] for c in summary["metric_per_case"]] == list(CASES[:2])
    cases = summary["conventions"]["cases"]
    assert (cases["expected"], cases["scored"], cases["missing_count"], cases["missing"]) == (3, 2, 1, [CASES[2]])
    assert summary["conventions"]["images"].startswith("2 of the 3 cases") and "--allow_missing" in \
        summary["conventions"]["images"]
    ss, ys = arrays[CASES[0]]
    assert summary["metric_per_case"][0]["metrics"]["1"]["GED"] == pytest.approx(ref_ged(ss, ys), abs=1e-10)

    # the cases to score can be named: then only those must be there
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # one case: no correlation, and no numpy warning about it
        main(["-i", str(pred), "-d", "901", "-cases", CASES[1], "-o", str(pred / "named.json")])
    named = load_json(str(pred / "named.json"))
    assert [c["case"] for c in named["metric_per_case"]] == [CASES[1]]
    assert math.isnan(named["foreground_mean"]["presence_correlation"])
    assert named["foreground_mean"]["GED"] == named["metric_per_case"][0]["metrics"]["1"]["GED"]
    assert named["conventions"]["cases"]["missing"] == [] and "all 1 cases of -cases" in named["conventions"]["images"]
    err = run_main_error(capsys, ["-i", str(pred), "-d", "901", "-cases", CASES[1], CASES[2]])
    assert f"have no prediction: {CASES[2]}" in err
    images = pred.parent / "imagesTs"  # or named by a folder of input images, <case>_0000.png
    images.mkdir()
    for case in CASES[:2]:
        shutil.copy(pred / f"{case}.png", images / f"{case}_0000.png")
    main(["-i", str(pred), "-d", "901", "-cases", str(images), "-o", str(pred / "folder.json")])
    assert [c["case"] for c in load_json(str(pred / "folder.json"))["metric_per_case"]] == list(CASES[:2])


def write_predictions(folder: Path, masks: dict[str, np.ndarray]) -> None:
    """One mask ``<case>.png`` per case and no ``samples/``, as ``nnUNetv2_predict`` writes them."""
    folder.mkdir(parents=True)
    for case, mask in masks.items():
        NaturalImage2DIO().write_seg(mask[None].astype(np.uint8), str(folder / f"{case}.png"), {})


def assert_scores(summary: dict, samples_of: dict, raters_of: dict) -> None:
    """Every case of ``summary`` scored as the metric functions score its samples against its raters."""
    assert [c["case"] for c in summary["metric_per_case"]] == sorted(samples_of)
    for entry in summary["metric_per_case"]:
        ss, ys = samples_of[entry["case"]], raters_of[entry["case"]]
        m = entry["metrics"]["1"]
        assert (m["N"], m["M"]) == (len(ss), len(ys))
        assert m["GED"] == pytest.approx(ged(ss, ys), abs=1e-12)
        assert m["HM-IoU"] == pytest.approx(hm_iou(ss, ys), abs=1e-12)
        assert m["Soft-Dice"] == pytest.approx(soft_dice(ss, ys), abs=1e-12)
        assert m["D_max"] == pytest.approx(d_max(ss, ys), abs=1e-12)
        assert m["D_consensus_per_rater"] == pytest.approx(consensus_dice(ss, ys)["per_rater"], abs=1e-12)
    ged_mean = np.mean([ged(samples_of[c], raters_of[c]) for c in samples_of])
    assert summary["mean"]["1"]["GED"] == pytest.approx(ged_mean, abs=1e-12)


def test_cli_stock_prediction_as_identical_samples(tiny_dataset, capsys):
    """A stock ``nnUNetv2_predict`` folder (one mask per case, no samples/) is scored as N identical samples."""
    raw, pred, arrays = tiny_dataset
    stock = pred.parent / "stock"
    write_predictions(stock, {c: ss[1] for c, (ss, _) in arrays.items()})
    main(["-i", str(stock), "-d", "901"])
    assert "scored as N = 16 identical samples" in capsys.readouterr().out
    summary = load_json(str(stock / "summary_arseg.json"))
    raters = {c: ys for c, (_, ys) in arrays.items()}
    assert_scores(summary, {c: np.stack([ss[1]] * 16) for c, (ss, _) in arrays.items()}, raters)
    samples = summary["conventions"]["samples"]
    assert (samples["kind"], samples["N"], samples["folders"]) == ("one_prediction", 16, [str(stock)])
    assert "counted as N identical samples" in samples["source"] and summary["conventions"]["N"] == [16]
    assert summary["metric_per_case"][0]["sample_files"] == [str(stock / f"{CASES[0]}.png")]
    for entry in summary["metric_per_case"]:  # identical samples: GED has no sample-sample term
        s, ys = arrays[entry["case"]][0][1:2], raters[entry["case"]]
        expected = 2 * iou_distance_matrix(s, ys).mean() - iou_distance_matrix(ys).mean()
        assert entry["metrics"]["1"]["GED"] == pytest.approx(expected, abs=1e-12)
    assert max(c["metrics"]["1"]["GED"] for c in summary["metric_per_case"]) > 0.1

    main(["-i", str(stock), "-d", "901", "--num_samples", "3", "-o", str(stock / "n3.json")])
    n3 = load_json(str(stock / "n3.json"))
    assert n3["conventions"]["samples"]["N"] == 3 and n3["metric_per_case"][0]["metrics"]["1"]["N"] == 3
    err = run_main_error(capsys, ["-i", str(pred), "-d", "901", "--num_samples", "16"])
    assert "--num_samples 16" in err and "N = 8" in err  # AR-Seg's samples: N comes from the files


def test_cli_checks_the_samples_against_the_run_record(tiny_dataset, capsys):
    """A folder of ``nnUNetv2_arseg_predict`` is scored only as its run wrote it: each case with the N its record
    says (not the samples a run with more left behind), each case predicted with the folder's settings, and samples
    there at all (not the consensus of a run without --save_samples as N identical samples)."""
    _, pred, arrays = tiny_dataset
    run = {"folds": [0], "num_samples": 8, "seed": 0, "samples_per_case": 8, "save_samples": True,
           "sampler": "autoregressive"}
    save_json(run, str(pred / ARGS_FILE))
    for case in CASES:
        os.makedirs(os.path.dirname(case_record_file(str(pred), case)), exist_ok=True)
        save_json(run, case_record_file(str(pred), case))
    main(["-i", str(pred), "-d", "901"])
    summary = load_json(str(pred / "summary_arseg.json"))
    assert summary["conventions"]["N"] == [8] and summary["sampler"] == "autoregressive"  # which way they were drawn
    (pred / "summary_arseg.json").unlink()

    for case in CASES:  # an earlier run drew 16 per case: its samples 8..15 are still there, in every case
        for k in range(8, 16):
            shutil.copy(sample_file(str(pred), case, k - 8, ".png"), sample_file(str(pred), case, k, ".png"))
    err = run_main_error(capsys, ["-i", str(pred), "-d", "901"])
    assert f"{pred / ARGS_FILE} says its run drew 8 samples per case" in err and f"{CASES[0]} has 16" in err
    assert "--replace_outputs" in err and not (pred / "summary_arseg.json").exists()
    for case in CASES:
        for k in range(8, 16):
            os.remove(sample_file(str(pred), case, k, ".png"))

    save_json({**run, "seed": 1}, case_record_file(str(pred), CASES[1]))  # a case of a run with another seed
    err = run_main_error(capsys, ["-i", str(pred), "-d", "901"])
    assert f"case {CASES[1]}" in err and "seed: 1 -> 0" in err and "--replace_outputs" in err

    consensus_only = pred.parent / "consensus_only"  # nnUNetv2_arseg_predict without --save_samples
    write_predictions(consensus_only, {c: ss[1] for c, (ss, _) in arrays.items()})
    save_json({**run, "save_samples": False}, str(consensus_only / ARGS_FILE))
    err = run_main_error(capsys, ["-i", str(consensus_only), "-d", "901"])
    assert "without --save_samples" in err and "--continue_prediction --save_samples" in err
    assert not (consensus_only / "summary_arseg.json").exists()


def test_cli_fold_ensemble_one_sample_per_folder(tiny_dataset, capsys):
    """Several prediction folders (e.g. ``nnUNetv2_predict -f k -o P<k>``) are one sample each."""
    raw, pred, arrays = tiny_dataset
    folds = [pred.parent / "ensemble" / f"fold_{k}" for k in range(3)]
    for k, folder in enumerate(folds):
        write_predictions(folder, {c: ss[k] for c, (ss, _) in arrays.items()})
    args = [str(f) for f in folds]
    main(["-i", *args, "-d", "901"])
    summary = load_json(str(pred.parent / "ensemble" / "summary_arseg.json"))
    assert_scores(summary, {c: ss[:3] for c, (ss, _) in arrays.items()}, {c: ys for c, (_, ys) in arrays.items()})
    samples = summary["conventions"]["samples"]
    assert (samples["kind"], samples["N"], samples["folders"]) == ("one_per_folder", 3, args)
    assert summary["metric_per_case"][0]["sample_files"] == [str(f / f"{CASES[0]}.png") for f in folds]

    err = run_main_error(capsys, ["-i", *args[:2], "-d", "901", "--num_samples", "3"])
    assert "--num_samples 3" in err and "N = 2" in err
    err = run_main_error(capsys, ["-i", args[0], args[0], "-d", "901"])
    assert "more than once" in err
    err = run_main_error(capsys, ["-i", *args, "-d", "901", "--regions"])
    assert "nnUNetv2_ensemble" in err
    (folds[1] / f"{CASES[2]}.png").unlink()
    err = run_main_error(capsys, ["-i", *args, "-d", "901"])
    assert "hold different cases" in err and f"{folds[1]} lacks {CASES[2]}" in err and "-cases" in err
    main(["-i", *args, "-d", "901", "-cases", *CASES[:2], "-o", str(pred.parent / "two.json")])
    assert [c["case"] for c in load_json(str(pred.parent / "two.json"))["metric_per_case"]] == list(CASES[:2])


def test_cli_case_with_fewer_raters(tiny_dataset, capsys):
    """A case with 2 of the 4 raters is scored against those two when dataset.json's raters_of_case lists them."""
    raw, pred, arrays = tiny_dataset
    case, dj_file = CASES[0], raw / "dataset.json"
    for k in (1, 3):
        (raw / "labelsTs_raters" / f"{case}_r{k}.png").unlink()
    err = run_main_error(capsys, ["-i", str(pred), "-d", "901"])
    assert f"case {case}" in err and f"{case}_r1.png" in err and f"{case}_r3.png" in err and "raters_of_case" in err

    def declare(raters_of_case):
        dj = load_json(str(dj_file))
        dj["arseg"]["raters_of_case"] = raters_of_case
        save_json(dj, str(dj_file))

    declare({case: [0, 2]})
    main(["-i", str(pred), "-d", "901"])
    summary = load_json(str(pred / "summary_arseg.json"))
    raters = {c: ys for c, (_, ys) in arrays.items()} | {case: arrays[case][1][[0, 2]]}
    assert_scores(summary, {c: ss for c, (ss, _) in arrays.items()}, raters)
    assert ged(arrays[case][0], raters[case]) != pytest.approx(ged(*arrays[case]))
    assert summary["conventions"]["M"] == [2, 4]
    assert summary["metric_per_case"][0]["rater_files"] == [str(raw / "labelsTs_raters" / f"{case}_r{k}.png")
                                                            for k in (0, 2)]
    declare({case: [0, 1, 2]})  # a listed rater must be there
    err = run_main_error(capsys, ["-i", str(pred), "-d", "901"])
    assert f"['{case}_r1.png'] are missing" in err and "lists raters [0, 1, 2]" in err
    declare({case: [0]})  # and a rater file must be listed
    err = run_main_error(capsys, ["-i", str(pred), "-d", "901"])
    assert f"{case}_r2.png" in err and "not raters of the case" in err
    declare({case: [0, 4]})
    err = run_main_error(capsys, ["-i", str(pred), "-d", "901"])
    assert f"raters_of_case['{case}'] = [0, 4]" in err and "0..3" in err


def test_cli_reference_nifti_truncated_or_missing(lidc, tmp_path, capsys):
    """Dice of .nii.gz predictions against reference labels: a truncated or missing prediction is an error."""
    ref, pred = tmp_path / "labelsTs", tmp_path / "pred"
    ref.mkdir(), pred.mkdir()
    for i, slices in enumerate(lidc[:3]):  # one 3D case per nodule: rater 0 as reference, rater 1 as prediction
        for folder, rater in ((ref, 0), (pred, 1)):
            vol = np.stack([s[rater] for s in slices]).astype(np.uint8)
            sitk.WriteImage(sitk.GetImageFromArray(vol), str(folder / f"case_{i}.nii.gz"))
    save_json({"channel_names": {"0": "CT"}, "labels": {"background": 0, "nodule": 1}, "numTraining": 0,
               "file_ending": ".nii.gz"}, str(tmp_path / "dataset.json"))
    argv = ["-i", str(pred), "-ref", str(ref), "-djfile", str(tmp_path / "dataset.json")]
    main(argv)
    dice = [c["metrics"]["1"]["Dice"] for c in load_json(str(pred / "summary_arseg.json"))["metric_per_case"]]
    assert len(dice) == 3 and all(0 < d < 1 for d in dice)
    (pred / "summary_arseg.json").unlink()

    bad = pred / "case_1.nii.gz"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    err = run_main_error(capsys, argv)
    assert f"{bad}: the gzip data ends early" in err and "predict this case again" in err
    bad.unlink()
    err = run_main_error(capsys, argv)
    assert f"1 of the 3 cases of {ref} have no prediction: case_1" in err
    assert not (pred / "summary_arseg.json").exists()


def test_presence_shares_gap_and_correlation():
    from nnunet_arseg.evaluation.multirater import presence_calibration
    samples = np.zeros((16, 8, 8), bool)
    samples[:4, 2:4, 2:4] = True  # 4 of 16 samples draw a mask
    raters = np.zeros((4, 8, 8), bool)
    raters[:2, 2:5, 2:5] = True  # 2 of 4 raters do
    out = multirater_metrics_batch(samples[None], raters[None])
    assert out["presence_samples"][0] == 0.25 and out["presence_raters"][0] == 0.5
    assert out["presence_gap"][0] == 0.25
    perfect = presence_calibration([0.0, 0.5, 1.0], [0.0, 0.5, 1.0])
    assert perfect == {"presence_gap": 0.0, "presence_correlation": pytest.approx(1.0)}
    blind = presence_calibration([0.6, 0.6, 0.6], [0.0, 0.5, 1.0])  # the model draws as often everywhere
    assert blind["presence_gap"] == pytest.approx(1.1 / 3) and np.isnan(blind["presence_correlation"])


def test_nan_mean_ignores_undefined_values_without_warning():
    from nnunet_arseg.evaluation.multirater import nan_mean
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert nan_mean([0.2, float("nan"), 0.4]) == pytest.approx(0.3)
        assert math.isnan(nan_mean([float("nan")])) and math.isnan(nan_mean([]))


def _benchmark_module(name: str):
    """``benchmarks/<name>.py`` (or a research one-off, ``benchmarks/research/<name>.py``) as a module."""
    import importlib.util
    path = REPO / "benchmarks" / f"{name}.py"
    path = path if path.is_file() else REPO / "benchmarks" / "research" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_presence_floor_bounds_an_oracle_sampler():
    """``research/presence_floor.py``: the gap of a sampler that knows each image's rate of drawing a mask."""
    floor = _benchmark_module("presence_floor")
    assert floor.oracle_gap_bounds([0, 0, 0, 0, 50])["calibrated"] == pytest.approx((0.0, 0.0), abs=1e-9)
    # every image at p = 1/2 (binomial counts): E|1/2 - S/4| = 3/16, a value inside the bounds
    lo, hi = floor.oracle_gap_bounds([1, 4, 6, 4, 1])["calibrated"]
    assert lo - 1e-9 <= 3 / 16 <= hi + 1e-9 and lo > 0.05
    best_lo, _ = floor.oracle_gap_bounds([1, 4, 6, 4, 1])["best"]
    assert best_lo <= lo  # the median predictor does at least as well
    # the same images with S = 0 left out: the selected images' rate is r = E[S/4 | S >= 1] = 8/15, and the oracle
    # drawing at r is off by (4 |1/4 - r| + 6 |1/2 - r| + 4 |3/4 - r| + |1 - r|) / 15 = 8/45
    lo, hi = floor.oracle_gap_bounds([1, 4, 6, 4, 1], min_count=1)["calibrated"]
    assert lo - 1e-9 <= 8 / 45 <= hi + 1e-9
    # one image without a rater's mask but many with one (crops centred on marked objects): no binomial mixture
    # gives that, unless the images without any are left out
    with pytest.raises(ValueError, match="min-count"):
        floor.oracle_gap_bounds([1, 40, 20, 20, 40])
    lo, hi = floor.oracle_gap_bounds([1, 40, 20, 20, 40], min_count=1)["calibrated"]
    assert 0.05 < lo <= hi < 0.25


def test_presence_floor_bounds_the_dmax_an_oracle_presence_gives_a_predictions_own_shapes():
    """``research/presence_floor.py``: the non-empty samples' quality is recovered from the evaluator's D_max, and
    the oracle's D_max follows from its rate of drawing them."""
    from nnunet_arseg.evaluation.multirater import multirater_metrics_batch
    floor = _benchmark_module("presence_floor")
    rng = np.random.default_rng(0)
    samples, raters, quality = [], [], {s: [] for s in range(5)}
    for i in range(40):
        blob = np.zeros((16, 16), bool)
        blob[4:10, 4:10 + i % 4] = True
        drawn = rng.random(4) < 0.6
        drawn[0] |= i % 5 == 0
        rater = np.stack([np.roll(blob, k, axis=1) & d for k, d in enumerate(drawn)])
        present = rng.random(8) < 0.5
        sample = np.stack([np.roll(blob, -1, axis=0) & p for p in present])
        samples.append(sample)
        raters.append(rater)
        if present.any():
            best = max(2 * (sample[present][0] & r).sum() / (sample[present][0].sum() + r.sum()) for r in rater)
            quality[int(drawn.sum())].append(best)
    metrics = multirater_metrics_batch(np.stack(samples), np.stack(raters))
    recovered = floor.present_dice_by_count(metrics["presence_raters"], metrics["presence_samples"],
                                            metrics["D_max"], 4)
    for s in range(5):
        expected = np.mean(quality[s]) if quality[s] else np.nan
        np.testing.assert_allclose(recovered[s], expected, atol=1e-9, equal_nan=True)
        assert s == 0 or quality[s], "the synthetic images cover every raters' count"
    # every rater always draws: the oracle always draws too, so D_max is the quality of the non-empty samples
    only_all = floor.oracle_dmax_bounds([0, 0, 0, 0, 50], [0, 0.1, 0.2, 0.3, 0.7])
    assert only_all["low"][0] == pytest.approx(0.7) and only_all["high"][0] == pytest.approx(0.7)
    assert math.isnan(only_all["low"][1])
    # binomial counts at p = 1/2: drawing half the time scores sum_s P(s) (q_s + e_s) / 2, inside the bounds
    q = np.array([0.0, 0.5, 0.6, 0.7, 0.9])
    pmf = np.array([1, 4, 6, 4, 1]) / 16
    at_half = float((pmf * (q + np.array([1, 1, 1, 1, 0]))).sum() / 2)
    bounds = floor.oracle_dmax_bounds([1, 4, 6, 4, 1], q)
    assert bounds["low"][0] - 1e-9 <= at_half <= bounds["high"][0] + 1e-9 < 1
    assert all(0 < corr <= 1 for _, corr in bounds.values())
    with pytest.raises(ValueError, match="undefined"):
        floor.oracle_dmax_bounds([1, 4, 6, 4, 1], [0.0, np.nan, 0.6, 0.7, 0.9])


def test_anchor_scales_choice_keeps_the_most_sampling_within_a_tie(monkeypatch):
    """``research/lidc_anchor_scales.py``: the lowest GED wins unless fewer scales from the head come within the
    tie; ``all`` (every scale from the head) counts as the most."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    choice = _benchmark_module("lidc_anchor_scales")
    rows = {"5": {"GED": 0.330}, "6": {"GED": 0.305}, "7": {"GED": 0.301}, "all": {"GED": 0.296}}
    assert choice.choose(rows, tie=0.01) == "6"
    assert choice.choose(rows, tie=0.0) == "all"
    assert choice.choose({"all": {"GED": 0.30}, "0": {"GED": 0.30}}, tie=0.0) == "0"


def test_budget_curve_shares_the_trainings_out_evenly_over_the_lanes(monkeypatch):
    """``benchmarks/lidc_budget_curve.py``: every (budget, seed) training in exactly one lane, the lanes' minutes as
    even as the budgets allow, each lane's shortest training first."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    curve = _benchmark_module("lidc_budget_curve")
    runs = [(b, s) for b in (60.0, 120.0, 240.0) for s in (0, 1, 2)]
    queues = curve.share_out(runs, 2)
    assert sorted(r for q in queues for r in q) == sorted(runs)
    assert sorted(sum(b for b, _ in q) for q in queues) == [600.0, 660.0]
    assert all(q == sorted(q) for q in queues)
    assert curve.share_out(runs, 1) == [sorted(runs)]
    assert curve.run_name("nnUNetTrainerProbUNet_budget", 60.0, 2) == "nnUNetTrainerProbUNet_budget_b060_s2"


def test_budget_curve_needs_the_tokenizer_for_ar_seg_only(tmp_path, monkeypatch):
    """``benchmarks/lidc_budget_curve.py``: the rivals train on an experiment that has no tokenizer yet; AR-Seg is
    refused there with the step to run, and gets the tokenizer folders (no model's) once there is one."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    curve = _benchmark_module("lidc_budget_curve")
    results = tmp_path / "nnUNet_results" / "Dataset601_LIDCExp"
    for trainer in (curve.PROBUNET, curve.STOCK):
        assert curve.experiment_tokenizers(str(results), trainer) == []
    with pytest.raises(SystemExit, match="tokenizer step"):
        curve.experiment_tokenizers(str(results), curve.AR)
    (results / f"{curve.TOKENIZER_FOLDER_PREFIX}2d").mkdir(parents=True)
    (results / f"{curve.PROBUNET}__nnUNetPlans__2d").mkdir()
    assert curve.experiment_tokenizers(str(results), curve.AR) == [f"{curve.TOKENIZER_FOLDER_PREFIX}2d"]


def test_experiment_draws_new_patients_and_names_each_way_a_model_samples(tmp_path, monkeypatch):
    """``benchmarks/lidc_experiment.py``: patients outside a split and outside earlier draws, the same for the same
    seed; a model's rows by what its plans say it trained (the flags explicit, whatever the predictor's default)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    experiment = _benchmark_module("lidc_experiment")
    pool = tmp_path / "pool"
    names = [f"LIDC-IDRI-{i:04d}" for i in range(12)]
    for name in names:
        (pool / name).mkdir(parents=True)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"seed": 1, "patients": {"train": names[:4], "test": names[4:6]}}))
    val = experiment.draw_outside(str(pool), str(split), 3, seed=2)
    assert len(set(val)) == 3 and not set(val) & set(names[:6]) and val == sorted(val)
    assert experiment.draw_outside(str(pool), str(split), 3, seed=2) == val
    (tmp_path / "val.txt").write_text("\n".join(val) + "\n")
    rest = experiment.draw_outside(str(pool), str(split), 3, seed=3, exclude=[str(tmp_path / "val.txt")])
    assert sorted(rest + val) == names[6:]
    with pytest.raises(SystemExit, match="fewer than the 4"):
        experiment.draw_outside(str(pool), str(split), 4, seed=3, exclude=[str(tmp_path / "val.txt")])

    def model(name: str, **arch_kwargs) -> str:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "plans.json").write_text(json.dumps(
            {"configurations": {"2d": {"architecture": {"arch_kwargs": arch_kwargs}}}}))
        return str(folder)

    assert experiment.sampling_rows("stock", model("stock", n_stages=6)) == [("stock", ())]
    for name, full in (("full", True), ("latent", False)):  # the default sampler first, then the head baseline
        assert experiment.sampling_rows(name, model(name, aux_head=True, aux_full_resolution=full)) == [
            (name, ("--sampler", "autoregressive")), (f"{name}_head", ("--sampler", "head"))]


def test_experiment_trains_from_its_flags_then_resumes_with_c(tmp_path, monkeypatch):
    """``benchmarks/lidc_experiment.py``: a fold trains with its extra flags (a warm start) until it has a checkpoint,
    then resumes with ``--c`` instead of starting again; pinned to a core where one is given."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    experiment = _benchmark_module("lidc_experiment")
    warm = ["-pretrained_weights", "stock.pth"]
    cmd = experiment.train_cmd("601", "T", "2", str(tmp_path), "cpu", "1", warm)
    assert cmd[:3] == ["taskset", "-c", "1"] and cmd[4:] == ["601", "2d", "2", "-tr", "T", "-device", "cpu"] + warm
    (tmp_path / "checkpoint_latest.pth").write_bytes(b"")
    cmd = experiment.train_cmd("601", "T", "all", str(tmp_path), "cpu", None, warm)
    assert cmd[0].endswith("nnUNetv2_train") and cmd[-1] == "--c" and "-pretrained_weights" not in cmd


def test_dmax_split_separates_presence_from_shape():
    """``research/lidc_dmax_split.py``: per case, the sampler's drawn share, its drawn samples' D_max (shape) and
    D_max, against a one-mask reference, with the score an empty sample gets."""
    bench = _benchmark_module("lidc_dmax_split")
    raters = np.zeros((4, 8, 8), dtype=bool)
    raters[0, 2:6, 2:6] = True  # one rater of four draws
    half = np.zeros((4, 8, 8), dtype=bool)
    half[:2, 2:6, 3:6] = True  # two of four samples draw, Dice 6/7 with that rater
    row = bench.split(half, raters, np.zeros((8, 8), dtype=bool))
    assert row["raters"] == 1 and row["share"] == 0.5 and row["rater_share"] == 0.25
    assert row["shape"] == pytest.approx(24 / 28) and row["d_max"] == pytest.approx((2 * 24 / 28 + 2) / 4)
    assert not row["ref_draws"] and row["ref_d_max"] == 1.0 and row["empty_score"] == 1.0  # empty against the three
    everyone = np.broadcast_to(raters[:1], (4, 8, 8))  # all four raters draw: an empty sample scores 0
    row = bench.split(half, everyone, everyone[0])
    assert row["d_max"] == pytest.approx(24 / 28 / 2) and row["empty_score"] == 0.0
    assert row["ref_draws"] and row["ref_d_max"] == 1.0
    assert math.isnan(bench.split(np.zeros((4, 8, 8), dtype=bool), raters, raters[0])["shape"])


def test_presence_from_masks_parts(lidc_demo):
    """``research/presence_from_masks.py``: the systematic sampler's expected gap, and what the object features
    say of a real nodule."""
    bench = _benchmark_module("presence_from_masks")
    share = np.array([0.25, 0.5, 1.0])
    # p a multiple of 1/N: exactly pN non-empty samples
    assert bench.systematic_gap(np.array([0.25, 0.5, 1.0]), share, 16) == pytest.approx(0.0)
    assert bench.systematic_gap(np.array([0.5, 0.5, 0.5]), share, 16) == pytest.approx((0.25 + 0 + 0.5) / 3)
    # p = 1.5/16: 1 or 2 of 16 samples, each half the time
    assert bench.systematic_gap(np.array([1.5 / 16]), np.array([0.0]), 16) == pytest.approx(1.5 / 16)
    # the least expected gap is at the median of the raters' share, not at its mean (0.825 and 0.55 here)
    proba = np.array([[0.1, 0.1, 0.2, 0.6], [0.6, 0.0, 0.0, 0.4]])
    assert bench.median_share(proba, np.array([1, 2, 3, 4]), 4, 16).tolist() == [1.0, 0.25]
    nodules = [(imread(f).astype(float), imread(f.parent.parent / "mask-0" / f.name) > 127)
               for f in sorted(lidc_demo.glob("LIDC-IDRI-*/nodule-*/images/slice-*.png"))]
    feats = np.array([bench.object_features(image, mask) for image, mask in nodules if mask.sum() > 50])
    assert len(feats) > 20 and np.isfinite(feats).all()
    assert feats[:, 0] == pytest.approx([np.log1p(m.sum()) for _, m in nodules if m.sum() > 50])
    assert np.median(feats[:, 1]) > 0  # nodules are mostly brighter than the lung around them
    assert bench.object_features(nodules[0][0], np.zeros((128, 128), bool)) == [0.0] * feats.shape[1]
    cases = ["LIDC0002_n0_s00", "LIDC0002_n0_s01", "LIDC0002_n0_s02", "LIDC0002_n1_s00"]
    nod = bench.nodule_features(cases, np.array([10.0, 40.0, 20.0, 5.0]))
    assert nod[:, 0] == pytest.approx(np.log1p([40, 40, 40, 5]))
    assert nod[:, 1].tolist() == [0, 1, 0, 0]
    with pytest.raises(ValueError, match="_n<K>_s<II>"):
        bench.nodule_features(["case_001"], np.array([1.0]))


def test_presence_from_masks_runs_on_a_converted_dataset(lidc_demo, tmp_path):
    """The benchmark as a user runs it, on the demo patients converted with a test split."""
    subprocess.run([sys.executable, "-m", "dataset_conversion.lidc", "-i", str(lidc_demo), "-o", str(tmp_path),
                    "-d", "903", "--test_fraction", "0.25", "--disable_progress_bar"], check=True, cwd=REPO,
                   capture_output=True)
    raw = next(tmp_path.glob("Dataset903_*"))
    # the object tells presence: every fit beats a sampler drawing at the training raters' share on every test slice
    bench = _benchmark_module("presence_from_masks")
    ds = load_json(str(raw / "dataset.json"))
    present_tr = bench.load_cases(str(raw), ds, "imagesTr", "labelsTr_raters")[2]
    present_te = bench.load_cases(str(raw), ds, "imagesTs", "labelsTs_raters")[2]
    blind = bench.systematic_gap(np.full(len(present_te), present_tr.mean()), present_te.mean(1), 16)
    for options in ([], ["--nodule"]):
        script = REPO / "benchmarks" / "research" / "presence_from_masks.py"
        proc = subprocess.run([sys.executable, str(script), "-raw", str(raw), *options], capture_output=True, text=True,
                              cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        for split, images in (("train", "imagesTr"), ("test", "imagesTs")):
            assert f"{split}: {len(list((raw / images).glob('*_0000.png')))} cases" in proc.stdout
        fits = [(float(line.split("gap ")[1].split(",")[0]), float(line.split("correlation ")[1]))
                for line in proc.stdout.splitlines() if "presence gap" in line]
        assert len(fits) == 3 and all(gap < blind - 0.05 and corr > 0.5 for gap, corr in fits), (blind, proc.stdout)
