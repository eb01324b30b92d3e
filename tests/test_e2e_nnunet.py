"""End to end with the real nnU-Net commands on real LIDC crops: convert, plan and preprocess, train the tiny AR-Seg
variant (both phases), kill and resume with ``--c``, ``--val``, predict with samples and uncertainty (our command and
the stock one), and check the files."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.e2e

PY = sys.executable
BIN = Path(PY).parent
DATASET_ID = 501
DATASET = f"Dataset{DATASET_ID}_LIDC"
TRAINER = "nnUNetTrainerARSeg_tiny"
PATIENTS = ("LIDC-IDRI-0002", "LIDC-IDRI-0005", "LIDC-IDRI-0006", "LIDC-IDRI-0010")


def _run(cmd: list[str], env: dict, timeout: int = 600) -> str:
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"{' '.join(cmd)} failed ({res.returncode}):\n{out[-4000:]}"
    return out


def _env(base: dict, **extra) -> dict:
    """The test's nnU-Net environment; ``nnUNet_n_proc_DA`` only where given (planning crashes with 0)."""
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_n_proc_DA"}
    return {**env, **base, **extra}


def _read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def trained(lidc_demo, tmp_path_factory):
    """Converted, preprocessed and trained (with one kill + ``--c``) tiny AR-Seg model; shared by all tests."""
    root = tmp_path_factory.mktemp("e2e")
    paths = {k: str(root / k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for p in paths.values():
        os.makedirs(p)
    base = {**paths, "nnUNet_def_n_proc": "1", "nnUNet_extTrainer": str(Path(__import__(
        "nnunet_arseg.nnunet_ext", fromlist=["EXT_DIR"]).EXT_DIR))}
    src = root / "lidc_in"
    src.mkdir()
    for p in PATIENTS:
        (src / p).symlink_to(lidc_demo / p)
    _run([PY, "-m", "dataset_conversion.lidc", "-i", str(src), "-d", str(DATASET_ID), "--test_fraction", "0.25",
          "--disable_progress_bar"], _env(base))
    _run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "2d", "-np", "1", "-npfp", "1",
          "--no_pbar"], _env(base))

    train_env = _env(base, nnUNet_n_proc_DA="0")
    train_cmd = [str(BIN / "nnUNetv2_train"), str(DATASET_ID), "2d", "0", "-tr", TRAINER, "-device", "cpu"]
    fold = Path(paths["nnUNet_results"]) / DATASET / f"{TRAINER}__nnUNetPlans__2d" / "fold_0"
    # run 1 is killed while the tokenizer trains, run 2 (--c) once the first epoch is checkpointed, run 3 finishes
    logs = [_run_until_killed(train_cmd, train_env, root / "train1.log", "tokenizer step 50/"),
            _run_until_killed(train_cmd + ["--c"], train_env, root / "train2.log", "Epoch 1\n")]
    assert (fold / "checkpoint_latest.pth").is_file() and not (fold / "checkpoint_final.pth").exists()
    logs.append(_run(train_cmd + ["--c"], train_env))
    return {"root": root, "base": base, "fold": fold, "logs": logs, "paths": paths}


