"""Three of the five folds started at once on three "hosts" sharing one results folder (real ``nnUNetv2_train``
processes on the bundled LIDC sample): the dataset's tokenizer is trained once, behind its lock, and every fold trains
on it. Three, not five, keeps more hosts than the test machine's two cores for a minute less."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
DATASET_ID = 502
DATASET = f"Dataset{DATASET_ID}_LIDC"
TRAINER = "nnUNetTrainerARSeg_tinyOneEpoch"  # tests/ext_trainers
EXT_TRAINERS = Path(__file__).parent / "ext_trainers"
FOLDS = 3  # of nnU-Net's five, each on a host of its own


def _small_sample(lidc_demo: Path, out: Path, patients: int = 6, slices: int = 3) -> Path:
    """The first ``slices`` slices of the first nodule of ``patients`` bundled patients, linked: one patient for the
    converter's test set, one per fold of nnU-Net's five."""
    for patient in sorted(lidc_demo.glob("LIDC-IDRI-*"))[:patients]:
        names = sorted(p.name for p in (patient / "nodule-0" / "images").glob("slice-*.png"))[:slices]
        for sub in ["images"] + [f"mask-{r}" for r in range(4)]:
            (out / patient.name / "nodule-0" / sub).mkdir(parents=True)
            for name in names:
                (out / patient.name / "nodule-0" / sub / name).symlink_to(patient / "nodule-0" / sub / name)
    return out


def test_folds_on_three_hosts_train_one_tokenizer_once(lidc_demo, tmp_path):
    from nnunet_arseg.nnunet_ext import EXT_DIR
    sample = _small_sample(lidc_demo, tmp_path / "lidc_in")
    paths = {k: str(tmp_path / k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_n_proc_DA"}
    env.update(paths, nnUNet_def_n_proc="1", nnUNet_extTrainer=os.pathsep.join([str(EXT_DIR), str(EXT_TRAINERS)]))
    for cmd in ([sys.executable, "-m", "dataset_conversion.lidc", "-i", str(sample), "-d", str(DATASET_ID),
                 "--disable_progress_bar"],
                [str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "2d", "-np", "1", "-npfp",
                 "1", "--no_pbar"]):
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    procs = []
    for fold in range(FOLDS):
        log = open(tmp_path / f"fold{fold}.log", "w")
        procs.append((subprocess.Popen(
            [str(BIN / "nnUNetv2_train"), str(DATASET_ID), "2d", str(fold), "-tr", TRAINER, "-device", "cpu"],
            env={**env, "nnUNet_ARSEG_HOSTNAME": f"node{fold}", "nnUNet_n_proc_DA": "0", "OMP_NUM_THREADS": "1"},
            stdout=log, stderr=subprocess.STDOUT), log))
    try:
        for proc, _ in procs:
            proc.wait(timeout=1800)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    logs = [(tmp_path / f"fold{fold}.log").read_text() for fold in range(FOLDS)]
    for fold, (proc, _) in enumerate(procs):
        assert proc.returncode == 0, f"fold {fold}:\n{logs[fold][-3000:]}"
        assert "The split file contains 5 splits." in logs[fold]

    results = Path(paths["nnUNet_results"]) / DATASET
    (tok_dir,) = (results / "ARSegTokenizer__nnUNetPlans__2d").iterdir()
    assert sum(log.count("Training the dataset's mask tokenizer") for log in logs) == 1
    assert sum("waiting for" in log and ", held by host node" in log for log in logs) >= 1
    stored = torch.load(tok_dir / "tokenizer.pth", map_location="cpu", weights_only=False)
    assert stored["summary"]["steps"] == 60 and [h["step"] for h in stored["summary"]["history"]] == [20, 40, 60]
    assert sorted(os.listdir(tok_dir)) == ["architecture.json", "progress.png", "summary.json", "tokenizer.pth"]
    for fold in range(FOLDS):
        ckpt = torch.load(results / f"{TRAINER}__nnUNetPlans__2d" / f"fold_{fold}" / "checkpoint_final.pth",
                          map_location="cpu", weights_only=False)
        assert ckpt["current_epoch"] == 1 and ckpt["arseg_tokenizer"] == str(tok_dir / "tokenizer.pth")
        for k, v in stored["state_dict"].items():
            assert torch.equal(ckpt["network_weights"]["tokenizer." + k], v), (fold, k)
