"""Evaluation: multi-rater metrics (GED, HM-IoU, Soft-Dice, D_max, consensus Dice) and Dice per label/region."""
from nnunet_arseg.evaluation.multirater import (
    consensus_dice,
    d_max,
    ged,
    hm_iou,
    iou_distance_matrix,
    multirater_metrics_batch,
    soft_dice,
)
from nnunet_arseg.evaluation.regions import dice_per_region, foreground_labels_or_regions

__all__ = ["ged", "hm_iou", "soft_dice", "d_max", "consensus_dice", "iou_distance_matrix",
           "multirater_metrics_batch", "dice_per_region", "foreground_labels_or_regions",
           "evaluate_case", "evaluate_multirater_folder"]


def __getattr__(name):
    # the folder evaluator imports nnU-Net's readers; load it only when asked for
    if name in ("evaluate_case", "evaluate_multirater_folder"):
        from nnunet_arseg.evaluation import evaluate
        return getattr(evaluate, name)
    raise AttributeError(name)