def _run_until_killed(cmd: list[str], env: dict, log: Path, marker: str) -> str:
    """Start ``cmd`` and SIGKILL it as soon as its output contains ``marker``; returns the output."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None and marker not in log.read_text():
            time.sleep(0.1)
        assert proc.poll() is None, f"training ended before it could be interrupted:\n{log.read_text()[-3000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return log.read_text()


def test_tokenizer_once_then_segmentor_epochs_and_resume(trained):
    log1, log2, log3 = trained["logs"]
    fold = trained["fold"]
    tok_dir = next((Path(trained["paths"]["nnUNet_results"]) / DATASET / "ARSegTokenizer__nnUNetPlans__2d").iterdir())
    # the dataset's tokenizer: trained in run 1, resumed from its own checkpoint in run 2, never again in run 3
    assert "Training the dataset's mask tokenizer" in log1 and "resuming at step 50" in log2
    assert "Training the dataset's mask tokenizer" not in log3 and "Epoch 0\n" not in log3
    stored = torch.load(tok_dir / "tokenizer.pth", map_location="cpu", weights_only=False)
    assert stored["summary"]["steps"] >= 50 and (tok_dir / "progress.png").is_file()
    assert not (tok_dir / "tokenizer_latest.pth").exists() and not (tok_dir / ".lock").exists()
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 3 and ckpt["inference_allowed_mirroring_axes"] is None
    assert len(ckpt["logging"]["train_losses"]) == 3  # the logs of the killed run were kept
    # every epoch trains the segmentor, so checkpoint_best holds the dataset's tokenizer and a trained segmentor
    best = torch.load(fold / "checkpoint_best.pth", map_location="cpu", weights_only=False)
    for weights in (best, ckpt):
        for k, v in stored["state_dict"].items():
            assert torch.equal(weights["network_weights"]["tokenizer." + k], v), k
    plans = (fold.parent / "plans.json").read_text()
    assert "nnunet_arseg.network.ARSegNetwork" in plans and '"latent_stride"' in plans
    assert (fold / "progress.png").is_file()
    # grouped folds: no patient in both train and validation of fold 0
    import json
    pre = Path(trained["paths"]["nnUNet_preprocessed"]) / DATASET
    split = json.loads((pre / "splits_final.json").read_text())[0]
    poc = json.loads((pre / "dataset.json").read_text())["arseg"]["patient_of_case"]
    assert {poc[k] for k in split["train"]}.isdisjoint({poc[k] for k in split["val"]})
    raters = np.load(pre / "nnUNetPlans_2d_raters" / f"{split['train'][0]}.npz")["raters"]
    # as nnU-Net's own preprocessed seg: -1 marks background outside the image's nonzero region
    assert raters.shape[0] == 4 and set(np.unique(raters)) <= {-1, 0, 1} and (raters == 1).any()


def test_final_validation_and_val_flag(trained):
    fold = trained["fold"]
    summary = fold / "validation" / "summary_arseg.json"
    assert (fold / "validation" / "summary.json").is_file() and summary.is_file()
    os.remove(summary)
    out = _run([str(BIN / "nnUNetv2_train"), str(DATASET_ID), "2d", "0", "-tr", TRAINER, "-device", "cpu", "--val"],
               _env(trained["base"], nnUNet_n_proc_DA="0"))
    assert "Mean Validation Dice" in out
    import json
    s = json.loads(summary.read_text())
    assert s["num_samples"] == 4 and set(s["mean"]["0"]) >= {"GED", "HM-IoU", "Soft-Dice"}
    assert all(np.isfinite(s["mean"]["0"][k]) for k in ("GED", "HM-IoU", "Soft-Dice"))


def test_arseg_predict_outputs(trained):
    raw = Path(trained["paths"]["nnUNet_raw"]) / DATASET
    out = trained["root"] / "pred"
    _run([PY, "-m", "nnunet_arseg.inference.predict", "-i", str(raw / "imagesTs"), "-o", str(out), "-d",
          str(DATASET_ID), "-c", "2d", "-f", "0", "-tr", TRAINER, "-device", "cpu", "-npp", "0", "-nps", "0",
          "-num_samples", "4", "--seed", "3", "--save_samples", "--save_uncertainty", "--save_scales",
          "--disable_progress_bar"], _env(trained["base"]))
    cases = sorted(p.name[:-len(".png")] for p in out.glob("*.png"))
    assert len(cases) == len(list((raw / "imagesTs").glob("*.png")))
    for case in cases:
        samples = np.stack([_read_png(out / "samples" / f"{case}_s{k:02d}.png") for k in range(4)])
        consensus = _read_png(out / f"{case}.png")
        assert set(np.unique(samples)) <= {0, 1}
        np.testing.assert_array_equal(consensus, (samples.sum(0) * 2 > 4).astype(consensus.dtype))
        unc = np.load(out / "uncertainty" / f"{case}.npz")["uncertainty"].reshape(consensus.shape)
        agree = (samples == samples[0]).all(0)
        assert np.all(unc[agree] == 0) and np.all(unc[~agree] > 0)
        assert (out / "uncertainty" / f"{case}.png").is_file() and (out / "scales" / f"{case}.png").is_file()
    assert (out / "arseg_predict_args.json").is_file()
    # The trained model's samples differ: its N token maps per image are distinct draws. (The decoded masks can all
    # be empty after the tiny variant's 10 tokenizer steps, which sit on the all-background plateau.)
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_arseg.segmentor.sampling import sample_token_maps
    from nnunet_arseg.training.variants import nnUNetTrainerARSeg_tiny
    fold = trained["fold"]
    pm = PlansManager(load_json(str(fold.parent / "plans.json")))
    net = nnUNetTrainerARSeg_tiny.build_network_architecture(pm, pm.get_configuration("2d"), 1, 2, False)
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    net.load_state_dict(ckpt["network_weights"])
    net.eval()
    image = torch.from_numpy(_read_png(raw / "imagesTs" / f"{cases[0]}_0000.png").astype(np.float32))[None, None]
    with torch.no_grad():
        prefix, _ = net.encode_image((image - image.mean()) / image.std())
        idx_list, _, _ = sample_token_maps(net.transformer, net.tokenizer.quantizer, prefix,
                                           torch.zeros(1, dtype=torch.long), 4, seed=3)
    tokens_N = torch.cat([idx.flatten(1) for idx in idx_list], dim=1)
    assert len({tuple(t.tolist()) for t in tokens_N}) == 4, "the sampler drew identical token maps"


def test_stock_predict_and_bad_input(trained):
    raw = Path(trained["paths"]["nnUNet_raw"]) / DATASET
    out = trained["root"] / "pred_stock"
    _run([str(BIN / "nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID),
          "-c", "2d", "-f", "0", "-tr", TRAINER, "-device", "cpu", "-npp", "0", "-nps", "0",
          "--disable_progress_bar"], _env(trained["base"], nnUNet_ARSEG_NUM_SAMPLES="2"))
    assert len(list(out.glob("*.png"))) == len(list((raw / "imagesTs").glob("*.png")))

    cmd = [PY, "-m", "nnunet_arseg.inference.predict", "-i", str(raw / "imagesTs"), "-o", str(out / "x"), "-d",
           str(DATASET_ID), "-c", "2d", "-f", "0", "-device", "cpu"]
    res = subprocess.run(cmd + ["-tr", TRAINER, "-num_samples", "0"], env=_env(trained["base"]),
                         capture_output=True, text=True)
    assert res.returncode != 0 and "-num_samples must be >= 1" in res.stderr
    res = subprocess.run(cmd + ["-tr", "nnUNetTrainer"], env=_env(trained["base"]), capture_output=True, text=True)
    assert res.returncode != 0 and "no trained model" in res.stderr
