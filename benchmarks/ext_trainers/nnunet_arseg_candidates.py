"""AR-Seg variants measured by ``benchmarks/lidc_experiment.py`` beside the recipe (``--candidates``): candidates
before any becomes part of it, and the recipe they replaced, kept so that its rows can be rerun; nnU-Net finds them
through ``nnUNet_extTrainer`` (the experiment adds this folder)."""
from __future__ import annotations

import torch

from nnunet_arseg.training import raters
from nnunet_arseg.training.budget import nnUNetTrainerARSeg_small_budget
from nnunet_arseg.training.validation import rater_drawing_shares


class nnUNetTrainerARSeg_small_budget_latentHead(nnUNetTrainerARSeg_small_budget):
    """The recipe before the full-resolution head (0.2): the U-Net head stops at the tokenizer's latent resolution, so
    the model samples with the transformer's own draws by default."""

    arseg_arch_overrides = {"preset": "small", "aux_full_resolution": False}


class nnUNetTrainerARSeg_small_budget_wideUNet(nnUNetTrainerARSeg_small_budget):
    """The recipe on the plans' U-Net at its own widths (the ``small`` preset caps them at 64 features per stage):
    whether the head's shapes reach the stock model's (D_max) at the epochs the budget leaves."""

    arseg_arch_overrides = {"preset": "small", "max_features_per_stage": None}


class nnUNetTrainerARSeg_small_budget_presence4(nnUNetTrainerARSeg_small_budget):
    """The recipe with the presence BCE weighted 4x: whether a larger share of the gradient makes the presence head
    tell apart the images most raters mark from those few do (what the D_max gap to nnU-Net comes from)."""

    arseg_arch_overrides = {"preset": "small", "presence_weight": 4.0}


class nnUNetTrainerARSeg_small_budget_presenceHead(nnUNetTrainerARSeg_small_budget):
    """The recipe with the presence head pooling the full-resolution U-Net features its head reads (detached) instead
    of the prefix: linear probes fitted on the training patients' features told the validation patients' presence
    apart better from those features than from the prefix (correlation with the raters' share 0.50 against 0.39).
    Trained end to end it did worse than the recipe with both training seeds (``docs/developer-notes.md``)."""

    arseg_arch_overrides = {"preset": "small", "presence_source": "head"}


class nnUNetTrainerARSeg_small_budget_raterShare(nnUNetTrainerARSeg_small_budget):
    """The recipe with the presence head learning the share of the case's raters who drew the class (a soft target)
    instead of whether the one drawn rater did: the same expected gradient with less noise, for the presence
    discrimination the D_max and GED gaps come from. The share is the whole case's; a patch that crops the object
    out is rare for crops centred on it. With both training seeds it told presence apart no better, and its gains
    (HM-IoU, D_max) were smaller than the spread between seeds (``docs/developer-notes.md``)."""

    use_raters = True

    def presence_targets(self, batch: dict, cls_B: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "_rater_shares"):
            self._rater_shares = {}
        for key in batch["keys"]:
            if key not in self._rater_shares:
                self._rater_shares[key] = rater_drawing_shares(
                    raters.load_raters(self.preprocessed_dataset_folder, key), self.label_manager)
        share_B = [self._rater_shares[k][c] for k, c in zip(batch["keys"], cls_B.tolist())]
        return torch.tensor(share_B, dtype=torch.float32, device=cls_B.device)


class nnUNetTrainerARSeg_small_budget_headGuide(nnUNetTrainerARSeg_small_budget):
    """The recipe with each scale's token inputs guided by the U-Net head at that scale's resolution
    (``head_guidance``, ``segmentor/guidance.py``): the transformer's own draws with the dense evidence the head
    sampler thresholds."""

    arseg_arch_overrides = {"preset": "small", "head_guidance": True}
