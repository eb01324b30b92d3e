"""Dice per nnU-Net label or region (BraTS: whole tumour, tumour core, enhancing tumour) with nnU-Net's own helpers."""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn, region_or_label_to_mask
from nnunetv2.utilities.label_handling.label_handling import LabelManager

LabelOrRegion = Union[int, tuple[int, ...]]

# BraTS 2021 as nnU-Net's Dataset137 conversion writes it (BraTS 1 NCR -> 2, 2 ED -> 1, 4 ET -> 3).
BRATS_2021_LABELS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
BRATS_2021_REGIONS_CLASS_ORDER = [1, 2, 3]


def label_manager_from_dataset_json(dataset_json: dict) -> LabelManager:
    """nnU-Net's LabelManager for a dataset.json (``labels``, optional ``regions_class_order``)."""
    if "labels" not in dataset_json:
        raise ValueError("dataset.json has no 'labels' entry; it is not an nnU-Net v2 dataset.json")
    return LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))


def foreground_labels_or_regions(dataset_json: dict) -> list[LabelOrRegion]:
    """The foreground regions of a region-based dataset, else the foreground labels (what nnU-Net evaluates)."""
    lm = label_manager_from_dataset_json(dataset_json)
    return list(lm.foreground_regions) if lm.has_regions else [int(i) for i in lm.foreground_labels]


def dice_per_region(seg_ref: np.ndarray, seg_pred: np.ndarray, labels_or_regions: Sequence[LabelOrRegion], *,
                    ignore_label: int | None = None, empty_score: float = 1.0) -> dict:
    """Dice, IoU and counts per label/region of two label maps of equal shape.

    A region absent from both the reference and the prediction scores ``empty_score`` (1 by default, as in
    the BraTS/HiDiff convention; nnU-Net's own evaluator gives NaN there). Keys are the labels/regions.
    """
    if seg_ref.shape != seg_pred.shape:
        raise ValueError(f"reference shape {seg_ref.shape} differs from prediction shape {seg_pred.shape}")
    ignore_mask = seg_ref == ignore_label if ignore_label is not None else None
    out = {}
    for r in labels_or_regions:
        r = tuple(r) if isinstance(r, list) else r
        tp, fp, fn, tn = compute_tp_fp_fn_tn(region_or_label_to_mask(seg_ref, r),
                                             region_or_label_to_mask(seg_pred, r), ignore_mask)
        denom = 2 * tp + fp + fn
        out[r] = {"Dice": float(2 * tp / denom) if denom > 0 else float(empty_score),
                  "IoU": float(tp / (tp + fp + fn)) if denom > 0 else float(empty_score),
                  "TP": int(tp), "FP": int(fp), "FN": int(fn), "TN": int(tn),
                  "n_ref": int(tp + fn), "n_pred": int(tp + fp)}
    return out

