"""How much of the raters' presence the object they drew tells: the presence gap of a sampler that knows its outline.

    python benchmarks/research/presence_from_masks.py -raw RAW_DATASET_FOLDER

The presence gap of ``nnUNetv2_arseg_evaluate`` asks a sampler to draw as many non-empty masks as the image's raters
did. ``presence_floor.py`` bounds it for raters who draw independently given the image. This script asks how far
knowing the object takes a sampler: it describes each 2D case by the largest of its rater masks (area, extent,
compactness, distance from the centre, components, and the image inside, around and on the border of it: the object's
true outline, which an image model has to find for itself), fits P(a rater draws | those features) on the training
cases (every rater a target; logistic regression and gradient boosting) and reports, on the test cases, the gap of a
sampler that draws N masks systematically at that rate (``segmentor/presence.py``) and the correlation of the shares;
also of a sampler drawing the share with the least expected gap under P(raters' count | those features).
With ``--nodule``, cases named ``<patient>_n<K>_s<II>`` (the LIDC converter's names) add the largest object over the
slices of their nodule and the slice's distance from the nodule's first and last slice.
"""
from __future__ import annotations

import argparse
import re
from collections import defaultdict

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import join, subfiles
from scipy import ndimage

from nnunet_arseg.evaluation.casefiles import find_raw_dataset, load_dataset_json, rater_files_per_case
from nnunet_arseg.evaluation.multirater import presence_calibration

__all__ = ["median_share", "object_features", "systematic_gap"]

_NODULE_SLICE = re.compile(r"(.+)_n(\d+)_s(\d+)$")


def object_features(image_yx: np.ndarray, mask_yx: np.ndarray) -> list[float]:
    """What a 2D object looks like: area, extent, compactness, centre distance, components, and the image inside,
    around and on its border (zeros for an empty mask)."""
    if not mask_yx.any():
        return [0.0] * 11
    ring = ndimage.binary_dilation(mask_yx, iterations=4) & ~mask_yx
    border = mask_yx & ~ndimage.binary_erosion(mask_yx)
    yy, xx = np.nonzero(mask_yx)
    centre = (np.array(mask_yx.shape) - 1) / 2
    inside = image_yx[mask_yx]
    edge = np.hypot(*np.gradient(image_yx))[border].mean()
    return [np.log1p(mask_yx.sum()), inside.mean() - image_yx[ring].mean(), inside.max(), inside.mean(), inside.std(),
            edge, border.sum() / np.sqrt(mask_yx.sum()), np.hypot(yy.mean() - centre[0], xx.mean() - centre[1]),
            ndimage.label(mask_yx)[1], np.ptp(yy) + 1, np.ptp(xx) + 1]


def systematic_gap(p: np.ndarray, raters_share: np.ndarray, num_samples: int) -> float:
    """Expected mean |share of non-empty samples - raters' share| of a sampler that draws floor(pN) or floor(pN) + 1
    non-empty masks of N, the second with probability frac(pN) (systematic sampling)."""
    k0 = np.floor(p * num_samples)
    frac = p * num_samples - k0
    return float(np.mean((1 - frac) * np.abs(k0 / num_samples - raters_share)
                         + frac * np.abs((k0 + 1) / num_samples - raters_share)))


def median_share(proba_CK: np.ndarray, counts_K: np.ndarray, num_raters: int, num_samples: int) -> np.ndarray:
    """Per case, the share of non-empty samples (a multiple of 1/N) with the least expected gap under a predicted
    distribution ``proba_CK`` over the raters' counts ``counts_K``: the median of count / M, which a calibrated
    rate need not be (the gap is an absolute difference)."""
    grid_G = np.arange(num_samples + 1) / num_samples
    loss_CG = (proba_CK[:, None, :] * np.abs(grid_G[None, :, None] - counts_K / num_raters)).sum(-1)
    return grid_G[loss_CG.argmin(1)]


