"""``nnUNetTrainerProbUNet``: the Probabilistic U-Net baseline (``nnunet_arseg.baselines.probunet``) trained by
``nnUNetv2_train D CONFIG FOLD -tr nnUNetTrainerProbUNet`` on the same data as AR-Seg (one drawn rater per example,
folds grouped by patient) and sampled by the same commands (``nnUNetv2_arseg_predict --num_samples N``,
``nnUNetv2_predict`` for the consensus). Needs no tokenizer.
"""
from __future__ import annotations

from copy import deepcopy

import numpy as np
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunet_arseg.atomic import write_atomic
from nnunet_arseg.baselines.probunet import PROBUNET_CLASS_NAME, build_probunet_architecture
from nnunet_arseg.network import unwrap_network
from nnunet_arseg.training.base import MultiRaterTrainerBase
from nnunet_arseg.training.budget import WallTimeBudgetMixin
from nnunet_arseg.training.plans import rewrite_plans_architecture
from nnunet_arseg.training.validation import final_validation


def probunet_architecture(stock_architecture: dict, overrides: dict, label_manager=None) -> dict:
    """The Probabilistic U-Net's ``architecture`` block for a configuration (kept as is when it already is one);
    ``label_manager`` (of dataset.json) sets ``has_regions``."""
    if stock_architecture.get("network_class_name") == PROBUNET_CLASS_NAME:
        return deepcopy(stock_architecture)
    kwargs = dict(overrides)
    if label_manager is not None:
        kwargs["has_regions"] = bool(label_manager.has_regions)
    return build_probunet_architecture(deepcopy(stock_architecture), **kwargs)


class nnUNetTrainerProbUNet(MultiRaterTrainerBase):
    """The Probabilistic U-Net (the paper's latent size 6, three 1x1 fcomb convolutions, beta 1; Adam at 1e-4, weight
    decay 1e-5) over the plans' U-Net. Variants override the class attributes below and of
    ``MultiRaterTrainerBase``."""

    probunet_arch_overrides: dict = {}  # passed to ``build_probunet_architecture`` (widths cap, latent_dim, beta, N)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        plans = rewrite_plans_architecture(plans, configuration, dataset_json, lambda cfg, lm: probunet_architecture(
            cfg.configuration["architecture"], self.probunet_arch_overrides, lm))
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.label_manager.has_ignore_label:
            raise ValueError(f"{self.__class__.__name__}: dataset.json of {self.plans_manager.dataset_name} has an "
                             f"ignore label, which the Probabilistic U-Net baseline does not support; train "
                             f"nnUNetTrainerARSeg or the stock nnUNetTrainer")
        self.initial_lr = 1e-4
        self.weight_decay = 1e-5

    # ---------------------------------------------------------------- network
    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> torch.nn.Module:
        """ProbUNetNetwork from the plans (plans that still name the stock U-Net are rewritten on the fly, labels
        assumed)."""
        arch = probunet_architecture(configuration_manager.configuration["architecture"],
                                     cls.probunet_arch_overrides)
        return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"],
                                      arch.get("_kw_requires_import", []), num_input_channels, num_output_channels,
                                      allow_init=True, deep_supervision=None)

    def configure_optimizers(self):
        """Adam (the paper's) with nnU-Net's poly schedule over ``num_epochs``."""
        optimizer = torch.optim.Adam(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    # ---------------------------------------------------------------- steps
    def _masks(self, target: torch.Tensor) -> torch.Tensor:
        """One binary mask per foreground label or region (B, K, *spatial) of nnU-Net's target."""
        lm = self.label_manager
        if lm.has_regions:
            return target[:, :len(lm.foreground_regions)].float()
        return torch.cat([target[:, :1] == label for label in lm.foreground_labels], dim=1).float()

    def train_step(self, batch: dict) -> dict:
        data = batch['data'].to(self.device, non_blocking=True)
        mask = self._masks(batch['target'].to(self.device, non_blocking=True))
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.network(data, mask=mask)["loss"]
        self._backward_and_step(loss)
        return {'loss': loss.detach().float().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        """The ELBO loss and tp/fp/fn of the prediction at the prior's mean z against the drawn rater's masks (every
        class scored in every example)."""
        data = batch['data'].to(self.device, non_blocking=True)
        mask = self._masks(batch['target'].to(self.device, non_blocking=True))
        with torch.no_grad(), self._autocast():
            out = self.network(data, mask=mask, with_prediction=True)
        pred, ref = unwrap_network(self.network).masks_from_logits(out["prediction"].float()), mask > 0.5
        axes = (0, *range(2, pred.ndim))
        tp, fp, fn = ((a & b).sum(axes).cpu().numpy() for a, b in ((pred, ref), (pred, ~ref), (~pred, ref)))
        return {'loss': out["loss"].detach().float().cpu().numpy(), 'tp_hard': tp, 'fp_hard': fp, 'fn_hard': fn,
                'drawn': np.full(len(tp), len(data))}

    # ---------------------------------------------------------------- checkpoints and final validation
    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written atomically."""
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)
        self.refuse_nonfinite_weights(filename)
        write_atomic(filename, lambda tmp: super(nnUNetTrainerProbUNet, self).save_checkpoint(tmp))

    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's final validation with each case sampled once; with raters also ``summary_arseg.json``."""
        final_validation(self, self.num_validation_samples, self._rater_info is not None, save_probabilities)


class nnUNetTrainerProbUNet_tiny(nnUNetTrainerProbUNet):
    """Smoke-test size: the plans' U-Net (and the prior/posterior encoders) capped at 16 features per stage, 3 epochs
    of 5 iterations, batch <= 4, 4 samples; a checkpoint after every epoch."""

    probunet_arch_overrides = {"max_features_per_stage": 16, "num_samples": 4}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.use_smoke_test_length()


class nnUNetTrainerProbUNet_budget(WallTimeBudgetMixin, nnUNetTrainerProbUNet):
    """CPU-sized, under ``nnUNet_ARSEG_BUDGET_MINUTES`` (as ``nnUNetTrainerARSeg_small_budget``): U-Net and the
    prior/posterior encoders capped at 64 features per stage, batch <= 8, Adam at 1e-3 (a few thousand steps)."""

    probunet_arch_overrides = {"max_features_per_stage": 64}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.batch_size_cap = 8
        self.initial_lr = 1e-3

    def stretch_schedule(self) -> None:
        self.lr_scheduler.max_steps = max(1, self.num_epochs)
