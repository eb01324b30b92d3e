"""``nnUNetv2_arseg_convert_folders``: a lab's multi-rater data as ``images/`` + one folder per rater -> nnU-Net raw
dataset (docs/your-data.md).

    INPUT/images/<case><ext>          one image per case (or <case>_0000<ext>, <case>_0001<ext>, ... per channel)
    INPUT/<rater folder>/<case><ext>  one folder per rater, a mask per case that rater drew (a rater may skip cases)

``<ext>`` is any file ending nnU-Net reads (``.png`` 2D; ``.nii.gz`` 2D or 3D; ...), the same for images and masks.
Rater k is the k-th rater folder (``--raters``, default every subfolder but ``images`` by name), so its masks go to
``labelsTr_raters/<case>_r<k><ext>`` whether or not the case has the raters before it. ``labelsTr/<case><ext>``
gets the consensus: per label, the strict majority of the raters the case has (> R_case / 2); a tie or no
majority is background. Masks are binary (any ``{0, k}``, e.g. 0/255, becomes 0/1) unless ``--labels`` declares
several labels. ``dataset.json["arseg"]`` holds ``num_raters`` (the number of rater folders), the rater folder
names, ``raters_of_case`` (only where some case lacks a rater) and ``patient_of_case`` (``--patient_regex`` or
``--patient_csv``).
"""
from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
from nnunetv2.imageio.reader_writer_registry import LIST_OF_IO_CLASSES, determine_reader_writer_from_file_ending
from tqdm import tqdm

from dataset_conversion.lidc import consensus, split_by_patient
from dataset_conversion.raw_dataset import (CONVERTED_BY, ConversionError, check_case_id, converter_parser,
                                            copy_file, dataset_folder_name, input_entries, left_out_record,
                                            name_list, report_left_out, run_converter, staged_dataset)
from nnunet_arseg.atomic import write_atomic
from nnunet_arseg.io_checks import IncompleteFileError, check_complete

__all__ = ["FolderCase", "find_folder_cases", "parse_labels", "to_label_map", "consensus_labels", "patients_of",
           "convert_folders", "main"]

IMAGES = "images"
_CHANNEL = re.compile(r"^(.+)_(\d{4})$")


@dataclass(frozen=True)
class FolderCase:
    """One case of the input: its image files (channel order) and the mask file of each rater k that drew it."""
    case: str
    images: tuple[Path, ...]
    raters: dict[int, Path]
    test: bool = False


def _endings() -> list[str]:
    """File endings nnU-Net can read, longest first (``.nii.gz`` before ``.gz``-less matches)."""
    return sorted({e for rw in LIST_OF_IO_CLASSES for e in rw.supported_file_endings}, key=len, reverse=True)


def _split_ending(name: str) -> tuple[str, str] | None:
    return next(((name[:-len(e)], e) for e in _endings() if name.lower().endswith(e) and len(name) > len(e)), None)


