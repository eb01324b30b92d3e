"""``nnUNetTrainerProbUNet``: the Probabilistic U-Net baseline (``nnunet_arseg.baselines.probunet``) trained by
``nnUNetv2_train D CONFIG FOLD -tr nnUNetTrainerProbUNet`` on the same data as AR-Seg (one drawn rater per example,
folds grouped by patient) and sampled by the same commands (``nnUNetv2_arseg_predict --num_samples N``,
``nnUNetv2_predict`` for the consensus). Needs no tokenizer.
"""
from __future__ import annotations

import random
from copy import deepcopy

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join
from nnunetv2.paths import nnUNet_raw
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunet_arseg.atomic import save_json_atomic, write_atomic
from nnunet_arseg.baselines.probunet import PROBUNET_CLASS_NAME, build_probunet_architecture
from nnunet_arseg.network import unwrap_network
from nnunet_arseg.training import precision, raters, splits
from nnunet_arseg.training.budget import WallTimeBudgetMixin
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


class nnUNetTrainerProbUNet(nnUNetTrainer):
    """The Probabilistic U-Net (the paper's latent size 6, three 1x1 fcomb convolutions, beta 1; Adam at 1e-4, weight
    decay 1e-5) over the plans' U-Net. Variants override the class attributes below."""

    probunet_arch_overrides: dict = {}  # passed to ``build_probunet_architecture`` (widths cap, latent_dim, beta, N)
    allow_mirroring_tta: bool = False  # True: nnU-Net's mirroring TTA at inference (N samples per flip)
    use_raters: bool | None = None  # None: raters when dataset.json declares them; True: require them
    training_seed: int | None = 0  # seeds the weights, batches and augmentation (as nnUNetTrainerARSeg)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        plans = deepcopy(plans)
        if configuration not in plans["configurations"]:
            raise KeyError(f"configuration {configuration!r} is not in the plans {plans.get('plans_name')} "
                           f"(available: {sorted(plans['configurations'])})")
        manager = PlansManager(plans)
        cfg = manager.get_configuration(configuration)
        plans["configurations"][configuration]["architecture"] = probunet_architecture(
            cfg.configuration["architecture"], self.probunet_arch_overrides, manager.get_label_manager(dataset_json))
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.label_manager.has_ignore_label:
            raise ValueError(f"{self.__class__.__name__}: dataset.json of {self.plans_manager.dataset_name} has an "
                             f"ignore label, which the Probabilistic U-Net baseline does not support; train "
                             f"nnUNetTrainerARSeg or the stock nnUNetTrainer")
        self.initial_lr = 1e-4
        self.weight_decay = 1e-5
        self.batch_size_cap = None  # int: at most this many examples per step (small-machine variants)
        self.num_validation_samples = 8  # samples per case for summary_arseg.json
        self.enable_deep_supervision = False
        # nnU-Net's mixed precision (precision.py): none on CPU; on CUDA bf16, or fp16 with a GradScaler
        self.autocast_dtype = precision.autocast_dtype(self.device)
        self.grad_scaler = precision.grad_scaler(self.autocast_dtype, self.device)
        self._rater_info = raters.rater_info(dataset_json)
        if self.use_raters and self._rater_info is None:
            raise ValueError(f"{self.__class__.__name__} needs a multi-rater dataset, but dataset.json of "
                             f"{self.plans_manager.dataset_name} has no 'arseg': {{'num_raters': R, ...}} block; "
                             f"convert the data with nnUNetv2_arseg_convert_lidc")
        if self.use_raters is False:
            self._rater_info = None

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

    def set_deep_supervision_enabled(self, enabled: bool):
        pass

    def _do_i_compile(self):
        return False

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        out = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not self.allow_mirroring_tta:
            self.inference_allowed_mirroring_axes = None  # every flip would cost N more samples
        return out

    def _set_batch_size_and_oversample(self):
        super()._set_batch_size_and_oversample()
        if self.batch_size_cap is not None:
            self.batch_size = min(self.batch_size, self.batch_size_cap)

    def configure_optimizers(self):
        """Adam (the paper's) with nnU-Net's poly schedule over ``num_epochs``."""
        optimizer = torch.optim.Adam(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    # ---------------------------------------------------------------- data: one rater per example, grouped folds
    def _seed(self, offset: int = 0) -> None:
        if self.training_seed is not None:
            random.seed(self.training_seed + offset)
            np.random.seed(self.training_seed + offset)
            torch.manual_seed(self.training_seed + offset)

    def initialize(self):
        self._seed()  # the weights
        super().initialize()
        if self._rater_info is not None:
            keys = self.dataset_class.get_identifiers(self.preprocessed_dataset_folder)
            raters.preprocess_raters(join(nnUNet_raw, self.plans_manager.dataset_name),
                                     self.preprocessed_dataset_folder, keys, self.plans_manager,
                                     self.configuration_manager, self.dataset_json, log=self.print_to_log_file)
            self.dataset_class = raters.rater_dataset_class(self.dataset_class)

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        self._seed(offset=self.current_epoch)  # batches and augmentation; a resumed run draws new ones
        super().on_train_start()

    def do_split(self):
        patient_of_case = (self._rater_info or self.dataset_json.get("arseg", {})).get("patient_of_case")
        splits_file = join(self.preprocessed_dataset_folder_base, "splits_final.json")
        if self.fold != "all" and patient_of_case and not isfile(splits_file) and self.local_rank == 0:
            keys = infer_dataset_class(self.preprocessed_dataset_folder).get_identifiers(
                self.preprocessed_dataset_folder)
            self.print_to_log_file("Creating a 5-fold split grouped by patient (dataset.json['arseg'])")
            save_json_atomic(splits.patient_grouped_splits(keys, patient_of_case), splits_file)
        return super().do_split()

    # ---------------------------------------------------------------- steps
    def _masks(self, target: torch.Tensor) -> torch.Tensor:
        """One binary mask per foreground label or region (B, K, *spatial) of nnU-Net's target."""
        lm = self.label_manager
        if lm.has_regions:
            return target[:, :len(lm.foreground_regions)].float()
        return torch.cat([target[:, :1] == label for label in lm.foreground_labels], dim=1).float()

    def _autocast(self):
        return precision.autocast(self.device, self.autocast_dtype)

    def train_step(self, batch: dict) -> dict:
        data = batch['data'].to(self.device, non_blocking=True)
        mask = self._masks(batch['target'].to(self.device, non_blocking=True))
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.network(data, mask=mask)["loss"]
        if self.grad_scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        return {'loss': loss.detach().float().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        """The ELBO loss and tp/fp/fn of the prediction at the prior's mean z against the drawn rater's masks."""
        data = batch['data'].to(self.device, non_blocking=True)
        mask = self._masks(batch['target'].to(self.device, non_blocking=True))
        with torch.no_grad(), self._autocast():
            out = self.network(data, mask=mask, with_prediction=True)
        pred, ref = unwrap_network(self.network).masks_from_logits(out["prediction"].float()), mask > 0.5
        axes = (0, *range(2, pred.ndim))
        tp, fp, fn = ((a & b).sum(axes).cpu().numpy() for a, b in ((pred, ref), (pred, ~ref), (~pred, ref)))
        return {'loss': out["loss"].detach().float().cpu().numpy(), 'tp_hard': tp, 'fp_hard': fp, 'fn_hard': fn}

    # ---------------------------------------------------------------- checkpoints and final validation
    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written atomically."""
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)
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
        self.num_epochs = 3
        self.num_iterations_per_epoch = 5
        self.num_val_iterations_per_epoch = 1
        self.batch_size_cap = 4
        self.save_every = 1
        self.num_validation_samples = 4
        self.initial_lr = 1e-3


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