def load_cases(raw: str, dataset_json: dict, images: str, raters_folder: str):
    """(case names, object features of the largest rater mask, raters' present (cases, M) bool, its largest area)."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    ext = dataset_json["file_ending"]
    raters_of = rater_files_per_case([join(raw, raters_folder)], ext)
    image_files = set(subfiles(join(raw, images), join=False))
    cases = sorted(c for c in raters_of if c + "_0000" + ext in image_files)
    if not cases:
        raise FileNotFoundError(f"{join(raw, raters_folder)}: no rater files with an image in {join(raw, images)}")
    io = determine_reader_writer_from_dataset_json(dataset_json, join(raw, images, cases[0] + "_0000" + ext))()
    feats, present, largest = [], [], []
    for case in cases:
        image = io.read_images([join(raw, images, case + "_0000" + ext)])[0][0].astype(float)  # (Z, Y, X)
        masks = np.stack([io.read_seg(f)[0][0] > 0 for f in raters_of[case]])
        if image.shape[0] != 1:
            raise ValueError(f"{case}: a 3D image ({image.shape[0]} slices); this benchmark describes 2D objects only")
        image, masks = image[0], masks[:, 0]
        areas = masks.reshape(len(masks), -1).sum(1)
        feats.append(object_features(image, masks[int(areas.argmax())]))
        present.append(areas > 0)
        largest.append(float(areas.max()))
    return cases, np.array(feats), np.array(present), np.array(largest)


def nodule_features(cases: list[str], largest: np.ndarray) -> np.ndarray:
    """Per case: log of the largest rater area over its nodule's slices, distance (slices) from the nodule's first
    and last slice, log of the nodule's slice count."""
    keys = []
    for case in cases:
        m = _NODULE_SLICE.fullmatch(case)
        if m is None:
            raise ValueError(f"--nodule: case {case} is not named <patient>_n<K>_s<II> (the LIDC converter's names)")
        keys.append(((m.group(1), m.group(2)), int(m.group(3))))
    members = defaultdict(list)
    for i, (nodule, s) in enumerate(keys):
        members[nodule].append((s, i))
    out = np.zeros((len(cases), 3))
    for lst in members.values():
        lst.sort()
        top = max(largest[i] for _, i in lst)
        for j, (_, i) in enumerate(lst):
            out[i] = [np.log1p(top), min(j, len(lst) - 1 - j), np.log(len(lst))]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-raw", required=True, help="raw nnU-Net dataset folder with rater folders (dataset.json 'arseg')")
    p.add_argument("--num_samples", type=int, default=16, help="N of the sampler (default 16, as the evaluations)")
    p.add_argument("--nodule", action="store_true", help="add nodule-level features (LIDC converter's case names)")
    args = p.parse_args()
    from sklearn.base import clone
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    raw = find_raw_dataset(raw_folder=args.raw)
    ds = load_dataset_json(raw)
    arseg = ds.get("arseg") or {}
    if not arseg.get("num_raters"):
        raise ValueError(f"{raw}/dataset.json: no 'arseg' block with num_raters; a multi-rater dataset is needed")
    splits = {}
    for name, images, raters in (("train", "imagesTr", arseg.get("raters_folder", "labelsTr_raters")),
                                 ("test", "imagesTs", arseg.get("test_raters_folder", "labelsTs_raters"))):
        cases, feats, present, largest = load_cases(raw, ds, images, raters)
        if args.nodule:
            feats = np.concatenate([feats, nodule_features(cases, largest)], 1)
        splits[name] = (feats, present)
        print(f"{name}: {len(cases)} cases")
    (x_tr, y_tr), (x_te, y_te) = splits["train"], splits["test"]
    M = y_tr.shape[1]
    share_te = y_te.mean(1)
    models = {"logistic regression": make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
              "gradient boosting": HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, random_state=0)}
    what = "largest rater mask" + (" + nodule" if args.nodule else "")
    for name, model in models.items():
        model.fit(np.repeat(x_tr, M, 0), y_tr.reshape(-1))
        p_te = model.predict_proba(x_te)[:, 1]
        corr = presence_calibration(p_te, share_te)["presence_correlation"]
        print(f"{what}, {name}: test presence gap {systematic_gap(p_te, share_te, args.num_samples):.3f}, "
              f"correlation {corr:.3f}")
    counts = clone(models["gradient boosting"]).fit(x_tr, y_tr.sum(1))
    median = presence_calibration(median_share(counts.predict_proba(x_te), counts.classes_, M, args.num_samples),
                                  share_te)
    print(f"{what}, gradient boosting on the raters' count, median share: test presence gap "
          f"{median['presence_gap']:.3f}, correlation {median['presence_correlation']:.3f}")


if __name__ == "__main__":
    main()
