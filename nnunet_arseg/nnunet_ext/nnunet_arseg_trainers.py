"""The one module nnU-Net imports from ``nnUNet_extTrainer``: it re-exports the AR-Seg trainers from the installed
package (so they pickle by their real module path). Shell set-up: ``export nnUNet_extTrainer=$(nnUNetv2_arseg_ext_dir)``.
"""
from nnunet_arseg.training import *  # noqa: F401,F403
from nnunet_arseg.training import __all__  # noqa: F401
from nnunet_arseg.training.budget import (nnUNetTrainerARSeg_budget, nnUNetTrainerARSeg_small_budget,  # noqa: F401
                                          nnUNetTrainerBudget)
from nnunet_arseg.training.variants import nnUNetTrainerARSeg_small  # noqa: F401
