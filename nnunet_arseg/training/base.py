"""What every sampling trainer of this package shares (``nnUNetTrainerARSeg``, ``nnUNetTrainerProbUNet``): one drawn
rater per training example, folds grouped by patient, ranks seeded apart, nnU-Net's mixed precision, a batch-size
cap for small machines, no mirroring at inference, and a pseudo Dice that stays finite."""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from batchgenerators.utilities.file_and_folder_operations import isfile, join
from nnunetv2.paths import nnUNet_raw
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs

from nnunet_arseg import env
from nnunet_arseg.atomic import save_json_atomic
from nnunet_arseg.training import ddp, precision, raters, splits


class MultiRaterTrainerBase(nnUNetTrainer):
    """nnU-Net's trainer for models that learn from several raters and are sampled at inference. Subclasses build the
    network and its steps; their ``validation_step`` returns per-class ``tp_hard``/``fp_hard``/``fn_hard`` and
    ``drawn`` (how many examples of each class the batch scored)."""

    allow_mirroring_tta: bool = False  # True: nnU-Net's mirroring TTA at inference (each flip costs N more samples)
    use_raters: bool | None = None  # None: raters when dataset.json declares them; True: require them
    # seeds the weights, the batches and the augmentation (the same run twice gives the same model where nnU-Net's
    # augmentation runs in the training process, nnUNet_n_proc_DA=0); None: unseeded, as the stock nnUNetTrainer;
    # nnUNet_ARSEG_TRAINING_SEED overrides it
    training_seed: int | None = 0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.batch_size_cap = None  # int: at most this many examples per step (small-machine variants)
        self.num_validation_samples = 8  # samples per case of the final validation (summary_arseg.json)
        self.grad_clip_norm = None  # float: clip the gradients' norm to this
        self.enable_deep_supervision = False
        # nnU-Net's mixed precision (precision.py): none on CPU; on CUDA bf16, or fp16 with a GradScaler
        self.autocast_dtype = precision.autocast_dtype(self.device)
        self.grad_scaler = precision.grad_scaler(self.autocast_dtype, self.device)
        self._rater_info = raters.rater_info(dataset_json)
        if self.use_raters and self._rater_info is None:
            raise ValueError(f"{self.__class__.__name__} needs a multi-rater dataset, but dataset.json of "
                             f"{self.plans_manager.dataset_name} has no 'arseg': {{'num_raters': R, ...}} block; "
                             f"convert the data with nnUNetv2_arseg_convert_lidc or nnUNetv2_arseg_convert_folders")
        if self.use_raters is False:
            self._rater_info = None

    def use_smoke_test_length(self) -> None:
        """The length of the ``_tiny`` variants: 3 epochs of 5 iterations (1 for validation), batch <= 4, learning
        rate 1e-3, 4 validation samples, a checkpoint after every epoch (so a killed run resumes)."""
        self.num_epochs = 3
        self.num_iterations_per_epoch = 5
        self.num_val_iterations_per_epoch = 1
        self.batch_size_cap = 4
        self.save_every = 1
        self.num_validation_samples = 4
        self.initial_lr = 1e-3

    # ---------------------------------------------------------------- nnU-Net's knobs these models do not use
    def set_deep_supervision_enabled(self, enabled: bool):
        pass

    def _do_i_compile(self):
        return False

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        out = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not self.allow_mirroring_tta:
            self.inference_allowed_mirroring_axes = None  # as nnUNetTrainerNoMirroring, but flips stay in the DA
        return out

    def _set_batch_size_and_oversample(self):
        super()._set_batch_size_and_oversample()
        if self.batch_size_cap is not None:
            self.batch_size = min(self.batch_size, self.batch_size_cap)

    # ---------------------------------------------------------------- data: one rater per example, grouped folds
    def _seed(self, offset: int = 0) -> None:
        seed = env.training_seed(self.training_seed)
        if seed is not None:
            ddp.seed_everything(seed + offset, self.local_rank)  # DDP ranks draw their own batches

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
        """nnU-Net's split, whose file is grouped by patient where dataset.json says whose each case is; under DDP rank
        0 writes the file before the other ranks read it."""
        patient_of_case = (self._rater_info or self.dataset_json.get("arseg", {})).get("patient_of_case")
        splits_file = join(self.preprocessed_dataset_folder_base, "splits_final.json")
        stock_split = super().do_split

        def split():
            if self.fold != "all" and patient_of_case and not isfile(splits_file):
                keys = infer_dataset_class(self.preprocessed_dataset_folder).get_identifiers(
                    self.preprocessed_dataset_folder)
                self.print_to_log_file("Creating a 5-fold split grouped by patient (dataset.json['arseg'])")
                save_json_atomic(splits.patient_grouped_splits(keys, patient_of_case), splits_file)
            return stock_split()

        return ddp.rank0_first(split)

    # ---------------------------------------------------------------- steps
    def _autocast(self):
        return precision.autocast(self.device, self.autocast_dtype)

    def _backward_and_step(self, loss: torch.Tensor) -> None:
        """Backward and optimizer step, loss-scaled where ``grad_scaler`` is set, gradients clipped to
        ``grad_clip_norm`` (unscaled first, as nnU-Net does; the scaler skips steps with inf/NaN gradients)."""
        params = [p for p in self.network.parameters() if p.requires_grad]
        if self.grad_scaler is None:
            loss.backward()
        else:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
        if self.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip_norm)
        if self.grad_scaler is None:
            self.optimizer.step()
        else:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()

    def on_validation_epoch_end(self, val_outputs: list[dict]):
        """nnU-Net's pseudo Dice of the epoch, except that a class drawn only with empty masks and predicted empty
        scores 1 (as nnU-Net's smoothed Dice) instead of NaN, which would make the EMA, and so checkpoint_best, NaN
        for good. A class never drawn stays NaN, left out of the mean."""
        outputs = collate_outputs(val_outputs)
        sums = [outputs[k].sum(0) for k in ('tp_hard', 'fp_hard', 'fn_hard', 'drawn')]
        losses = np.asarray(outputs['loss'], dtype=float).ravel()
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (sums, losses))
            sums = [sum(g[0][i] for g in gathered) for i in range(4)]
            losses = np.concatenate([g[1] for g in gathered])
        tp, fp, fn, drawn = sums
        scored = tp + fp + fn > 0
        dice = np.where(scored, 2 * tp / np.where(scored, 2 * tp + fp + fn, 1), 1.0)
        dice = np.where(drawn > 0, dice, np.nan)
        self.logger.log('mean_fg_dice', float(np.nanmean(dice)), self.current_epoch)
        self.logger.log('dice_per_class_or_region', dice.tolist(), self.current_epoch)
        self.logger.log('val_losses', float(losses.mean()), self.current_epoch)
