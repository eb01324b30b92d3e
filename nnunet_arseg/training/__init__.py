"""nnU-Net trainers of AR-Seg (``nnUNetTrainerARSeg`` and its variants) and of the Probabilistic U-Net baseline
(``nnUNetTrainerProbUNet``), rater loading and grouped folds."""
from __future__ import annotations

from nnunet_arseg.training.budget import (nnUNetTrainerARSeg_budget, nnUNetTrainerARSeg_small_budget,
                                         nnUNetTrainerARSeg_upgrade_budget, nnUNetTrainerBudget)
from nnunet_arseg.training.probunet import (nnUNetTrainerProbUNet, nnUNetTrainerProbUNet_budget,
                                            nnUNetTrainerProbUNet_tiny)
from nnunet_arseg.training.trainer import nnUNetTrainerARSeg
from nnunet_arseg.training.variants import (nnUNetTrainerARSeg_5epochs, nnUNetTrainerARSeg_10epochs,
                                            nnUNetTrainerARSeg_50epochs, nnUNetTrainerARSeg_100epochs,
                                            nnUNetTrainerARSeg_250epochs, nnUNetTrainerARSeg_frozenEncoder,
                                            nnUNetTrainerARSeg_mirroring, nnUNetTrainerARSeg_small,
                                            nnUNetTrainerARSeg_tiny, nnUNetTrainerARSeg_tiny_demo,
                                            nnUNetTrainerARSeg_upgrade, nnUNetTrainerARSeg_upgrade_tiny)

__all__ = ["nnUNetTrainerARSeg", "nnUNetTrainerARSeg_5epochs", "nnUNetTrainerARSeg_10epochs",
           "nnUNetTrainerARSeg_50epochs", "nnUNetTrainerARSeg_100epochs", "nnUNetTrainerARSeg_250epochs",
           "nnUNetTrainerARSeg_frozenEncoder", "nnUNetTrainerARSeg_mirroring", "nnUNetTrainerARSeg_small",
           "nnUNetTrainerARSeg_tiny", "nnUNetTrainerARSeg_tiny_demo", "nnUNetTrainerARSeg_budget",
           "nnUNetTrainerARSeg_small_budget", "nnUNetTrainerARSeg_upgrade", "nnUNetTrainerARSeg_upgrade_budget",
           "nnUNetTrainerARSeg_upgrade_tiny", "nnUNetTrainerBudget", "nnUNetTrainerProbUNet",
           "nnUNetTrainerProbUNet_budget", "nnUNetTrainerProbUNet_tiny"]
