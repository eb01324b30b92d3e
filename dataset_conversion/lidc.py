"""``nnUNetv2_arseg_convert_lidc``: LIDC-IDRI crops with four raters -> nnU-Net raw dataset (docs/design.md,
"Multi-rater datasets").

``labelsTr/<case>.png`` holds the consensus (strict majority of the raters, > R/2) so every stock nnU-Net tool works;
``labelsTr_raters/<case>_r<k>.png`` holds each rater (0/1); ``dataset.json["arseg"]`` names both and maps every case
to its patient. The test set (``imagesTs``, ``labelsTs``, ``labelsTs_raters``) is held out by patient.

The image channel is named ``"zscore"``: the crops are windowed 8-bit grey levels, not Hounsfield units, so nnU-Net's
"CT" scheme (clipping to percentiles of the intensities under the labels, dataset-wide) has no fixed scale to exploit
and would clip the lung around small nodules; a per-image z-score is the honest choice.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
from tqdm import tqdm

from dataset_conversion.lidc_layouts import (NUM_RATERS, LidcSlice, RaterCase, find_lidc_slices,
                                             find_rater_cases)
from dataset_conversion.raw_dataset import (CONVERTED_BY, ConversionError, check_unique_cases, converter_parser,
                                            dataset_folder_name, left_out_record, name_list, report_left_out,
                                            run_converter, save_png, staged_dataset)
from nnunet_arseg.io_checks import IncompleteFileError, check_complete

__all__ = ["LidcSlice", "find_lidc_slices", "consensus", "binarize_mask", "split_by_patient", "convert_lidc", "main"]

DEEPMIND_CROP = 128  # the AR-Seg paper centre-crops the 180x180 DeepMind crops to 128x128


def consensus(masks_RHW: np.ndarray) -> np.ndarray:
    """Strict majority of the raters (> R/2); ties go to background. uint8 0/1."""
    return (2 * masks_RHW.astype(np.int32).sum(0) > masks_RHW.shape[0]).astype(np.uint8)


def _read_gray(path: Path, what: str) -> np.ndarray:
    from PIL import Image

    if not path.is_file():
        raise ConversionError(f"{path}: {what} is missing; every image needs its {NUM_RATERS} rater masks "
                              "(restore the file or remove the whole case from the input)")
    try:
        check_complete(path)
    except IncompleteFileError as e:
        raise ConversionError(f"{path}: cannot read the {what}: {e.reason}; replace the file or remove the "
                              "case") from None
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except Exception as e:  # PIL raises many types for broken files
        raise ConversionError(f"{path}: cannot read the {what} ({e}); replace the file or remove the case") from e
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and (arr[..., :3] == arr[..., :1]).all():
        arr = arr[..., 0]
    if arr.ndim != 2 or arr.dtype not in (np.uint8, np.uint16, np.bool_):
        raise ConversionError(f"{path}: the {what} must be a grey-level 2D image, got shape {arr.shape} "
                              f"dtype {arr.dtype}; convert it to 8-bit grey PNG")
    return arr


def binarize_mask(mask: np.ndarray, path: Path | str, threshold: float | None = None) -> np.ndarray:
    """0/1 and 0/255 masks as they are; anything else only with ``threshold`` (mask > threshold)."""
    values = np.unique(mask)
    if set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}:
        return mask > 0
    if threshold is None:
        raise ConversionError(f"{path}: mask values {values[:6].tolist()}{'...' if len(values) > 6 else ''} are "
                              "not binary (0/1 or 0/255); lossy (JPEG) masks need a threshold: pass --threshold 127")
    return mask > threshold


def _center_crop(arr_HW: np.ndarray, size: int, path: Path) -> np.ndarray:
    h, w = arr_HW.shape
    if h < size or w < size:
        raise ConversionError(f"{path}: {h}x{w} is smaller than the {size}x{size} centre crop; pass --no_crop")
    top, left = (h - size) // 2, (w - size) // 2
    return arr_HW[top:top + size, left:left + size]


def load_case(rc: RaterCase, threshold: float | None = None, crop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Image ``(H, W)`` and rater masks ``(R, H, W)`` bool of one case, checked."""
    image = _read_gray(rc.image, "image")
    masks = []
    for k, path in enumerate(rc.raters):
        mask = _read_gray(path, f"rater {k} mask")
        if mask.shape != image.shape:
            raise ConversionError(f"{path}: rater {k} mask is {mask.shape[0]}x{mask.shape[1]} but its image "
                                  f"{rc.image} is {image.shape[0]}x{image.shape[1]}; masks must match their image")
        masks.append(binarize_mask(mask, path, threshold))
    if crop is not None:
        image = _center_crop(image, crop, rc.image)
        masks = [_center_crop(m, crop, rc.image) for m in masks]
    return image, np.stack(masks)


