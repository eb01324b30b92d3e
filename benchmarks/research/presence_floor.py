"""How low the presence gap can go: the gap of an oracle sampler on the same raters' counts.

    python benchmarks/research/presence_floor.py PRED/summary_arseg.json [MORE/summary_arseg.json ...]

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

The same oracle bounds D_max, the mean over samples of each sample's best Dice with a rater, which rewards drawing
exactly where every rater drew: given each summary's own non-empty samples (their mean best-rater Dice on the images
with S = s, recovered from its per-image D_max and share of non-empty samples), the D_max it would score if its
presence were drawn at the oracle's rate. That is the most a better presence head can bring a prediction's D_max.
"""
from __future__ import annotations

import argparse

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json
from scipy import optimize, stats

__all__ = ["rater_counts", "oracle_gap_bounds", "present_dice_by_count", "oracle_dmax_bounds"]


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


def _binomial_grid(M: int, min_count: int, grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Counts s >= ``min_count``, P(S = s | p) on a grid of p (P, S), and the selected images' rate r(p) (P,)."""
    s = np.arange(min_count, M + 1)
    p = np.linspace(0.0, 1.0, grid + 1)
    pmf_PS = stats.binom.pmf(s[None, :], M, p[:, None])
    kept_P = pmf_PS.sum(1)
    rate_P = np.where(kept_P > 0, (pmf_PS * s / M).sum(1) / np.maximum(kept_P, 1e-300), p)
    return s, p, pmf_PS, rate_P


def oracle_gap_bounds(counts: np.ndarray, min_count: int = 0, grid: int = 400) -> dict:
    """Lowest and highest expected gap, over every distribution of p that gives the histogram ``counts`` (images
    with S = 0 .. M) of S >= ``min_count``, of (a) ``calibrated``: a sampler drawing at the rate r(p) = E[S/M | p,
    S >= min_count] (p when min_count is 0) and (b) ``best``: the best predictor of S/M (the median given p)."""
    counts = np.asarray(counts, dtype=float)
    M = len(counts) - 1
    s, p, pmf_PS, rate_P = _binomial_grid(M, min_count, grid)
    share = s / M
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


def present_dice_by_count(raters: np.ndarray, samples: np.ndarray, d_max: np.ndarray, num_raters: int) -> np.ndarray:
    """Mean best-rater Dice of the non-empty samples on the images with S = 0 .. M non-empty raters (NaN where no
    image with that S has one). An image's D_max is f q + (1 - f) e, with f its share of non-empty samples, q their
    mean best-rater Dice and e the score of an empty sample (1 if a rater drew nothing, else 0): q follows."""
    S = np.round(np.asarray(raters) * num_raters).astype(int)
    f, d_max = np.asarray(samples, dtype=float), np.asarray(d_max, dtype=float)
    empty_score = (S < num_raters).astype(float)
    drawn = f > 0
    q = (d_max[drawn] - (1 - f[drawn]) * empty_score[drawn]) / f[drawn]
    return np.array([q[S[drawn] == k].mean() if np.any(S[drawn] == k) else np.nan for k in range(num_raters + 1)])


def oracle_dmax_bounds(counts, present_dice, min_count: int = 0, grid: int = 400) -> dict:
    """Lowest and highest D_max, over every distribution of p that gives the histogram ``counts``, of a sampler that
    draws a non-empty sample at the oracle's rate r(p) (``oracle_gap_bounds``) and whose non-empty samples score
    ``present_dice[s]`` on images with S = s; with the oracle's presence correlation (share of non-empty samples
    against S/M) under each of the two distributions (NaN where either share is the same on every image)."""
    counts = np.asarray(counts, dtype=float)
    M = len(counts) - 1
    s, p, pmf_PS, rate_P = _binomial_grid(M, min_count, grid)
    quality = np.asarray(present_dice, dtype=float)[min_count:]
    if np.isnan(quality[counts[min_count:] > 0]).any():
        raise ValueError("no non-empty sample on any image of some raters' count: D_max of the oracle is undefined")
    quality = np.nan_to_num(quality)
    empty_score = (s < M).astype(float)
    target = counts[min_count:] / counts[min_count:].sum()
    # D_max = sum_s [Q_s quality_s + (P(s) - Q_s) empty_s] with Q_s = sum_p w(p) P(s | p) r(p): linear in w
    gain_P = (pmf_PS * rate_P[:, None] * (quality - empty_score)[None, :]).sum(1)
    base = float((target * empty_score).sum())
    out = {}
    for name, sign in (("low", 1.0), ("high", -1.0)):
        res = optimize.linprog(sign * gain_P, A_eq=pmf_PS.T, b_eq=target, bounds=(0, None))
        if not res.success:
            raise ValueError(f"no mixture of binomials gives the histogram {counts.tolist()} (S >= {min_count})")
        joint_PS = res.x[:, None] * pmf_PS
        w_P, w_S = joint_PS.sum(1), joint_PS.sum(0)
        dr, ds = rate_P - (w_P * rate_P).sum(), s / M - (w_S * s / M).sum()
        spread = np.sqrt((w_P * dr ** 2).sum() * (w_S * ds ** 2).sum())
        corr = (joint_PS * dr[:, None] * ds[None, :]).sum() / spread if spread > 1e-12 else np.nan
        out[name] = (base + sign * float(res.fun), float(corr))
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
        summary = load_json(path)
        r, smp, _ = rater_counts(summary, args.key)
        d_max = np.array([c["metrics"][args.key]["D_max"] for c in summary["metric_per_case"]], dtype=float)
        quality = present_dice_by_count(r[kept], smp[kept], d_max[kept], M)
        S = np.round(r * M).astype(int)
        print(f"{path}: presence gap {np.abs(smp - r)[kept].mean():.3f}, D_max {d_max[kept].mean():.3f}, presence "
              f"correlation {np.corrcoef(smp[kept], r[kept])[0, 1]:.3f} on the same images")
        for s in range(min_count, M + 1):
            print(f"  S = {s}: share of non-empty samples {smp[S == s].mean():.3f}, their best-rater Dice "
                  f"{quality[s]:.3f}")
        try:
            dmax = oracle_dmax_bounds(counts, quality, min_count)
        except ValueError as e:
            print(f"  {e}")
            continue
        print(f"  with these non-empty samples and the oracle's presence: D_max {dmax['low'][0]:.3f} .. "
              f"{dmax['high'][0]:.3f} (the oracle's presence correlation {dmax['low'][1]:.3f} / {dmax['high'][1]:.3f})")


if __name__ == "__main__":
    main()