def _scan_images(folder: Path) -> tuple[str, dict[str, tuple[Path, ...]], dict[str, str]]:
    """(file ending, {case: channel files}, left out {path: why}) of an ``images/`` folder."""
    if not folder.is_dir():
        raise ConversionError(f"{folder}: no such folder; the input needs images/<case><ext> beside one folder per "
                              "rater (docs/your-data.md)")
    by_ending: dict[str, list[tuple[str, Path]]] = {}
    left_out = {}
    for p in input_entries(folder):
        split = _split_ending(p.name)
        if p.is_dir():
            left_out[str(p)] = f"a folder; {IMAGES}/ holds one file per case (or per channel)"
        elif split is None:
            left_out[str(p)] = "not a file ending nnU-Net reads"
        else:
            by_ending.setdefault(split[1].lower(), []).append((split[0], p))
    if not by_ending:
        raise ConversionError(f"{folder}: no image nnU-Net can read (endings {', '.join(_endings())})")
    if len(by_ending) > 1:
        counts = ", ".join(f"{len(v)} {e}" for e, v in sorted(by_ending.items()))
        raise ConversionError(f"{folder}: images with different file endings ({counts}); nnU-Net needs one file "
                              "ending per dataset: convert them to one format")
    ending, named = next(iter(by_ending.items()))
    channels: dict[str, dict[int, Path]] = {}
    for stem, p in named:
        m = _CHANNEL.match(stem)
        case, ch = (m.group(1), int(m.group(2))) if m else (stem, 0)
        if ch in channels.setdefault(case, {}):
            raise ConversionError(f"{p} and {channels[case][ch]} are both channel {ch} of case {case!r}; name "
                                  f"channel files <case>_0000{ending}, <case>_0001{ending}, ... or one file <case>"
                                  f"{ending} per case")
        channels[case][ch] = p
    n = Counter(len(c) for c in channels.values()).most_common(1)[0][0]
    images = {}
    for case, files in sorted(channels.items()):
        check_case_id(case, files[min(files)])
        if sorted(files) != list(range(n)):
            raise ConversionError(f"{folder}: case {case!r} has channel files {sorted(files)} but most cases have "
                                  f"0..{n - 1}; every case needs the same channels <case>_0000{ending} ... "
                                  f"<case>_{n - 1:04d}{ending} (a name ending in '_' + 4 digits is read as a "
                                  "channel file: rename other such files)")
        images[case] = tuple(files[ch] for ch in range(n))
    return ending, images, left_out


def find_folder_cases(input_folder: str | Path, rater_names: list[str] | None = None
                      ) -> tuple[str, list[FolderCase], list[str], dict[str, str]]:
    """(file ending, cases, rater folder names, left out {path: why}) of an ``images/`` + rater folders input.

    Folders that ``rater_names`` leaves out are the user's choice and not reported."""
    root = Path(input_folder)
    ending, images, left_out = _scan_images(root / IMAGES)
    top = input_entries(root, documents=False)
    left_out.update({str(p): f"a file beside {IMAGES}/ and the rater folders" for p in top if not p.is_dir()})
    if rater_names is None:
        rater_names = [p.name for p in top if p.is_dir() and p.name != IMAGES]
    if not rater_names:
        raise ConversionError(f"{root}: no rater folder beside {IMAGES}/; add one folder of masks per rater "
                              f"(<rater>/<case>{ending})")
    if len(set(rater_names)) != len(rater_names):
        raise ConversionError(f"--raters names a folder twice: {rater_names}; give each rater folder once")
    raters: dict[str, dict[int, Path]] = {}
    for k, name in enumerate(rater_names):
        folder = root / name
        if name == IMAGES or not folder.is_dir():
            raise ConversionError(f"{folder}: rater folder {name!r} does not exist in {root}; --raters takes the "
                                  f"names of subfolders of -i other than {IMAGES}")
        found = 0
        for p in input_entries(folder):
            split = _split_ending(p.name)
            if p.is_dir() or split is None or split[1].lower() != ending:
                left_out[str(p)] = ("a folder; a rater folder holds one mask file per case" if p.is_dir() else
                                    f"not a {ending} mask like the images")
                continue
            if split[0] not in images:
                raise ConversionError(f"{p}: rater mask of case {split[0]!r}, which has no image in {root / IMAGES}; "
                                      f"add the image or remove the mask (masks are named as their image, without "
                                      f"a channel suffix)")
            raters.setdefault(split[0], {})[k] = p
            found += 1
        if not found:
            raise ConversionError(f"{folder}: rater folder holds no {ending} mask; remove it, or name its masks "
                                  f"<case>{ending} as the images")
    no_rater = [c for c in images if c not in raters]
    if no_rater:
        raise ConversionError(f"{images[no_rater[0]][0]}: image of case {no_rater[0]!r} has no mask in any rater "
                              f"folder ({', '.join(rater_names)}); every case needs at least one rater: add its masks "
                              f"or remove the image ({len(no_rater)} such case(s): {name_list(no_rater)})")
    cases = [FolderCase(c, images[c], dict(sorted(raters[c].items()))) for c in sorted(images)]
    return ending, cases, list(rater_names), left_out


