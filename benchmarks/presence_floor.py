"""How low the presence gap can go: the gap of an oracle sampler on the same raters' counts.

    python benchmarks/presence_floor.py PRED/summary_arseg.json [MORE/summary_arseg.json ...]

The presence gap (``nnUNetv2_arseg_evaluate``) compares the share of non-empty samples of an image with the share of
its M raters who drew anything. Raters drawn independently given the image, each with the image's own probability p,
make their count S a binomial draw, so even a perfect sampler has a gap. p is not observed, but its distribution must
reproduce the histogram of S; this script bounds the oracle's gap over every distribution that does (a linear
programme over a grid of p). Where the images with S = 0 are (almost) missing, as in crops centred on marked objects,
they are left out, and the data are a selection: a rater's chance of drawing on a selected image is then
r(p) = E[S/M | p, S >= 1], above p, and that is what a model trained on such images learns. The oracle draws exactly
r(p) N non-empty samples (r = p without selection), so its gap is E|r(p) - S/M|. The script also bounds the gap of the
best possible predictor of S/M under absolute error (its median given p, which a sampler drawing at a calibrated rate
does not use). Each summary's own gap is printed beside them.
"""
from __future__ import annotations

import argparse

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json
from scipy import optimize, stats

__all__ = ["rater_counts", "oracle_gap_bounds"]


def rater_counts(summary: dict, key: str = "1") -> tuple[np.ndarray, np.ndarray, int]:
    """Per-image shares of non-empty raters and samples of one condition ``key`` of an evaluator summary, and M."""
    per_case = [c["metrics"][key] for c in summary["metric_per_case"]]
    raters_per_case = summary["conventions"]["M"]
    if len(raters_per_case) != 1:
        raise ValueError(f"the images have different numbers of raters ({raters_per_case}); the bounds need one M")
    num_raters = int(raters_per_case[0])
    raters = np.array([c["presence_raters"] for c in per_case], dtype=float)
    samples = np.array([c["presence_samples"] for c in per_case], dtype=float)
    return raters, samples, num_raters


def oracle_gap_bounds(counts: np.ndarray, min_count: int = 0, grid: int = 400) -> dict:
    """Lowest and highest expected gap, over every distribution of p that gives the histogram ``counts`` (images
    with S = 0 .. M) of S >= ``min_count``, of (a) ``calibrated``: a sampler drawing at the rate r(p) = E[S/M | p,
    S >= min_count] (p when min_count is 0) and (b) ``best``: the best predictor of S/M (the median given p)."""
    counts = np.asarray(counts, dtype=float)
    M = len(counts) - 1
    s = np.arange(min_count, M + 1)
    share = s / M
    p = np.linspace(0.0, 1.0, grid + 1)
    pmf_PS = stats.binom.pmf(s[None, :], M, p[:, None])  # P(S = s | p), s >= min_count
    kept_P = pmf_PS.sum(1)
    rate_P = np.where(kept_P > 0, (pmf_PS * share).sum(1) / np.maximum(kept_P, 1e-300), p)
    calibrated = (pmf_PS * np.abs(share[None, :] - rate_P[:, None])).sum(1)
    q = np.linspace(0.0, 1.0, 101)
    best = np.min((pmf_PS[:, None, :] * np.abs(share[None, None, :] - q[None, :, None])).sum(2), axis=1)
    target = counts[min_count:] / counts[min_count:].sum()
    out = {}
    for name, cost in (("calibrated", calibrated), ("best", best)):
        # weights w(p) >= 0 with sum_p w(p) P(S = s | p) = share of images with S = s (the images given S >= min_count)
        lo = optimize.linprog(cost, A_eq=pmf_PS.T, b_eq=target, bounds=(0, None))
        hi = optimize.linprog(-cost, A_eq=pmf_PS.T, b_eq=target, bounds=(0, None))
        if not (lo.success and hi.success):
            raise ValueError(f"no mixture of binomials gives the histogram {counts.tolist()} (S >= {min_count}): the "
                             "raters are not independent given the image, or S = 0 images were left out; try "
                             "--min-count 1")
        out[name] = (float(lo.fun), float(-hi.fun))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("summaries", nargs="+", help="summary_arseg.json files of nnUNetv2_arseg_evaluate (same images)")
    p.add_argument("--key", default="1", help="condition class (label or region) in the summaries; default 1")
    p.add_argument("--min-count", type=int, default=None,
                   help="leave out images with fewer non-empty raters (default: 1 where under 1 %% of the images "
                        "have none, as in crops centred on marked objects; else 0)")
    args = p.parse_args()
    first = load_json(args.summaries[0])
    raters, _, M = rater_counts(first, args.key)
    counts = np.bincount(np.round(raters * M).astype(int), minlength=M + 1)
    min_count = args.min_count if args.min_count is not None else int(counts[0] < 0.01 * counts.sum())
    kept = np.round(raters * M) >= min_count
    print(f"{len(raters)} images, {M} raters; images with S = 0 .. {M} non-empty raters: {counts.tolist()}"
          + (f"; the {counts[:min_count].sum()} with S < {min_count} left out" if min_count else ""))
    bounds = oracle_gap_bounds(counts, min_count)
    rate = "r(p) = E[S/M | p, S >= %d]" % min_count if min_count else "p"
    print(f"oracle sampler (draws at each image's true rate {rate}): presence gap {bounds['calibrated'][0]:.3f} .. "
          f"{bounds['calibrated'][1]:.3f}")
    print(f"best predictor of the raters' share (median given p): {bounds['best'][0]:.3f} .. {bounds['best'][1]:.3f}")
    for path in args.summaries:
        r, smp, _ = rater_counts(load_json(path), args.key)
        print(f"{path}: presence gap {np.abs(smp - r)[kept].mean():.3f} on the same images")


if __name__ == "__main__":
    main()
