"""Candidate AR-Seg variants measured by ``benchmarks/lidc_experiment.py`` before any becomes part of the recipe;
nnU-Net finds them through ``nnUNet_extTrainer`` (the experiment adds this folder)."""
from __future__ import annotations

from nnunet_arseg.training.budget import nnUNetTrainerARSeg_small_budget


class nnUNetTrainerARSeg_small_budget_fullHead(nnUNetTrainerARSeg_small_budget):
    """The ``small`` preset under the budget, its U-Net head run to full resolution beside the decoder prefix
    (``aux_full_resolution``): a full-resolution mask of its own for ``--anchor_head``."""

    arseg_arch_overrides = {"preset": "small", "aux_full_resolution": True}


class nnUNetTrainerARSeg_small_budget_fullHead_wideUNet(nnUNetTrainerARSeg_small_budget_fullHead):
    """The full-resolution-head candidate on the plans' U-Net at its own widths (the ``small`` preset caps them at 64
    features per stage): whether the head's shapes reach the stock model's (D_max) at the epochs the budget leaves."""

    arseg_arch_overrides = {"preset": "small", "aux_full_resolution": True, "max_features_per_stage": None}
