"""Multi-rater metrics: N binary samples against M rater masks (GED, HM-IoU, Soft-Dice, D_max, consensus Dice).

Conventions follow the LIDC literature (``docs/metrics.md`` in the shared docs):
d(a, b) = 1 - |a & b| / |a | b|; two empty masks are at distance ``empty_distance`` (0 by default).
All pairwise intersections of one image come from one matrix product of the flattened masks (the Gram matrix
of the stacked samples and raters), so a whole test set is scored in seconds. Each function takes
``samples`` (N, *spatial) and ``raters`` (M, *spatial), boolean (or 0/1), 2D or 3D, and returns a float;
``multirater_metrics_batch`` scores (B, N, *spatial) against (B, M, *spatial) and returns per-image arrays; cases with
different M (a case with fewer raters) go in separate calls, as the evaluator scores each case on its own.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

SOFT_DICE_THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)
METRIC_NAMES = ("GED", "HM-IoU", "Soft-Dice", "D_max", "D_consensus")
PRESENCE_NAMES = ("presence_samples", "presence_raters", "presence_gap")


def as_binary_stack(masks, name: str = "masks") -> np.ndarray:
    """(K, *spatial) boolean array of ``masks`` (numpy, or a torch tensor on any device); rejects non-binary input."""
    arr = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    if arr.ndim < 2:
        raise ValueError(f"{name} must have shape (K, *spatial), got shape {arr.shape}")
    if arr.dtype != bool:
        if not ((arr == 0) | (arr == 1)).all():
            raise ValueError(f"{name} must be binary (bool or 0/1), got values {np.unique(arr)[:5]}; "
                             f"binarise probabilities with > 0.5 first")
        arr = arr.astype(bool)
    return arr


def _check_pair(samples, raters) -> tuple[np.ndarray, np.ndarray]:
    s = as_binary_stack(samples, "samples")
    y = as_binary_stack(raters, "raters")
    if s.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError(f"need at least one sample and one rater, got N = {s.shape[0]}, M = {y.shape[0]}")
    if s.shape[1:] != y.shape[1:]:
        raise ValueError(f"samples have spatial shape {s.shape[1:]} but raters {y.shape[1:]}; they must match")
    return s, y


def _gram(x_BKP: np.ndarray) -> np.ndarray:
    """Pairwise intersection counts (B, K, K) of flattened binary masks: one batched matrix product.

    Exact: every partial sum is an integer below 2**24 in float32 (float64 beyond). torch's bmm is used because
    OpenBLAS is slow on numpy's short-and-wide (K x P) @ (P x K) products.
    """
    xf = torch.from_numpy(x_BKP.astype(np.float32 if x_BKP.shape[-1] < 2 ** 24 else np.float64))
    return torch.bmm(xf, xf.transpose(1, 2)).numpy().astype(np.float64)


def _ratio(num: np.ndarray, den: np.ndarray, empty_value: float) -> np.ndarray:
    out = np.full(np.broadcast(num, den).shape, empty_value, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _distances(x_bKP: np.ndarray, empty_distance: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intersections (b, K, K), sizes (b, K) and IoU distances (b, K, K) of flattened masks, from one Gram matrix."""
    g = _gram(x_bKP)
    size = np.diagonal(g, axis1=1, axis2=2)
    union = size[:, :, None] + size[:, None, :] - g
    return g, size, 1.0 - _ratio(g, union, 1.0 - empty_distance)


def iou_distance_matrix(a, b=None, *, empty_distance: float = 0.0) -> np.ndarray:
    """(K, L) matrix of d(a_k, b_l) = 1 - IoU, ``empty_distance`` where both are empty; ``b`` defaults to ``a``."""
    a = as_binary_stack(a, "a")
    b = a if b is None else as_binary_stack(b, "b")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"spatial shapes differ: {a.shape[1:]} vs {b.shape[1:]}")
    k = a.shape[0]
    d = _distances(np.concatenate([a, b]).reshape(1, k + b.shape[0], -1), empty_distance)[2][0]
    return d[:k, k:]


