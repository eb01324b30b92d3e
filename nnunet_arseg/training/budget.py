"""Wall-time budgets for training: stop after ``nnUNet_ARSEG_BUDGET_MINUTES`` minutes (one-hook variants).

    nnUNet_ARSEG_BUDGET_MINUTES=20 nnUNetv2_train D 2d all -tr nnUNetTrainerBudget          # stock U-Net
    nnUNet_ARSEG_BUDGET_MINUTES=20 nnUNetv2_train D 2d all -tr nnUNetTrainerARSeg_budget    # AR-Seg

Epochs are short (20 training + 4 validation iterations) so the budget is met to within one epoch. The budget
counts the wall time of the epochs (training, validation, checkpointing, plotting), not start-up or the final
validation; for AR-Seg it also counts the time its tokenizer took to train (from the tokenizer's ``summary.json``),
so both trainers get the same total. Every decision is a pure function of the epoch timestamps nnU-Net's logger
stores in each checkpoint, so ``--c`` re-derives the same numbers and continues with the time that is left: at every
epoch, ``num_epochs`` = the epochs done + those the time left allows at the mean epoch time so far, and the LR
schedule is stretched over them. Under DDP (``-num_gpus``) rank 0 decides and the other ranks follow it.

With ``nnUNet_ARSEG_SNAPSHOT_MINUTES=M`` the trainer also keeps ``checkpoint_<m>min.pth`` when the budget time spent
passes each multiple m of M minutes (for learning curves). Training also stops as soon as the budget is spent,
whichever comes first. With fold ``all`` nnU-Net would validate on
the training cases; these variants skip that final validation (predict a test set instead).
"""
from __future__ import annotations

import math
import os
import shutil
from time import time

from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_arseg import env
from nnunet_arseg.atomic import save_json_atomic, write_atomic
from nnunet_arseg.training import ddp
from nnunet_arseg.training.trainer import nnUNetTrainerARSeg
from nnunet_arseg.training.variants import nnUNetTrainerARSeg_small, nnUNetTrainerARSeg_upgrade

UNDECIDED_EPOCHS = 10 ** 6  # loop bound until the first epoch has been timed
MAX_BOOKKEEPING_S = 60.0  # a longer pause between two epochs is a restart (--c), not bookkeeping: not counted


def epoch_wall_seconds(starts: list[float], ends: list[float], epoch: int, now: float,
                       max_bookkeeping: float = MAX_BOOKKEEPING_S) -> float:
    """Wall time of a finished epoch: from its start to the next epoch's start (``now`` if none was logged),
    counting at most ``max_bookkeeping`` seconds after its logged end (a longer gap is a restart)."""
    next_start = starts[epoch + 1] if epoch + 1 < len(starts) else now
    return max(0.0, min(next_start - starts[epoch], ends[epoch] - starts[epoch] + max_bookkeeping))


def spent_seconds(starts: list[float], ends: list[float], num_epochs: int, now: float) -> float:
    """Wall time of the first ``num_epochs`` finished epochs."""
    return sum(epoch_wall_seconds(starts, ends, e, now) for e in range(num_epochs))