def parse_labels(specs: list[str] | None) -> tuple[list[str], list[int] | None]:
    """``--labels`` -> (foreground label names, their values in the masks or None for binary masks).

    ``None`` or one ``NAME``: binary masks (any ``{0, k}``); ``NAME=VALUE ...`` or several names (values 1, 2, ...
    in order): label maps. The output labels are 1..L in the given order."""
    if not specs:
        return ["foreground"], None
    names, values = [], []
    for i, spec in enumerate(specs, start=1):
        name, _, value = spec.partition("=")
        if not name or name == "background" or (value and not value.isdigit()) or value == "0":
            raise ConversionError(f"--labels {spec!r}: give NAME or NAME=VALUE with VALUE the label's (> 0) "
                                  "value in the masks, e.g. --labels liver=1 tumour=2 (background is 0)")
        names.append(name)
        values.append(int(value) if value else i)
    if len(set(names)) != len(names) or len(set(values)) != len(values):
        raise ConversionError(f"--labels {' '.join(specs)}: each label needs its own name and value")
    binary = len(specs) == 1 and "=" not in specs[0]
    return names, None if binary else values


def to_label_map(mask: np.ndarray, path: Path, values: list[int] | None, threshold: float | None) -> np.ndarray:
    """uint8 label map 0..L of one rater mask: binary ``{0, k}`` -> 0/1 (``values`` None), else ``values[i]`` ->
    i + 1; ``threshold``: mask > threshold (lossy binary masks)."""
    if threshold is not None:
        return (mask > threshold).astype(np.uint8)
    found = np.unique(mask)
    shown = f"{[int(v) if float(v).is_integer() else float(v) for v in found[:6]]}{'...' if len(found) > 6 else ''}"
    if not np.array_equal(found, np.round(found)):
        raise ConversionError(f"{path}: mask values {shown} are not whole numbers; lossy or smoothed masks need a "
                              "threshold (--threshold 127 for 8-bit ones)")
    if values is None:
        if len(found[found != 0]) > 1:
            raise ConversionError(f"{path}: mask values {shown} are not binary ({{0, k}}, e.g. 0/1 or 0/255). If "
                                  "the masks hold several labels, declare them: --labels NAME=VALUE ... (e.g. "
                                  "--labels liver=1 tumour=2); if they are lossy (JPEG, resampled), pass "
                                  "--threshold T")
        return (mask != 0).astype(np.uint8)
    unknown = sorted(set(found.tolist()) - {0, *values})
    if unknown:
        raise ConversionError(f"{path}: mask values {[int(v) for v in unknown][:6]} are not among the declared "
                              f"labels {values} (--labels); declare every value the masks use, or fix the mask")
    out = np.zeros(mask.shape, np.uint8)
    for i, v in enumerate(values, start=1):
        out[mask == v] = i
    return out


def consensus_labels(maps_RX: np.ndarray, num_labels: int) -> np.ndarray:
    """Per label, the strict majority of the R raters' label maps (> R / 2); a tie or no majority is background."""
    out = np.zeros(maps_RX.shape[1:], np.uint8)
    for label in range(1, num_labels + 1):
        out[consensus(maps_RX == label) > 0] = label  # two labels cannot both hold > R / 2
    return out


def patients_of(cases: list[str], regex: str | None = None, csv_file: str | Path | None = None) -> dict | None:
    """{case: patient} from ``regex`` (its first group, else its match, at the start of the case id) or from a CSV
    with the columns ``case,patient``; None when neither is given."""
    if regex is not None and csv_file is not None:
        raise ConversionError("give either --patient_regex or --patient_csv, not both")
    if regex is not None:
        try:
            pattern = re.compile(regex)
        except re.error as e:
            raise ConversionError(f"--patient_regex {regex!r} is not a valid regular expression ({e})") from None
        out = {}
        for c in cases:
            m = pattern.match(c)
            if m is None or not (m.group(1) if pattern.groups else m.group(0)):
                raise ConversionError(f"case {c!r}: --patient_regex {regex!r} does not match its start (or its "
                                      "group is empty); fix the expression (e.g. '^(LIDC-IDRI-\\d+)') so that "
                                      "every case id yields its patient")
            out[c] = m.group(1) if pattern.groups else m.group(0)
        return out
    if csv_file is None:
        return None
    path = Path(csv_file)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise ConversionError(f"{path}: cannot read the patient CSV ({e.strerror})") from None
    if not rows or not {"case", "patient"} <= set(rows[0]):
        raise ConversionError(f"{path}: the patient CSV needs a header line 'case,patient' and one row per case")
    table: dict[str, str] = {}
    for i, row in enumerate(rows, start=2):
        case, patient = (row["case"] or "").strip(), (row["patient"] or "").strip()
        if not patient or table.get(case, patient) != patient:
            raise ConversionError(f"{path}, line {i}: case {case!r} has an empty or second patient; give each case "
                                  "one patient")
        table[case] = patient
    missing = [c for c in cases if c not in table]
    if missing:
        raise ConversionError(f"{path}: {len(missing)} case(s) have no row: {name_list(missing)}; add a line "
                              "'case,patient' for each")
    return {c: table[c] for c in cases}