def split_by_patient(patients: list[str], test_fraction: float, seed: int) -> set[str]:
    """Seeded choice of the test patients: ``round(fraction * n)``, at least one each side when both are asked."""
    if not 0 <= test_fraction < 1:
        raise ConversionError(f"--test_fraction must be in [0, 1), got {test_fraction}")
    unique = sorted(set(patients))
    n_test = int(round(test_fraction * len(unique)))
    if test_fraction > 0 and len(unique) > 1:
        n_test = min(max(n_test, 1), len(unique) - 1)
    order = np.random.default_rng(seed).permutation(len(unique))
    return {unique[i] for i in order[:n_test]}


def convert_lidc(input_folder: str | Path, raw_folder: str | Path, dataset_id: int, name: str = "LIDC",
                 test_fraction: float | None = None, seed: int = 12345, threshold: float | None = None,
                 no_crop: bool = False, overwrite: bool = False, progress: bool = True,
                 test_input_folder: str | Path | None = None, strict: bool = False) -> Path:
    """Convert one LIDC layout to ``raw_folder/DatasetXXX_NAME``; returns that folder.

    The layout's own split is kept unless ``test_fraction`` is given (then patients are re-split, seeded);
    layouts without a split use ``test_fraction`` (default 0.2). ``test_input_folder`` (same layout) gives the
    test set explicitly: all of ``input_folder`` is then training data. What does not fit the layout is named in
    one warning before anything is written (``report_left_out``); ``strict`` refuses instead.
    """
    layout, cases, left_out = find_rater_cases(input_folder)
    if test_input_folder is not None:
        if test_fraction is not None:
            raise ConversionError("give either a test folder (--test_input) or --test_fraction, not both")
        test_layout, test_cases, test_left_out = find_rater_cases(test_input_folder)
        if test_layout != layout:
            raise ConversionError(f"{test_input_folder} is in the {test_layout} layout but {input_folder} in the "
                                  f"{layout} layout; give both in the same layout")
        cases = [replace(rc, split="train") for rc in cases] + [replace(rc, split="test") for rc in test_cases]
        left_out.update(test_left_out)
    report_left_out(left_out, strict, f"Rename them to the {layout} layout's names if they hold cases")
    sources: dict[str, list[str]] = {}
    for rc in cases:
        sources.setdefault(rc.case, []).append(str(rc.image))
    check_unique_cases(sources)
    patients = [rc.patient for rc in cases]
    if test_fraction is None and all(rc.split is not None for rc in cases):
        is_test = [rc.split == "test" for rc in cases]
        straddle = {p for p, t in zip(patients, is_test) if t} & {p for p, t in zip(patients, is_test) if not t}
        if straddle:
            raise ConversionError(f"{input_folder}: patient {sorted(straddle)[0]} is in both the training and the test "
                                  "split of the layout; pass --test_fraction to re-split by patient")
        split_source = "layout"
    else:
        test_patients = split_by_patient(patients, 0.2 if test_fraction is None else test_fraction, seed)
        is_test = [p in test_patients for p in patients]
        split_source = f"by patient, test_fraction={0.2 if test_fraction is None else test_fraction}, seed={seed}"
    if not any(is_test) and test_fraction != 0:
        raise ConversionError(_empty_test_set_message(input_folder, split_source, sorted(set(patients))))
    crop = DEEPMIND_CROP if layout == "deepmind" and not no_crop else None

    with staged_dataset(raw_folder, dataset_id, name, overwrite) as out:
        for sub in ("imagesTr", "labelsTr", "labelsTr_raters", "imagesTs", "labelsTs", "labelsTs_raters"):
            (out / sub).mkdir()
        empty_rater = empty_consensus = 0
        for rc, test in tqdm(list(zip(cases, is_test)), desc="LIDC cases", disable=not progress):
            image, masks_RHW = load_case(rc, threshold, crop)
            s = "Ts" if test else "Tr"
            save_png(image, out / f"images{s}" / f"{rc.case}_0000.png")
            cons = consensus(masks_RHW)
            save_png(cons, out / f"labels{s}" / f"{rc.case}.png")
            for k, mask in enumerate(masks_RHW):
                save_png(mask.astype(np.uint8), out / f"labels{s}_raters" / f"{rc.case}_r{k}.png")
            empty_rater += int((~masks_RHW.reshape(len(masks_RHW), -1).any(1)).sum())
            empty_consensus += int(not cons.any())
        n_test = int(sum(is_test))
        generate_dataset_json(
            str(out), channel_names={0: "zscore"}, labels={"background": 0, "nodule": 1},
            num_training_cases=len(cases) - n_test, file_ending=".png",
            dataset_name=dataset_folder_name(dataset_id, name),
            reference="LIDC-IDRI, The Cancer Imaging Archive; Armato et al. 2011",
            license="CC BY 3.0 (LIDC-IDRI, TCIA)", converted_by=CONVERTED_BY,
            description=f"LIDC-IDRI 2D crops ({layout} layout), {NUM_RATERS} raters; labelsTr = strict majority",
            arseg={"num_raters": NUM_RATERS, "raters_folder": "labelsTr_raters",
                   "test_raters_folder": "labelsTs_raters",
                   "patient_of_case": {rc.case: rc.patient for rc in cases}},
            arseg_conversion={"input": str(Path(input_folder).resolve()), "layout": layout, "split": split_source,
                              "threshold": threshold, "center_crop": crop, "left_out": left_out_record(left_out)})
    final = Path(raw_folder) / dataset_folder_name(dataset_id, name)
    test_patients = {p for p, t in zip(patients, is_test) if t}
    print(f"Wrote {final}\n  layout {layout}; {len(cases)} cases from {len(set(patients))} patients, "
          f"{NUM_RATERS} raters"
          f"\n  train {len(cases) - n_test} cases / {len(set(patients) - test_patients)} patients; "
          f"test {n_test} cases / {len(test_patients)} patients ({split_source})"
          f"\n  empty masks: {empty_rater / (NUM_RATERS * len(cases)):.1%} of rater masks, "
          f"{empty_consensus / len(cases):.1%} of consensus labels"
          + (f"\n  left out (not in the layout): {len(left_out)}, see the warning above" if left_out else ""))
    return final


