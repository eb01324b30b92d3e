"""End to end in 3d_fullres on real BRATS crops (FLAIR + T1c, nnU-Net's three regions): convert, plan and preprocess,
train the tiny AR-Seg variant with the stock ``nnUNetv2_train`` (the dataset's 3D tokenizer, then the segmentor),
predict the test cases with both predict commands, and evaluate region Dice."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_arseg.prediction_files import sample_file

pytestmark = pytest.mark.e2e

PY = sys.executable
BIN = Path(PY).parent
DATASET_ID = 503
DATASET = f"Dataset{DATASET_ID}_BraTSCrop"
TRAINER = "nnUNetTrainerARSeg_tiny"


def _run(cmd: list[str], env: dict, timeout: int = 900) -> str:
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n{out[-4000:]}"
    return out


def test_3d_train_predict_both_commands_and_evaluate(brats15_small, tmp_path):
    paths = {k: str(tmp_path / k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for p in paths.values():
        os.makedirs(p)
    ext_dir = str(Path(__import__("nnunet_arseg.nnunet_ext", fromlist=["EXT_DIR"]).EXT_DIR))
    env = {**{k: v for k, v in os.environ.items() if k != "nnUNet_n_proc_DA"}, **paths, "nnUNet_def_n_proc": "1",
           "nnUNet_extTrainer": ext_dir}
    _run([PY, "-m", "dataset_conversion.brats", "-i", str(brats15_small), "-d", str(DATASET_ID), "-n", "BraTSCrop",
          "--sequences", "flair", "t1ce", "--disable_progress_bar"], env)
    _run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1",
          "-npfp", "1", "--no_pbar"], env)
    # four training cases: too few for nnU-Net's 5 folds, so fold "all"
    log = _run([str(BIN / "nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "all", "-tr", TRAINER, "-device", "cpu"],
               {**env, "nnUNet_n_proc_DA": "0"})
    assert "Training the dataset's mask tokenizer" in log and "Epoch 2" in log

    model = Path(paths["nnUNet_results"]) / DATASET / f"{TRAINER}__nnUNetPlans__3d_fullres"
    arch = json.loads((model / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"]
    stride = arch["arch_kwargs"]["tokenizer"]["latent_stride"]
    assert len(stride) == 3 and arch["arch_kwargs"]["has_regions"] is True  # a 3D latent sized from the data
    assert (model / "fold_all" / "checkpoint_final.pth").is_file()

    raw = Path(paths["nnUNet_raw"]) / DATASET
    images = raw / "imagesTs"
    cases = sorted({p.name[:-len("_0000.nii.gz")] for p in images.glob("*_0000.nii.gz")})
    assert cases
    common = ["-i", str(images), "-d", str(DATASET_ID), "-c", "3d_fullres", "-f", "all", "-tr", TRAINER, "-device",
              "cpu", "-npp", "0", "-nps", "0", "--disable_progress_bar"]
    ours, stock = tmp_path / "pred_arseg", tmp_path / "pred_stock"
    _run([str(BIN / "nnUNetv2_arseg_predict"), "-o", str(ours)] + common + ["--num_samples", "4", "--seed", "2",
                                                                              "--save_samples", "--save_uncertainty"],
         env)
    _run([str(BIN / "nnUNetv2_predict"), "-o", str(stock)] + common,
         {**env, "nnUNet_ARSEG_NUM_SAMPLES": "4", "nnUNet_ARSEG_SEED": "2"})
    for case in cases:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(ours / f"{case}.nii.gz")))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(stock / f"{case}.nii.gz")))
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(images / f"{case}_0000.nii.gz")))
        assert a.shape == image.shape and np.array_equal(a, b)  # the same consensus, in the image's geometry
        assert set(np.unique(a)) <= {0, 1, 2, 3}  # nnU-Net's BraTS labels, painted from the regions
        for k in range(4):
            assert Path(sample_file(str(ours), case, k, ".nii.gz")).is_file()
        unc = np.load(ours / "uncertainty" / f"{case}.npz")["uncertainty"]
        assert unc.size == image.size and np.isfinite(unc).all()
    # sampling around a label map (here the consensus just written): each region is the union of its labels, and
    # the stock command, given the folder as its previous stage, draws the same
    anchored, anchored_stock = tmp_path / "pred_anchored", tmp_path / "pred_anchored_stock"
    _run([str(BIN / "nnUNetv2_arseg_predict"), "-o", str(anchored)] + common + ["--num_samples", "4", "--seed", "2",
                                                                                 "--anchor", str(ours)], env)
    _run([str(BIN / "nnUNetv2_predict"), "-o", str(anchored_stock), "-prev_stage_predictions", str(ours)] + common,
         {**env, "nnUNet_ARSEG_NUM_SAMPLES": "4", "nnUNet_ARSEG_SEED": "2"})
    for case in cases:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(anchored / f"{case}.nii.gz")))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(anchored_stock / f"{case}.nii.gz")))
        assert np.array_equal(a, b) and set(np.unique(a)) <= {0, 1, 2, 3}
    regions = json.loads((model / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"][
        "arch_kwargs"]["regions"]
    assert regions == [[1, 2, 3], [2, 3], [3]]  # whole tumour, tumour core, enhancing (nnU-Net's BraTS labels)
    _run([str(BIN / "nnUNetv2_arseg_evaluate"), "-i", str(ours), "-d", str(DATASET_ID), "--regions",
          "--no_raters"], env)
    summary = json.loads((ours / "summary_arseg.json").read_text())
    assert len(summary["metric_per_case"]) == len(cases)
    assert all(0.0 <= v <= 1.0 for v in summary["foreground_mean"].values() if isinstance(v, float)
               and not np.isnan(v))
    ckpt = torch.load(model / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 3