def _read(rw, files: tuple[Path, ...], what: str) -> tuple[np.ndarray, dict]:
    for f in files:
        try:
            check_complete(f)
        except IncompleteFileError as e:
            raise ConversionError(f"{f}: cannot read the {what}: {e.reason}; replace the file") from None
    try:
        return rw.read_images([str(f) for f in files])
    except Exception as e:  # the readers raise many types (and bare RuntimeErrors after printing why)
        raise ConversionError(f"{name_list([str(f) for f in files])}: cannot read the {what} with nnU-Net's "
                              f"{type(rw).__name__} ({type(e).__name__}: {str(e).strip()[:200]}); the files of a "
                              "case must be readable and share one grid") from e


def _rater_map(rw, path: Path, image_CZYX: np.ndarray, props: dict, values, threshold) -> np.ndarray:
    """The (Z, Y, X) label map of one rater mask, checked against its image."""
    mask_CZYX, mask_props = _read(rw, (path,), "rater mask")
    if mask_CZYX.shape[0] in (3, 4) and (mask_CZYX[:3] == mask_CZYX[:1]).all():
        mask_CZYX = mask_CZYX[:1]  # a grey mask stored as RGB(A)
    if mask_CZYX.shape[0] != 1:
        raise ConversionError(f"{path}: a rater mask must be one grey label image, got {mask_CZYX.shape[0]} "
                              "channels; save it as a single-channel (grey) image")
    if mask_CZYX.shape[1:] != image_CZYX.shape[1:]:
        raise ConversionError(f"{path}: rater mask has shape {mask_CZYX.shape[1:]} but its image has "
                              f"{image_CZYX.shape[1:]} (z, y, x); a mask must be on its image's grid")
    if not np.allclose(mask_props["spacing"], props["spacing"], rtol=1e-3):
        raise ConversionError(f"{path}: rater mask spacing {tuple(mask_props['spacing'])} differs from its image's "
                              f"{tuple(props['spacing'])}; a mask must be on its image's grid")
    return to_label_map(mask_CZYX[0], path, values, threshold)