def _empty_test_set_message(input_folder, split_source: str, patients: list[str]) -> str:
    if split_source == "layout":
        return (f"{input_folder}: the layout's own split has no test case; pass --test_fraction F to hold out a "
                "share of the patients, --test_input FOLDER for an explicit test set, or --test_fraction 0 to "
                "convert everything as training data")
    return (f"{input_folder}: {len(patients)} patient(s) ({name_list(patients)}) give an empty test set when the "
            "test set is held out by patient; add patients, give the test set with --test_input FOLDER, or pass "
            "--test_fraction 0 to convert everything as training data")


def main(argv: list[str] | None = None) -> None:
    parser = converter_parser("nnUNetv2_arseg_convert_lidc", __doc__.split("\n\n")[0],
                              "LIDC crops: LIDC-IDRI-slices, DeepMind or CIMD layout", "LIDC")
    parser.add_argument("--test_fraction", type=float, default=None,
                        help="share of patients held out as test set (default 0.2; the layout's own split when "
                             "it has one and this flag is not given)")
    parser.add_argument("--test_input", default=None,
                        help="a second folder (same layout) whose cases form the test set; all of -i is then training")
    parser.add_argument("--seed", type=int, default=12345, help="seed of the patient split")
    parser.add_argument("--threshold", type=float, default=None,
                        help="binarise non-binary (e.g. JPEG) masks as mask > T; use 127 for the CIMD layout")
    parser.add_argument("--no_crop", action="store_true", help="DeepMind layout: keep 180x180 (default: centre 128)")
    args = parser.parse_args(argv)
    run_converter(parser, args, lambda raw: convert_lidc(
        args.i, raw, args.d, args.n, args.test_fraction, args.seed, args.threshold, args.no_crop, args.overwrite,
        progress=not args.disable_progress_bar, test_input_folder=args.test_input, strict=args.strict))


if __name__ == "__main__":
    main()
