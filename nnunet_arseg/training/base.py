"""What every sampling trainer of this package shares (``nnUNetTrainerARSeg``, ``nnUNetTrainerProbUNet``): one drawn
rater per training example, folds grouped by patient, ranks seeded apart, nnU-Net's mixed precision with steps that
are applied only when their gradients are finite, a batch-size cap for small machines, no mirroring at inference, and
a pseudo Dice that stays finite."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from batchgenerators.utilities.file_and_folder_operations import isfile, join
from nnunetv2.paths import nnUNet_raw
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs

from nnunet_arseg import env
from nnunet_arseg.atomic import remove_temporaries, save_json_atomic
from nnunet_arseg.network import unwrap_network
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
    # this many steps in a row with non-finite gradients stop training (the fp16 loss scaler skips a few at its start)
    max_nonfinite_steps: int = 20

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
        self._nonfinite_in_a_row, self._nonfinite_this_epoch = 0, 0

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
        if self.local_rank == 0:  # the one process that writes this fold's checkpoints
            stray = remove_temporaries(self.output_folder, ("checkpoint_*.pth",))
            if stray:
                self.print_to_log_file(f"Removed {len(stray)} unfinished checkpoint(s) of an interrupted run: "
                                       f"{', '.join(stray)}")

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
        ``grad_clip_norm`` (unscaled first, as nnU-Net does). A step whose gradients are not finite is never applied,
        in any precision (under DDP the reduced gradients, so every rank decides alike); ``max_nonfinite_steps`` of
        them in a row stop training before anything non-finite is saved."""
        params = [p for p in self.network.parameters() if p.requires_grad]
        if self.grad_scaler is None:
            loss.backward()
        else:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, math.inf if self.grad_clip_norm is None else self.grad_clip_norm)
        finite = bool(torch.isfinite(norm))
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)  # skips the step itself when the gradients are not finite
            self.grad_scaler.update()
        elif finite:
            self.optimizer.step()
        self._nonfinite_in_a_row = 0 if finite else self._nonfinite_in_a_row + 1
        self._nonfinite_this_epoch += not finite
        if self._nonfinite_in_a_row >= self.max_nonfinite_steps:
            precision = {None: "fp32", torch.bfloat16: "bf16 autocast",
                         torch.float16: "fp16 autocast with loss scaling"}[self.autocast_dtype]
            raise FloatingPointError(
                f"AR-Seg: {self._nonfinite_in_a_row} training steps in a row had non-finite gradients (NaN or inf, "
                f"{precision}) and were not applied; training stopped at epoch {self.current_epoch}. The fold's "
                f"checkpoints hold the weights of the last finished epoch. Look for NaN or inf in the preprocessed "
                f"data, or lower the learning rate (initial_lr {self.initial_lr}), then continue with --c")

    def on_train_epoch_start(self):
        self._nonfinite_this_epoch = 0
        super().on_train_epoch_start()

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        if self._nonfinite_this_epoch:
            self.print_to_log_file(f"{self._nonfinite_this_epoch} of {len(train_outputs)} training steps skipped: "
                                   f"their gradients were not finite")

    def refuse_nonfinite_weights(self, filename: str) -> None:
        """Raise instead of writing ``filename`` from weights that are not all finite (the file keeps the last good
        ones)."""
        bad = [k for k, v in unwrap_network(self.network).state_dict().items()
               if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise FloatingPointError(f"AR-Seg: not writing {filename}: {len(bad)} weight tensors hold NaN or inf "
                                     f"(e.g. {bad[0]}); the file on disk keeps the last good weights")

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