def epochs_that_fit(starts: list[float], ends: list[float], done: int, budget: float, now: float) -> int:
    """``done`` epochs plus as many more as the time left allows at the mean wall time of the epochs so far
    (re-planned at every epoch, so one slow epoch on a shared machine does not fix the plan)."""
    spent = spent_seconds(starts, ends, done, now)
    per_epoch = spent / max(1, done)
    return done + max(0, int((budget - spent) // max(per_epoch, 1e-6)))


class BudgetReached(Exception):
    """Raised at the start of an epoch that the budget does not allow; ``run_training`` ends training there."""


class WallTimeBudgetMixin:
    """Shared machinery; subclasses override ``plan_budget`` (what to decide from the epoch timings)."""

    budget_iterations_per_epoch = 20  # the stock U-Net takes ~10 s per step of 8 slices on 2 busy CPU cores
    budget_val_iterations_per_epoch = 4

    def extra_seconds(self) -> float:
        """Time spent outside the epochs that the budget counts too."""
        return 0.0

    def plan_budget(self, now: float) -> None:
        """``num_epochs`` from the logged epoch times, and the LR schedule stretched over them."""
        if self.current_epoch >= 1:
            starts, ends = self.epoch_times()
            self.num_epochs = epochs_that_fit(starts, ends, self.current_epoch,
                                              self.budget_seconds - self.extra_seconds(), now)
            self.stretch_schedule()

    def stretch_schedule(self) -> None:
        raise NotImplementedError

    def epoch_times(self) -> tuple[list[float], list[float]]:
        return (self.logger.get_value('epoch_start_timestamps', step=None),
                self.logger.get_value('epoch_end_timestamps', step=None))

    def run_training(self):
        self.budget_seconds = 60.0 * env.env_float(env.BUDGET_MINUTES, type(self).__name__)
        self.num_iterations_per_epoch = self.budget_iterations_per_epoch
        self.num_val_iterations_per_epoch = self.budget_val_iterations_per_epoch
        self.save_every = 1
        self.num_epochs = UNDECIDED_EPOCHS
        self._budget_note = None
        try:
            super().run_training()
        except BudgetReached as stop:
            self.print_to_log_file(f"Wall-time budget: {stop}")
            self.on_train_end()

    def decide(self) -> tuple[int, str | None]:
        """(``num_epochs``, why training stops at this epoch or None) from the epoch times logged so far and now."""
        now = time()
        self.plan_budget(now)
        starts, ends = self.epoch_times()
        spent = spent_seconds(starts, ends, self.current_epoch, now) + self.extra_seconds()
        note = f"num_epochs {self.num_epochs}"
        if note != self._budget_note:
            self._budget_note = note
            self.print_to_log_file(f"Wall-time budget {self.budget_seconds / 60:.1f} min: {note} "
                                   f"({spent:.0f} s spent in {self.current_epoch} epochs)")
        if self.current_epoch >= self.num_epochs:
            return self.num_epochs, f"all {self.num_epochs} planned epochs done after {spent:.0f} s"
        if spent >= self.budget_seconds and self.current_epoch >= 1:
            return self.num_epochs, (f"{spent:.0f} s spent after {self.current_epoch} epochs "
                                     f"(budget {self.budget_seconds:.0f} s)")
        return self.num_epochs, None

    def on_epoch_start(self):
        # under DDP rank 0 decides for all: each rank's own clock and epoch times would stop them at different epochs
        num_epochs, stop = ddp.rank0_decides(self.decide)
        if num_epochs != self.num_epochs:
            self.num_epochs = num_epochs
            self.stretch_schedule()
        if stop is not None:
            raise BudgetReached(stop)
        super().on_epoch_start()

    def on_epoch_end(self):
        super().on_epoch_end()
        every = env.env_float(env.SNAPSHOT_MINUTES, type(self).__name__, default=math.inf)
        if math.isfinite(every):
            starts, ends = self.epoch_times()
            spent = spent_seconds(starts, ends, self.current_epoch, time()) + self.extra_seconds()
            mark = int(spent // (60 * every) * every)
            name = os.path.join(self.output_folder, f"checkpoint_{mark:03d}min.pth")
            latest = os.path.join(self.output_folder, "checkpoint_latest.pth")  # written every epoch (save_every 1)
            if mark > 0 and not os.path.isfile(name) and os.path.isfile(latest) and self.local_rank == 0:
                write_atomic(name, lambda tmp: shutil.copyfile(latest, tmp))

    def perform_actual_validation(self, save_probabilities: bool = False):
        if self.fold == 'all':
            self.print_to_log_file("Fold 'all' has no held-out cases: final validation skipped (budget variant)")
            return
        super().perform_actual_validation(save_probabilities)


class nnUNetTrainerBudget(WallTimeBudgetMixin, nnUNetTrainer):
    """Stock nnU-Net whose poly LR schedule is stretched over the epochs the budget allows; batch <= 8 (as
    ``nnUNetTrainerARSeg_small``: the plans' GPU-sized batch of 128x128 slices takes minutes per step on a CPU)."""

    batch_size_cap = 8

    def _set_batch_size_and_oversample(self):
        super()._set_batch_size_and_oversample()
        self.batch_size = min(self.batch_size, self.batch_size_cap)

    def stretch_schedule(self) -> None:
        self.lr_scheduler.max_steps = max(1, self.num_epochs)


class nnUNetTrainerARSeg_budget(WallTimeBudgetMixin, nnUNetTrainerARSeg):
    """AR-Seg under the budget, including the time its tokenizer took to train when this run trained it (recorded
    in ``fold_X/budget_tokenizer.json``, so ``--c`` keeps counting it; a tokenizer that existed is free)."""

    def _tokenizer_record(self) -> str:
        return os.path.join(self.output_folder, "budget_tokenizer.json")

    def on_train_start(self):
        trained_here = not (self.tokenizer.given or self.tokenizer.exists())
        super().on_train_start()
        if trained_here:
            summary = load_json(os.path.join(self.tokenizer.folder, "summary.json"))
            save_json_atomic({"tokenizer_seconds": summary["seconds"], "tokenizer": self.tokenizer.path},
                             self._tokenizer_record())

    def extra_seconds(self) -> float:
        record = self._tokenizer_record()
        return float(load_json(record)["tokenizer_seconds"]) if os.path.isfile(record) else 0.0

    def stretch_schedule(self) -> None:
        self.lr_scheduler.num_epochs = max(1, self.num_epochs)


class nnUNetTrainerARSeg_small_budget(nnUNetTrainerARSeg_budget, nnUNetTrainerARSeg_small):
    """``nnUNetTrainerARSeg_small`` (a CPU-sized model) under the wall-time budget."""


class nnUNetTrainerARSeg_upgrade_budget(nnUNetTrainerARSeg_budget, nnUNetTrainerARSeg_upgrade):
    """``nnUNetTrainerARSeg_upgrade`` (AR-Seg over a lab's frozen nnU-Net encoder) under the wall-time budget."""
