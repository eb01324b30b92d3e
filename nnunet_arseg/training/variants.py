"""One-hook variants of ``nnUNetTrainerARSeg`` (nnU-Net style: training length, model size, TTA, frozen encoder).

Mirroring TTA is off in ``nnUNetTrainerARSeg`` (every flip costs N more samples and averages log-frequencies);
``nnUNetTrainerARSeg_mirroring`` turns it back on for ``nnUNetv2_predict`` and the final validation.
"""
from __future__ import annotations

import torch

from nnunet_arseg.tokenizer.fit import TokenizerFitConfig
from nnunet_arseg.training.trainer import nnUNetTrainerARSeg


def _length_variant(epochs: int) -> type:
    """``nnUNetTrainerARSeg_<epochs>epochs``."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        nnUNetTrainerARSeg.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = epochs

    return type(f"nnUNetTrainerARSeg_{epochs}epochs", (nnUNetTrainerARSeg,), {"__init__": __init__,
                                                                               "__module__": __name__})


nnUNetTrainerARSeg_5epochs = _length_variant(5)
nnUNetTrainerARSeg_10epochs = _length_variant(10)
nnUNetTrainerARSeg_50epochs = _length_variant(50)
nnUNetTrainerARSeg_100epochs = _length_variant(100)
nnUNetTrainerARSeg_250epochs = _length_variant(250)


class nnUNetTrainerARSeg_mirroring(nnUNetTrainerARSeg):
    """Mirroring TTA at inference, as the stock nnUNetTrainer (N samples per flip)."""

    allow_mirroring_tta = True


class nnUNetTrainerARSeg_frozenEncoder(nnUNetTrainerARSeg):
    """The image encoder keeps its weights (train with ``-pretrained_weights`` of a stock nnU-Net model) and runs
    without a backward pass; the decoder, embedding and transformer train."""

    freeze_encoder = True


class nnUNetTrainerARSeg_small(nnUNetTrainerARSeg):
    """CPU-sized AR-Seg for budgets of minutes to hours: the ``small`` preset (tokenizer on a 4x space-to-depth
    input, transformer width 128, depth 3; prefix from the U-Net decoder at the latent resolution), the plans'
    encoder capped at 64 features per stage, batch <= 8."""

    arseg_arch_overrides = {"preset": "small"}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.batch_size_cap = 8
        self.initial_lr = 1e-3


class nnUNetTrainerARSeg_upgrade(nnUNetTrainerARSeg_small):
    """AR-Seg on top of a lab's trained nnU-Net: the ``small`` AR parts over the plans' own U-Net at its full width,
    whose encoder stays frozen. Train with ``-pretrained_weights`` of the stock ``nnUNetTrainer`` checkpoint of the
    same plans: its encoder and decoder initialise AR-Seg's (but the 1x1 segmentation layers, which nnU-Net never
    transfers), the rest starts from scratch."""

    arseg_arch_overrides = {**nnUNetTrainerARSeg_small.arseg_arch_overrides, "max_features_per_stage": None}
    freeze_encoder = True


class nnUNetTrainerARSeg_tiny(nnUNetTrainerARSeg):
    """Smoke-test size: tiny tokenizer/transformer/encoder, tokenizer 60 steps, 3 epochs of 5 iterations, batch
    <= 4, 4 samples. Trains in about a minute on 2 CPU cores; a checkpoint after every epoch (so it resumes)."""

    arseg_arch_overrides = {"preset": "tiny", "num_samples": 4}
    tokenizer_fit = TokenizerFitConfig(max_steps=60, batch_size=8, eval_every=20, warmup_steps=10)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.use_smoke_test_length()
        self.warmup_epochs = 0


class nnUNetTrainerARSeg_upgrade_tiny(nnUNetTrainerARSeg_tiny, nnUNetTrainerARSeg_upgrade):
    """Smoke-test size of ``nnUNetTrainerARSeg_upgrade``: the tiny AR parts over the plans' full-width U-Net."""

    arseg_arch_overrides = {**nnUNetTrainerARSeg_tiny.arseg_arch_overrides, "max_features_per_stage": None}


class nnUNetTrainerARSeg_tiny_demo(nnUNetTrainerARSeg_tiny):
    """The tiny model trained long enough to draw real masks (``nnUNetv2_arseg_demo``): a few minutes on 2 CPU cores."""

    tokenizer_fit = TokenizerFitConfig(max_steps=600, batch_size=16, eval_every=100)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 20
        self.warmup_epochs = 1
        self.num_iterations_per_epoch = 30
        self.num_val_iterations_per_epoch = 2
        self.save_every = 5
