"""Where a sampler's D_max differs from a one-mask model's: presence (how often it draws) or shape (what it draws).

D_max is the mean over samples of each sample's best Dice with a rater (``nnunet_arseg.evaluation.multirater.d_max``:
an empty sample scores 1 where a rater drew nothing, 0 where every rater drew). Per slice group (the number of raters
who drew), this prints the share of drawn samples, the D_max of the drawn samples alone (their shape), and D_max, for
the sampler (``--samples``: an ``nnUNetv2_arseg_predict --save_samples`` folder) and for the reference (``--reference``:
one mask per case, e.g. ``nnUNetv2_predict``'s), then the D_max the sampler's shapes would score with the reference's
presence decision and with presence drawn at the raters' own share.

    python benchmarks/research/lidc_dmax_split.py --samples PRED_ARSEG --reference PRED_NNUNET -d DATASET [-n 16]

Raters and file ending come from the raw dataset (``nnUNet_raw``), as for ``nnUNetv2_arseg_evaluate``.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import join

from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

from nnunet_arseg.evaluation.casefiles import (find_raw_dataset, load_dataset_json, rater_files_per_case,
                                               rater_folders, samples_per_case)
from nnunet_arseg.evaluation.multirater import d_max, nan_mean


def split(samples_N, raters_M, reference) -> dict:
    """One case: the sampler's drawn share, its drawn samples' D_max (NaN: none drawn) and D_max; the same for the
    reference's one mask; the number of raters who drew."""
    drawn = [s for s in samples_N if s.any()]
    empty_score = d_max([np.zeros_like(reference)], raters_M)  # 1 where a rater drew nothing, else 0
    return {"raters": int(sum(r.any() for r in raters_M)), "share": len(drawn) / len(samples_N),
            "shape": d_max(drawn, raters_M) if drawn else float("nan"), "d_max": d_max(samples_N, raters_M),
            "ref_draws": bool(reference.any()), "ref_d_max": d_max([reference], raters_M),
            "empty_score": empty_score, "rater_share": float(np.mean([r.any() for r in raters_M]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", required=True, help="sampler's prediction folder (with samples/)")
    p.add_argument("--reference", required=True, help="one-mask prediction folder (CASE<ext> per case)")
    p.add_argument("-d", required=True, help="dataset name or id whose raters score the cases")
    p.add_argument("-n", type=int, default=None, help="samples per case (default: all written)")
    args = p.parse_args()
    raw = find_raw_dataset(args.d)
    dataset_json = load_dataset_json(join(raw, "dataset.json"))
    ending = dataset_json["file_ending"]
    samples = samples_per_case([args.samples], ending, args.n)[0]
    raters = rater_files_per_case(rater_folders(raw, dataset_json), ending, dataset_json)
    reader = determine_reader_writer_from_dataset_json(dataset_json, next(iter(raters.values()))[0], verbose=False)()

    def read(path: str) -> np.ndarray:  # a binary task's mask
        return reader.read_seg(path)[0][0] > 0

    rows = []
    for case, files in sorted(samples.items()):
        rows.append(split(np.stack([read(f) for f in files]), np.stack([read(f) for f in raters[case]]),
                          read(os.path.join(args.reference, case + ending))))

    def mean(key, group):
        return nan_mean([r[key] for r in group])

    print("raters drawing | slices | sampler: drawn share, shape, D_max | reference: drawn share, shape, D_max")
    for k in sorted({r["raters"] for r in rows}):
        g = [r for r in rows if r["raters"] == k]
        ref_shape = nan_mean([r["ref_d_max"] for r in g if r["ref_draws"]])
        print(f"{k} | {len(g)} | {mean('share', g):.2f}, {mean('shape', g):.3f}, {mean('d_max', g):.3f} | "
              f"{mean('ref_draws', g):.2f}, {ref_shape:.3f}, {mean('ref_d_max', g):.3f}")
    both = [r for r in rows if r["ref_draws"] and r["share"] > 0]
    print(f"all {len(rows)} slices: D_max {mean('d_max', rows):.3f} against {mean('ref_d_max', rows):.3f}; where both "
          f"draw ({len(both)}): shape {mean('shape', both):.3f} against {mean('ref_d_max', both):.3f}")
    # the sampler's shapes, drawn where the reference draws (its empty mask elsewhere); a slice the sampler never
    # draws keeps its own D_max
    with_ref = [r["shape"] if r["ref_draws"] and r["share"] > 0 else r["ref_d_max"] if not r["ref_draws"]
                else r["d_max"] for r in rows]
    # the sampler's shapes, drawn at the raters' own share (its own samples where it never draws)
    at_raters = [r["rater_share"] * r["shape"] + (1 - r["rater_share"]) * r["empty_score"] if r["share"] > 0
                 else r["d_max"] for r in rows]
    print(f"the sampler's shapes with the reference's presence: {np.mean(with_ref):.3f}; drawn at the raters' share: "
          f"{np.mean(at_raters):.3f}")


if __name__ == "__main__":
    main()