def _hungarian_mean_iou(d_NM: np.ndarray) -> float:
    """Mean matched IoU after replicating samples and raters to L = lcm(N, M) (BerDiff/MoSE convention)."""
    n, m = d_NM.shape
    big_l = math.lcm(n, m)
    cost_LL = d_NM[np.arange(big_l) % n][:, np.arange(big_l) % m].T  # rows: replicated raters, cols: samples
    rows, cols = linear_sum_assignment(cost_LL)
    return float(np.mean(1.0 - cost_LL[rows, cols]))


def multirater_metrics_batch(samples_BN, raters_BM, *, empty_distance: float = 0.0,
                             thresholds: Sequence[float] = SOFT_DICE_THRESHOLDS, eps: float = 1e-6,
                             d_max_empty_dice: float = 1.0, consensus_empty_dice: float = 0.0,
                             chunk: int = 64) -> dict[str, np.ndarray]:
    """Per-image GED, HM-IoU, Soft-Dice, D_max and D_consensus (mean over raters) of a batch.

    ``samples_BN``: (B, N, *spatial), ``raters_BM``: (B, M, *spatial). Returns arrays of shape (B,) keyed by
    ``METRIC_NAMES`` and ``PRESENCE_NAMES`` (the share of non-empty samples, of non-empty raters, and their absolute
    difference) plus ``"D_consensus_per_rater"`` (B, M). Images are processed ``chunk`` at a time.
    """
    s_all = samples_BN.detach().cpu().numpy() if isinstance(samples_BN, torch.Tensor) else np.asarray(samples_BN)
    y_all = raters_BM.detach().cpu().numpy() if isinstance(raters_BM, torch.Tensor) else np.asarray(raters_BM)
    if s_all.ndim < 3 or s_all.shape[0] != y_all.shape[0] or s_all.shape[2:] != y_all.shape[2:]:
        raise ValueError(f"expected samples (B, N, *spatial) and raters (B, M, *spatial) with the same B and "
                         f"spatial shape, got {s_all.shape} and {y_all.shape}")
    num_b, n, m = s_all.shape[:2] + y_all.shape[1:2]
    if n == 0 or m == 0:
        raise ValueError(f"need at least one sample and one rater per image, got N = {n}, M = {m}")
    out = {k: np.empty(num_b) for k in METRIC_NAMES + PRESENCE_NAMES}
    out["D_consensus_per_rater"] = np.empty((num_b, m))
    for b0 in range(0, num_b, chunk):
        s_bNP = as_binary_stack(s_all[b0:b0 + chunk].reshape(-1, n, s_all[0, 0].size), "samples")
        y_bMP = as_binary_stack(y_all[b0:b0 + chunk].reshape(-1, m, y_all[0, 0].size), "raters")
        part = _metrics_from_masks(s_bNP, y_bMP, empty_distance, thresholds, eps, d_max_empty_dice,
                                   consensus_empty_dice)
        for key, val in part.items():
            out[key][b0:b0 + len(s_bNP)] = val
    return out


def _metrics_from_masks(s_bNP, y_bMP, empty_distance, thresholds, eps, d_max_empty_dice, consensus_empty_dice):
    n, m = s_bNP.shape[1], y_bMP.shape[1]
    count_s = s_bNP.sum(1, dtype=np.int32)
    count_y = y_bMP.sum(1, dtype=np.int32)
    majority_b1P = (2 * count_s > n)[:, None]  # strict majority of the samples
    g, size, d = _distances(np.concatenate([s_bNP, y_bMP, majority_b1P], axis=1), empty_distance)
    d_ss, d_sy, d_yy = d[:, :n, :n], d[:, :n, n:n + m], d[:, n:n + m, n:n + m]
    ged_b = 2.0 * d_sy.mean((1, 2)) - d_ss.mean((1, 2)) - d_yy.mean((1, 2))
    hm_b = np.array([_hungarian_mean_iou(x) for x in d_sy])

    dice = _ratio(2.0 * g, size[:, :, None] + size[:, None, :], np.nan)
    dice_sy = np.where(np.isnan(dice[:, :n, n:n + m]), d_max_empty_dice, dice[:, :n, n:n + m])
    d_max_b = dice_sy.max(2).mean(1)
    dice_cy = np.where(np.isnan(dice[:, -1, n:n + m]), consensus_empty_dice, dice[:, -1, n:n + m])

    soft = []
    for tau in thresholds:
        p_tau, g_tau = count_s / n > tau, count_y / m > tau
        inter = np.count_nonzero(p_tau & g_tau, axis=1)
        soft.append((2.0 * inter + eps) / (np.count_nonzero(p_tau, 1) + np.count_nonzero(g_tau, 1) + eps))
    share_s, share_y = (size[:, :n] > 0).mean(1), (size[:, n:n + m] > 0).mean(1)
    return {"GED": ged_b, "HM-IoU": hm_b, "Soft-Dice": np.mean(soft, axis=0), "D_max": d_max_b,
            "D_consensus": dice_cy.mean(1), "D_consensus_per_rater": dice_cy, "presence_samples": share_s,
            "presence_raters": share_y, "presence_gap": np.abs(share_s - share_y)}


