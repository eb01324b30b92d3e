"""Time GED, HM-IoU and Soft-Dice (plus D_max, consensus Dice) for 2,000 images, N = 16 samples, M = 4 raters, 128x128.

Run: ``python benchmarks/metrics_speed.py [--images 2000] [--chunk 100]``. The masks are random discs (seeded);
only the metric computation is timed, data generation is not.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from nnunet_arseg.evaluation import multirater_metrics_batch


def random_discs(rng: np.random.Generator, b: int, k: int, size: int) -> np.ndarray:
    """(b, k, size, size) boolean discs with jittered centres and radii (some empty), like nodule masks."""
    yy, xx = np.mgrid[:size, :size]
    cy = size / 2 + rng.normal(0, 4, (b, k, 1, 1))
    cx = size / 2 + rng.normal(0, 4, (b, k, 1, 1))
    r = np.clip(rng.normal(10, 6, (b, k, 1, 1)), 0, None)
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--chunk", type=int, default=100, help="images generated and scored per call")
    parser.add_argument("-n", type=int, default=16)
    parser.add_argument("-m", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    elapsed, means = 0.0, {}
    for b0 in range(0, args.images, args.chunk):
        b = min(args.chunk, args.images - b0)
        samples, raters = random_discs(rng, b, args.n, args.size), random_discs(rng, b, args.m, args.size)
        t0 = time.perf_counter()
        res = multirater_metrics_batch(samples, raters)
        elapsed += time.perf_counter() - t0
        for key in ("GED", "HM-IoU", "Soft-Dice", "D_max", "D_consensus"):
            means.setdefault(key, []).append(res[key])
    print(f"{args.images} images, N = {args.n}, M = {args.m}, {args.size}x{args.size}: {elapsed:.2f} s "
          f"({1000 * elapsed / args.images:.2f} ms/image)")
    print("  ".join(f"{k} {np.concatenate(v).mean():.4f}" for k, v in means.items()))


if __name__ == "__main__":
    main()
