"""The one module nnU-Net imports from ``nnUNet_extTrainer``: it re-exports the trainers from the installed package
(so they pickle by their real module path). Shell set-up: ``export nnUNet_extTrainer=$(nnUNetv2_arseg_ext_dir)``.
"""
from nnunet_arseg.training import (nnUNetTrainerARSeg, nnUNetTrainerARSeg_5epochs,  # noqa: F401
                                   nnUNetTrainerARSeg_10epochs, nnUNetTrainerARSeg_50epochs,
                                   nnUNetTrainerARSeg_100epochs, nnUNetTrainerARSeg_250epochs,
                                   nnUNetTrainerARSeg_budget, nnUNetTrainerARSeg_frozenEncoder,
                                   nnUNetTrainerARSeg_mirroring, nnUNetTrainerARSeg_small,
                                   nnUNetTrainerARSeg_small_budget, nnUNetTrainerARSeg_tiny,
                                   nnUNetTrainerARSeg_tiny_demo, nnUNetTrainerARSeg_upgrade,
                                   nnUNetTrainerARSeg_upgrade_budget, nnUNetTrainerARSeg_upgrade_tiny,
                                   nnUNetTrainerBudget, nnUNetTrainerProbUNet, nnUNetTrainerProbUNet_budget,
                                   nnUNetTrainerProbUNet_tiny)