def convert_folders(input_folder: str | Path, raw_folder: str | Path, dataset_id: int, name: str = "MultiRater",
                    rater_names: list[str] | None = None, labels: list[str] | None = None,
                    patient_regex: str | None = None, patient_csv: str | Path | None = None,
                    channel_names: list[str] | None = None, test_fraction: float = 0.0,
                    test_input_folder: str | Path | None = None, seed: int = 12345,
                    threshold: float | None = None, overwrite: bool = False, progress: bool = True,
                    strict: bool = False) -> Path:
    """Convert ``images/`` + rater folders to ``raw_folder/DatasetXXX_NAME``; returns that folder.

    Test cases: ``test_input_folder`` (same layout, same rater folders) or ``test_fraction`` of the patients
    (seeded); by default every case is training data. What does not fit the layout is named in one warning before
    anything is written (``report_left_out``); ``strict`` refuses instead."""
    label_names, values = parse_labels(labels)
    ending, cases, rater_names, left_out = find_folder_cases(input_folder, rater_names)
    if test_input_folder is not None:
        if test_fraction:
            raise ConversionError("give either a test folder (--test_input) or --test_fraction, not both")
        test_ending, test_cases, _, test_left_out = find_folder_cases(test_input_folder, rater_names)
        if test_ending != ending:
            raise ConversionError(f"{test_input_folder}: test images are {test_ending} but training images "
                                  f"{ending}; give both in one format")
        dup = sorted({c.case for c in cases} & {c.case for c in test_cases})
        if dup:
            raise ConversionError(f"case id {dup[0]!r} is in both {input_folder} and {test_input_folder}; each case "
                                  "must be in one of them")
        cases += [replace(c, test=True) for c in test_cases]
        left_out.update(test_left_out)
    report_left_out(left_out, strict, f"Rename them to the layout's names ({IMAGES}/<case>{ending}, "
                                      f"<rater>/<case>{ending}) if they hold cases")
    patient_of_case = patients_of([c.case for c in cases], patient_regex, patient_csv)
    patient = patient_of_case or {c.case: c.case for c in cases}
    if test_fraction:
        test_patients = split_by_patient([patient[c.case] for c in cases], test_fraction, seed)
        if not test_patients:
            raise ConversionError(f"--test_fraction {test_fraction} of {len(set(patient.values()))} patient(s) "
                                  "gives an empty test set; raise it, add patients or give --test_input")
        cases = [replace(c, test=patient[c.case] in test_patients) for c in cases]
    rw = determine_reader_writer_from_file_ending(ending, str(cases[0].images[0]), verbose=False)()
    num_raters = len(rater_names)

    with staged_dataset(raw_folder, dataset_id, name, overwrite) as out:
        for sub in ("imagesTr", "labelsTr", "labelsTr_raters", "imagesTs", "labelsTs", "labelsTs_raters"):
            (out / sub).mkdir()
        file_channels = None
        empty_rater = 0
        for c in tqdm(cases, desc="cases", disable=not progress):
            image_CZYX, props = _read(rw, c.images, "image")
            if file_channels is None:
                file_channels = image_CZYX.shape[0]
            elif image_CZYX.shape[0] != file_channels:
                raise ConversionError(f"{c.images[0]}: case {c.case!r} has {image_CZYX.shape[0]} image channel(s) "
                                      f"but {cases[0].case!r} has {file_channels}; every case needs the same "
                                      "channels (e.g. all grey or all RGB)")
            maps_RZYX = np.stack([_rater_map(rw, p, image_CZYX, props, values, threshold) for p in c.raters.values()])
            s = "Ts" if c.test else "Tr"
            for ch, src in enumerate(c.images):
                copy_file(src, out / f"images{s}" / f"{c.case}_{ch:04d}{ending}")
            _write_seg(rw, consensus_labels(maps_RZYX, len(label_names)), out / f"labels{s}" / f"{c.case}{ending}",
                       props)
            for k, m in zip(c.raters, maps_RZYX):
                _write_seg(rw, m, out / f"labels{s}_raters" / f"{c.case}_r{k}{ending}", props)
            empty_rater += int((~maps_RZYX.reshape(len(maps_RZYX), -1).any(1)).sum())
        if channel_names is not None and len(channel_names) != file_channels:
            raise ConversionError(f"--channel_names gives {len(channel_names)} name(s) but the images have "
                                  f"{file_channels} channel(s); give one nnU-Net normalisation name per channel "
                                  "(e.g. CT, zscore)")
        arseg = {"num_raters": num_raters, "raters_folder": "labelsTr_raters", "test_raters_folder": "labelsTs_raters",
                 "rater_names": rater_names}
        if any(len(c.raters) < num_raters for c in cases):
            arseg["raters_of_case"] = {c.case: sorted(c.raters) for c in cases}
        if patient_of_case is not None:
            arseg["patient_of_case"] = patient_of_case
        n_test = sum(c.test for c in cases)
        generate_dataset_json(
            str(out), channel_names=dict(enumerate(channel_names or ["zscore"] * file_channels)),
            labels={"background": 0, **{n: i for i, n in enumerate(label_names, start=1)}},
            num_training_cases=len(cases) - n_test, file_ending=ending,
            dataset_name=dataset_folder_name(dataset_id, name), converted_by=CONVERTED_BY,
            description=f"{num_raters} rater folders ({', '.join(rater_names)}); labelsTr = per-label strict "
                        "majority of the raters each case has",
            arseg=arseg,
            arseg_conversion={"input": str(Path(input_folder).resolve()),
                              "test_input": None if test_input_folder is None else str(Path(test_input_folder)
                                                                                        .resolve()),
                              "labels": labels, "threshold": threshold, "test_fraction": test_fraction,
                              "seed": seed, "left_out": left_out_record(left_out)})
    final = Path(raw_folder) / dataset_folder_name(dataset_id, name)
    counts = Counter(len(c.raters) for c in cases)
    n_masks = sum(counts[r] * r for r in counts)
    print(f"Wrote {final}\n  {len(cases)} cases ({len(cases) - n_test} train, {n_test} test) from "
          f"{len(set(patient.values()))} patients" + ("" if patient_of_case else " (each case its own patient)")
          + f", {file_channels} image channel(s), {ending}"
          f"\n  {num_raters} raters ({', '.join(rater_names)}); "
          + ", ".join(f"{counts[r]} case(s) with {r} rater(s)" for r in sorted(counts))
          + f"\n  labels: {', '.join(label_names)}; empty rater masks: {empty_rater / n_masks:.1%}")
    if patient_of_case is None:
        print("  No --patient_regex / --patient_csv: the folds (and any test split) treat every case as its own "
              "patient; if several cases come from one patient, give one so that none straddles a split")
    return final