def presence_calibration(share_samples, share_raters) -> dict:
    """How well the samples' presence follows the raters' over a set of images: the mean of
    |share of non-empty samples - share of non-empty raters| and the Pearson correlation of the two shares (NaN when
    either is constant)."""
    a, b = np.asarray(share_samples, dtype=float), np.asarray(share_raters, dtype=float)
    corr = float(np.corrcoef(a, b)[0, 1]) if len(a) > 1 and a.std() > 0 and b.std() > 0 else float("nan")
    return {"presence_gap": float(np.mean(np.abs(a - b))) if len(a) else float("nan"), "presence_correlation": corr}


def nan_mean(values) -> float:
    """Mean of ``values`` ignoring NaN; NaN (without numpy's warning) when every value is NaN or there is none,
    e.g. a correlation over one case."""
    a = np.asarray(values, dtype=float)
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else float("nan")


def _single(samples, raters, **kwargs) -> dict[str, np.ndarray]:
    s, y = _check_pair(samples, raters)
    return multirater_metrics_batch(s[None], y[None], **kwargs)


def ged(samples, raters, *, empty_distance: float = 0.0) -> float:
    """Squared generalised energy distance 2E d(S,Y) - E d(S,S') - E d(Y,Y'), self-pairs included (lower is better)."""
    s, y = _check_pair(samples, raters)
    n = s.shape[0]
    d = _distances(np.concatenate([s, y]).reshape(1, n + y.shape[0], -1), empty_distance)[2][0]
    return float(2.0 * d[:n, n:].mean() - d[:n, :n].mean() - d[n:, n:].mean())


def hm_iou(samples, raters, *, empty_distance: float = 0.0) -> float:
    """Hungarian-matched IoU: both sets replicated to lcm(N, M), optimal 1:1 matching, mean matched IoU."""
    s, y = _check_pair(samples, raters)
    return _hungarian_mean_iou(iou_distance_matrix(s, y, empty_distance=empty_distance))


def soft_dice(samples, raters, *, thresholds: Sequence[float] = SOFT_DICE_THRESHOLDS, eps: float = 1e-6) -> float:
    """Mean over tau of Dice(mean(samples) > tau, mean(raters) > tau), strict ``>``, ``eps`` added to both terms."""
    return float(_single(samples, raters, thresholds=thresholds, eps=eps)["Soft-Dice"][0])


def d_max(samples, raters, *, empty_dice: float = 1.0) -> float:
    """SeqSAM's D_max: for each sample the best Dice over the raters, then the mean over samples.

    An empty sample against an empty rater scores ``empty_dice`` (1 by default, matching d = 0 for empty/empty;
    SeqSAM's code leaves it 0/0 = NaN, pass ``float('nan')`` to reproduce that).
    """
    return float(_single(samples, raters, d_max_empty_dice=empty_dice)["D_max"][0])


def consensus_dice(samples, raters, *, empty_dice: float = 0.0) -> dict:
    """Dice of the strict-majority consensus of the samples (> N/2) against each rater, and their mean (D_avg).

    An empty consensus against an empty rater scores ``empty_dice`` (0 by default, as SeqSAM's D_avg).
    Returns ``{"per_rater": [M floats], "mean": float}``.
    """
    per_rater = _single(samples, raters, consensus_empty_dice=empty_dice)["D_consensus_per_rater"][0]
    return {"per_rater": [float(v) for v in per_rater], "mean": float(np.mean(per_rater))}
