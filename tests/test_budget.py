"""The wall-time budget of the budget trainers: pure functions of nnU-Net's logged epoch timestamps."""
from __future__ import annotations

import pytest

from nnunet_arseg.env import env_float
from nnunet_arseg.training.budget import epoch_wall_seconds, epochs_that_fit, spent_seconds


def test_restart_gap_is_not_counted():
    starts, ends = [0.0, 1000.0], [30.0, 1040.0]  # epoch 1 started 970 s after epoch 0 ended: a --c restart
    assert epoch_wall_seconds(starts, ends, 0, now=2000.0) == 90.0  # 30 s + at most 60 s of bookkeeping
    assert spent_seconds(starts, ends, 2, now=1045.0) == 90.0 + 45.0


def test_plan_follows_the_mean_epoch_time_not_the_first_epoch():
    # a slow first epoch (130 s on a busy machine), then 40 s epochs; 1200 s budget
    starts, ends = [0.0, 135.0, 175.0], [130.0, 170.0, 210.0]
    after_one = epochs_that_fit(starts[:1], ends[:1], 1, 1200.0, now=135.0)
    after_three = epochs_that_fit(starts, ends, 3, 1200.0, now=215.0)
    assert after_one == 1 + (1200 - 135) // 135
    assert after_three == 3 + int((1200 - 215) // (215 / 3)) and after_three > after_one
    assert epochs_that_fit(starts, ends, 3, 200.0, now=215.0) == 3  # spent: no further epoch


def test_budget_variable_errors_name_it(monkeypatch):
    monkeypatch.delenv("nnUNet_ARSEG_BUDGET_MINUTES", raising=False)
    with pytest.raises(RuntimeError, match="nnUNet_ARSEG_BUDGET_MINUTES"):
        env_float("nnUNet_ARSEG_BUDGET_MINUTES", "nnUNetTrainerBudget")
    monkeypatch.setenv("nnUNet_ARSEG_BUDGET_MINUTES", "-3")
    with pytest.raises(RuntimeError, match="must be a number"):
        env_float("nnUNet_ARSEG_BUDGET_MINUTES", "nnUNetTrainerBudget")
