"""The trainer's pieces on their own: patient-grouped folds, plans rewriting, presets, LR schedule, raters."""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2, nnUNetDatasetNumpy
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_arseg.config import PRESETS, RECIPE, SIZE_FIELDS, ARSegConfig, preset
from nnunet_arseg.training import raters
from nnunet_arseg.training.plans import rewrite_plans_for_arseg, tokenizer_widths
from nnunet_arseg.training.schedules import WarmupCosineLR, build_optimizer
from nnunet_arseg.training.splits import patient_grouped_splits
from test_network import plans_with_arseg


def test_folds_never_split_a_patient():
    cases = [f"p{p}_s{s}" for p in range(7) for s in range(1 + p % 3)]
    patient = {c: c.split("_")[0] for c in cases}
    folds = patient_grouped_splits(cases, patient)
    assert len(folds) == 5
    assert sorted(c for f in folds for c in f["val"]) == sorted(cases)  # every case validated exactly once
    for f in folds:
        assert {patient[c] for c in f["train"]}.isdisjoint({patient[c] for c in f["val"]})
    assert patient_grouped_splits(cases, patient) == folds  # seeded
    with pytest.raises(KeyError, match="no patient"):
        patient_grouped_splits(cases + ["orphan"], patient)
    with pytest.raises(ValueError, match="single patient"):
        patient_grouped_splits(["a", "b"], {"a": "p", "b": "p"})


def test_plans_rewrite_changes_only_the_configurations_architecture():
    plans = plans_with_arseg()
    dataset_json = {"labels": {"background": 0, "nodule": 1}}
    before = copy.deepcopy(plans)
    out = rewrite_plans_for_arseg(plans, "2d", dataset_json, {"preset": "small", "tokenizer": {"latent_stride": 8}})
    assert plans == before  # the caller's plans are not modified
    arch = out["configurations"]["2d"]["architecture"]
    assert arch["network_class_name"] == "nnunet_arseg.network.ARSegNetwork"
    assert arch["arch_kwargs"]["features_per_stage"] == [32, 64, 64, 64, 64, 64]  # the small preset's cap
    assert arch["arch_kwargs"]["tokenizer"] == {**PRESETS["small"].tokenizer, "latent_stride": 8}
    assert arch["arch_kwargs"]["has_regions"] is False
    for key in ("3d_fullres", "arseg_2d"):
        assert out["configurations"][key] == before["configurations"][key]
    assert {k: v for k, v in out.items() if k != "configurations"} == \
        {k: v for k, v in before.items() if k != "configurations"}
    assert PlansManager(out).get_configuration("2d").network_arch_class_name == "nnunet_arseg.network.ARSegNetwork"
    with pytest.raises(KeyError, match="not in the plans"):
        rewrite_plans_for_arseg(plans, "3d_lowres", dataset_json, {})


def test_presets_are_one_source_of_defaults():
    assert tokenizer_widths({"preset": "tiny", "tokenizer": {"ch": 8}}) == {**PRESETS["tiny"].tokenizer, "ch": 8}
    assert preset("small", transformer={"depth": 5}).transformer == {**PRESETS["small"].transformer, "depth": 5}
    cfg = preset("tiny", num_samples=4)
    back = ARSegConfig.from_arch_kwargs({**cfg.arch_kwargs(), "n_stages": 6})  # the U-Net's keys are not ours
    assert back == cfg.replace(max_features_per_stage=None)
    with pytest.raises(ValueError, match="unknown AR-Seg settings"):
        preset("small", widht=3)
    with pytest.raises(ValueError, match="preset must be one of"):
        preset("huge")


def test_every_preset_is_the_measured_recipe_and_differs_only_in_sizes():
    """nnUNetTrainerARSeg (``reference``) trains what docs/results.md measured (``small``), at the paper's sizes."""
    for name, cfg in PRESETS.items():
        assert {k: getattr(cfg, k) for k in RECIPE} == RECIPE, name
    method = [{k: v for k, v in cfg.arch_kwargs().items() if k not in SIZE_FIELDS} for cfg in PRESETS.values()]
    assert all(m == method[0] for m in method)
    assert PRESETS["reference"].presence and PRESETS["reference"].aux_head


