"""Trainers only the tests use, found by nnU-Net through ``nnUNet_extTrainer`` like any lab's own variant."""
from __future__ import annotations

import torch

from nnunet_arseg.training import nnUNetTrainerARSeg_tiny


class nnUNetTrainerARSeg_tinyOneEpoch(nnUNetTrainerARSeg_tiny):
    """``nnUNetTrainerARSeg_tiny`` for one epoch: folds that only need to start, share the tokenizer and finish."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
