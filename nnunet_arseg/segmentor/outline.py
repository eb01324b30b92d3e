"""Outlines of the samples drawn around the U-Net head (ours): each drawn sample thresholds the head's probability
map at a level of its own.

The head learns from one drawn rater per example, so its probability of a pixel estimates the share of raters who
mark it. Thresholded at 1/2 it gives one outline per image, the one most raters draw; thresholded at levels spread
over (0, 1) it gives the generous and the tight outlines as well, and with levels spread evenly over all of (0, 1) a
pixel is in a share of the drawn samples equal to the head's probability.
"""
from __future__ import annotations

import torch

__all__ = ["OUTLINE_SPREAD", "outline_levels", "check_outline_spread"]

OUTLINE_SPREAD = 0.5  # the default: levels over all of (0, 1); chosen on validation patients (docs/results.md)


def check_outline_spread(spread: float) -> float:
    spread = float(spread)
    if not 0 <= spread <= 0.5:
        raise ValueError(f"outline_spread must be in [0, 0.5], got {spread}")
    return spread


def outline_levels(present_BN: torch.Tensor, spread: float) -> torch.Tensor:
    """Levels (B, N) in (0, 1): the c present samples of an image take the midpoints of c equal strata of
    [1/2 - spread, 1/2 + spread], in sample order from the middle stratum up, then from the lowest (so the first, the
    one the coarse-to-fine pictures show, is the head's mask at about 1/2); an absent sample takes 1/2. No randomness:
    which samples are present is already drawn at random (``draw_presence``)."""
    spread = check_outline_spread(spread)
    rank_BN = present_BN.long().cumsum(1) - 1  # the k-th present sample of its image has rank k - 1
    count_B1 = present_BN.sum(1, keepdim=True).clamp(min=1)
    stratum_BN = ((rank_BN + count_B1 // 2) % count_B1 + 0.5) / count_B1
    return torch.where(present_BN, 0.5 - spread + 2 * spread * stratum_BN, torch.full_like(stratum_BN, 0.5))