def test_warmup_then_cosine_and_a_stretchable_horizon():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(net, list(net.parameters()), 1e-3, 0.01)
    decays = [g["weight_decay"] for g in opt.param_groups]
    assert decays == [0.01, 0.0] and len(opt.param_groups[0]["params"]) == 1  # only the matrix decays
    sched = WarmupCosineLR(opt, 1e-3, num_epochs=100, warmup_epochs=4)
    lrs = [sched.lr_at(e) for e in range(100)]
    assert lrs[0] == pytest.approx(1e-3 / 5) and lrs[4] == pytest.approx(1e-3)  # linear warm-up
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 0.05e-3  # then monotone decay
    sched.num_epochs = 200  # a budget re-plans the epochs: the same epoch now sits earlier in the decay
    assert sched.lr_at(50) > lrs[50]
    sched.step(10)
    assert all(g["lr"] == pytest.approx(sched.lr_at(10)) for g in opt.param_groups)


def test_rater_bookkeeping():
    assert raters.rater_info({"labels": {}}) is None
    assert raters.rater_info({"arseg": {"num_raters": 0}}) is None
    assert raters.rater_info({"arseg": {"num_raters": 4}}) == {"num_raters": 4}
    assert raters.raters_folder_of("/x/DatasetA/nnUNetPlans_2d/") == "/x/DatasetA/nnUNetPlans_2d_raters"
    assert raters.rater_dataset_class(nnUNetDatasetBlosc2) is raters.nnUNetDatasetBlosc2Raters
    assert raters.rater_dataset_class(nnUNetDatasetNumpy) is raters.nnUNetDatasetNumpyRaters
    assert raters.rater_dataset_class(raters.nnUNetDatasetBlosc2Raters) is raters.nnUNetDatasetBlosc2Raters
    with pytest.raises(TypeError, match="no rater-drawing dataset"):
        raters.rater_dataset_class(dict)


def test_drawing_share_of_real_raters_per_label_and_per_region(lidc_demo):
    """``rater_drawing_shares``: the share of a case's raters who drew a class, on the bundled LIDC raters."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    from PIL import Image

    from nnunet_arseg.training.validation import rater_drawing_shares
    nodule = sorted(lidc_demo.glob("LIDC-IDRI-*/nodule-*"))[0]
    one_label = LabelManager({"background": 0, "nodule": 1}, None)
    four_labels = LabelManager({"background": 0, **{f"rater{k}": k for k in range(1, 5)}}, None)
    regions = LabelManager({"background": 0, "any": [1, 2, 3, 4], "none": [5]}, regions_class_order=[1, 5])
    shares = []
    for image in sorted(nodule.glob("images/slice-*.png")):
        raters_RX = np.stack([np.asarray(Image.open(nodule / f"mask-{r}" / image.name)) > 0
                              for r in range(4)]).astype(np.int8)[:, None]
        drawn = raters_RX.reshape(4, -1).any(1).mean()
        np.testing.assert_allclose(rater_drawing_shares(raters_RX, one_label), [drawn])
        shares.append(drawn)
        # as the labels of a region dataset: rater k draws label k + 1 where it drew; a region holds labels
        labelled = raters_RX * np.arange(1, 5, dtype=np.int8).reshape(4, 1, 1, 1)
        np.testing.assert_allclose(rater_drawing_shares(labelled, four_labels), raters_RX.reshape(4, -1).any(1) / 4)
        np.testing.assert_allclose(rater_drawing_shares(labelled, regions), [drawn, 0.0])
    assert len(set(shares)) > 1  # slices where different numbers of raters drew


def test_atomic_writes_reach_the_disk_before_the_rename_and_a_killed_writers_leftovers_go(tmp_path, monkeypatch):
    """A host that crashes after the rename finds the new file whole (flushed before it, the folder after it); what
    a killed process left half written is removed by name, nothing else."""
    from nnunet_arseg.atomic import remove_temporaries, write_atomic
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("replace", str(src))), replace(src, dst))[1])
    write_atomic(tmp_path / "checkpoint_latest.pth", lambda t: torch.save({"epoch": 3}, t))
    monkeypatch.undo()
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"], events
    assert events[0][1] == events[1][1] != str(tmp_path) and events[2][1] == str(tmp_path)
    stray = [".tmp-0a1b2c3d-checkpoint_latest.pth", ".tmp-00ff00ff-checkpoint_030min.pth"]
    kept = [".tmp-0a1b2c3d-progress.png", ".tmp-notes-checkpoint_latest.pth", "checkpoint_best.pth", "sub"]
    for name in stray + kept[:-1]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / stray[0]).write_bytes(b"x")
    assert sorted(remove_temporaries(tmp_path, ("checkpoint_*.pth",))) == sorted(stray)
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["checkpoint_latest.pth"]) and os.listdir(tmp_path / "sub")
