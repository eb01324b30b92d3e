"""One-hook variants of ``nnUNetTrainerARSeg`` (nnU-Net style: training length, model size, TTA).

Mirroring TTA is off in ``nnUNetTrainerARSeg`` (every flip costs N more samples and averages log-frequencies);
``nnUNetTrainerARSeg_mirroring`` turns it back on for ``nnUNetv2_predict`` and the final validation.
"""
from __future__ import annotations

import torch

from nnunet_arseg.training.trainer import nnUNetTrainerARSeg


def _length_variant(epochs: int) -> type:
    """``nnUNetTrainerARSeg_<epochs>epochs``: the same 1:3 tokenizer:segmentor split over fewer epochs."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        nnUNetTrainerARSeg.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = epochs
        self.num_tokenizer_epochs = max(1, epochs // 4)

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


class nnUNetTrainerARSeg_tiny(nnUNetTrainerARSeg):
    """Smoke-test size: tiny tokenizer/transformer/encoder, 2 + 2 epochs of 5 iterations, batch <= 4, 4 samples.

    Trains in about a minute on 2 CPU cores; a checkpoint after every epoch (so an interrupted run resumes).
    """

    arseg_arch_overrides = {"preset": "tiny", "num_samples": 4, "embedding": "linear", "max_features_per_stage": 32,
                            "tokenizer": {"ch": 8}}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 4
        self.num_tokenizer_epochs = 2
        self.num_iterations_per_epoch = 5
        self.num_val_iterations_per_epoch = 1
        self.batch_size_cap = 4
        self.save_every = 1
        self.num_validation_samples = 4
        self.tokenizer_lr = 1e-3
        self.segmentor_lr = 3e-4


class nnUNetTrainerARSeg_small(nnUNetTrainerARSeg):
    """CPU-sized AR-Seg for budgets of minutes: the ``tiny`` preset (codebook 256; transformer width 64, depth 2; SVD
    embedding) with tokenizer base width 8, the plans' encoder capped at 64 features, batch <= 8, LRs raised for short
    training. Measured: 0.6 s per tokenizer and 1.1 s per segmentor iteration (batch 6, 128x128, one busy CPU
    thread)."""

    arseg_arch_overrides = {"preset": "tiny", "max_features_per_stage": 64, "tokenizer": {"ch": 8}}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.batch_size_cap = 8
        self.tokenizer_lr = 1e-3
        self.segmentor_lr = 3e-4


class nnUNetTrainerARSeg_tiny_demo(nnUNetTrainerARSeg_tiny):
    """The tiny model trained long enough to draw real masks (``nnUNetv2_arseg_demo``): about 5 minutes on 2 idle
    CPU cores.

    ``nnUNetTrainerARSeg_tiny``'s 2 + 2 epochs of 5 iterations prove that everything runs, but the tokenizer alone
    needs some hundred steps before its masks are more than noise; this variant takes 20 + 20 epochs of 30.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 40
        self.num_tokenizer_epochs = 20
        self.num_iterations_per_epoch = 30
        self.num_val_iterations_per_epoch = 2
        self.save_every = 5
        self.tokenizer_lr = 3e-3