def _write_seg(rw, seg_ZYX: np.ndarray, path: Path, props: dict) -> None:
    write_atomic(path, lambda tmp: rw.write_seg(seg_ZYX, tmp, props))


def main(argv: list[str] | None = None) -> None:
    parser = converter_parser("nnUNetv2_arseg_convert_folders", __doc__.split("\n\n")[0],
                              "input folder: images/ and one folder of masks per rater", "MultiRater")
    parser.add_argument("--raters", nargs="+", default=None,
                        help="the rater folders (subfolders of -i) in order: rater k = the k-th (default: every "
                             "subfolder but images/, by name)")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="foreground labels, numbered 1, 2, ... in the given order: NAME (one label, binary "
                             "masks: any {0, k} is 0/1) or NAME=VALUE ... (the label's value in the masks; NAME alone "
                             "means VALUE = its position). Default: one label 'foreground', binary masks")
    parser.add_argument("--patient_regex", default=None,
                        help="patient of each case: this regex matched at the start of the case id (its first group, "
                             "else the whole match), e.g. '^(LIDC-IDRI-\\d+)'; folds and test split keep patients "
                             "together")
    parser.add_argument("--patient_csv", default=None, help="patient of each case from a CSV with the columns "
                                                            "case,patient")
    parser.add_argument("--channel_names", nargs="+", default=None,
                        help="nnU-Net normalisation name per image channel (CT, zscore, noNorm, rescale_to_0_1, ...); "
                             "default zscore for each")
    parser.add_argument("--test_fraction", type=float, default=0.0,
                        help="share of patients held out as test set (imagesTs, labelsTs, labelsTs_raters); default 0")
    parser.add_argument("--test_input", default=None,
                        help="a second folder (same layout and rater folders) whose cases form the test set")
    parser.add_argument("--seed", type=int, default=12345, help="seed of the test split")
    parser.add_argument("--threshold", type=float, default=None,
                        help="binarise lossy masks as mask > T (one label only), e.g. 127")
    args = parser.parse_args(argv)
    if args.threshold is not None and args.labels and len(args.labels) > 1:
        parser.error("--threshold binarises masks: it needs a single label")
    run_converter(parser, args, lambda raw: convert_folders(
        args.i, raw, args.d, args.n, args.raters, args.labels, args.patient_regex, args.patient_csv,
        args.channel_names, args.test_fraction, args.test_input, args.seed, args.threshold, args.overwrite,
        progress=not args.disable_progress_bar, strict=args.strict))


if __name__ == "__main__":
    main()
