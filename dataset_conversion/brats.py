"""``nnUNetv2_arseg_convert_brats``: BraTS cases -> nnU-Net's region-based raw dataset, and predictions back.

Labels follow nnU-Net's own ``Dataset137_BraTS21.py`` (its functions do the work): BraTS 1 NCR/NET -> 2,
2 edema -> 1, 4 enhancing -> 3, with the regions whole tumour (1, 2, 3), tumour core (2, 3) and enhancing
tumour (3), ``regions_class_order`` (1, 2, 3). ``convert_brats_back`` (``nnUNetv2_arseg_convert_brats_back``)
maps predictions back to 0/1/2/4 (or 0/1/2/3 for data converted with 2023 labels).

Layouts:
- BraTS 2021: ``<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz``, labels 0/1/2/4. Cases without ``seg`` become
  test images.
- BraTS 2023 and later: ``<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz`` (read as t1, t1ce, t2, flair), labels 0/1/2/3
  with 3 = enhancing tumour, which is mapped to 2021's 4 first. ``--label_convention`` overrides the labels the
  file names imply (e.g. 2023 labels in files renamed to the 2021 layout).
- BRATS 2013/2015 (DeepMedic preprocessing): ``[train|validation|test/]<case>/{T1,T1c,T2,Flair}_subtrMeanDivStd.nii.gz``
  and ``OTMultiClass.nii.gz`` with 0 bg, 1 necrosis, 2 edema, 3 non-enhancing, 4 enhancing. Label 3 is merged
  into label 1 (NCR/NET, tumour core) before the mapping, as BraTS 2017+ merged it, so it cannot be recovered
  by the inverse mapping. ``test/`` cases go to ``imagesTs``/``labelsTs``.

Every file is read to its end first (a ``.nii.gz`` cut short is an error, not zeros).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.dataset_conversion.Dataset137_BraTS21 import (convert_labels_back_to_BraTS,
                                                             copy_BraTS_segmentation_and_convert_labels_to_nnUNet)
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
from tqdm import tqdm

from dataset_conversion.raw_dataset import (CONVERTED_BY, ConversionError, check_case_id, check_unique_cases,
                                            converter_parser, copy_file, dataset_folder_name, input_entries,
                                            left_out_record, name_list, report_left_out, run_converter,
                                            staged_dataset, warn)
from nnunet_arseg.atomic import write_atomic
from nnunet_arseg.io_checks import IncompleteFileError, check_complete

SEQUENCES = ("t1", "t1ce", "t2", "flair")  # nnU-Net's Dataset137 channel order
CHANNEL_NAMES = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "Flair"}
FILES_2015 = {"t1": "T1_subtrMeanDivStd.nii.gz", "t1ce": "T1c_subtrMeanDivStd.nii.gz",
              "t2": "T2_subtrMeanDivStd.nii.gz", "flair": "Flair_subtrMeanDivStd.nii.gz", "seg": "OTMultiClass.nii.gz"}
SUFFIXES_2023 = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"}
EXTRAS_2015 = ("brainmask.nii.gz",)  # DeepMedic's brain mask: part of that layout, not converted
LAYOUT_FILES = {"2021": "<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz",
                "2023": "<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz",
                "2015": "<case>/{T1,T1c,T2,Flair}_subtrMeanDivStd.nii.gz, OTMultiClass.nii.gz"}
LABEL_VALUES = {"2021": {0, 1, 2, 4}, "2023": {0, 1, 2, 3}, "2015": {0, 1, 2, 3, 4}}
LABELS = {"background": 0, "whole tumor": (1, 2, 3), "tumor core": (2, 3), "enhancing tumor": (3,)}
REGIONS_CLASS_ORDER = (1, 2, 3)
_SPLITS_2015 = {"train": "train", "validation": "train", "val": "train", "test": "test"}


@dataclass(frozen=True)
class BratsCase:
    case: str
    layout: str  # "2021", "2023" or "2015"
    sequences: dict[str, Path]  # sequence -> file, for every requested sequence (may not exist)
    seg: Path | None
    test: bool


def _case_2021(folder: Path, sequences: tuple[str, ...]) -> BratsCase:
    seg = folder / f"{folder.name}_seg.nii.gz"
    return BratsCase(check_case_id(folder.name, folder), "2021",
                     {s: folder / f"{folder.name}_{s}.nii.gz" for s in sequences}, seg if seg.is_file() else None,
                     test=not seg.is_file())


def _case_2023(folder: Path, sequences: tuple[str, ...]) -> BratsCase:
    seg = folder / f"{folder.name}-seg.nii.gz"
    return BratsCase(check_case_id(folder.name, folder), "2023",
                     {s: folder / f"{folder.name}-{SUFFIXES_2023[s]}.nii.gz" for s in sequences},
                     seg if seg.is_file() else None, test=not seg.is_file())


def _case_2015(folder: Path, sequences: tuple[str, ...]) -> BratsCase:
    seg = folder / FILES_2015["seg"]
    test = _SPLITS_2015.get(folder.parent.name.lower()) == "test" or not seg.is_file()
    return BratsCase(check_case_id(folder.name, folder), "2015", {s: folder / FILES_2015[s] for s in sequences},
                     seg if seg.is_file() else None, test)


def _as_case(folder: Path, sequences: tuple[str, ...]) -> BratsCase | None:
    if any((folder / f"{folder.name}_{s}.nii.gz").is_file() for s in (*SEQUENCES, "seg")):
        return _case_2021(folder, sequences)
    if any((folder / f"{folder.name}-{s}.nii.gz").is_file() for s in SUFFIXES_2023.values()):
        return _case_2023(folder, sequences)
    if any((folder / f).is_file() for f in FILES_2015.values()):
        return _case_2015(folder, sequences)
    return None


def _layout_names(folder: Path, layout: str) -> set[str]:
    """Every file name a case folder of ``layout`` may hold, the sequences not asked for included."""
    if layout == "2021":
        return {f"{folder.name}_{s}.nii.gz" for s in (*SEQUENCES, "seg")}
    if layout == "2023":
        return {f"{folder.name}-{s}.nii.gz" for s in SUFFIXES_2023.values()}
    return {*FILES_2015.values(), *EXTRAS_2015}


def _layouts_text() -> str:
    return ", ".join(f"{files} ({layout})" for layout, files in LAYOUT_FILES.items())


def find_brats_cases(root: str | Path, sequences: tuple[str, ...] = SEQUENCES
                     ) -> tuple[list[BratsCase], dict[str, str]]:
    """Case folders of any layout directly below ``root`` or below its split folders, sorted by case id, and what
    was left out ({path: why}): folders that are neither a case nor a folder of cases, files beside them and files
    of a case folder that its layout does not name."""
    root = Path(root)
    if not root.is_dir():
        raise ConversionError(f"input folder {root} does not exist; pass the folder with the BraTS cases with -i")
    found: list[tuple[Path, BratsCase]] = []
    left_out: dict[str, str] = {}
    for folder in input_entries(root, documents=False):
        case = _as_case(folder, sequences) if folder.is_dir() else None
        if case is not None:
            found.append((folder, case))
            continue
        inner = {sub: _as_case(sub, sequences) if sub.is_dir() else None
                 for sub in input_entries(folder, documents=False)} if folder.is_dir() else {}
        if not any(inner.values()):
            inner = {folder: None}  # neither a case nor a folder of cases: left out as a whole
        for sub, c in inner.items():
            if c is not None:
                found.append((sub, c))
            else:
                left_out[str(sub)] = "no BraTS case in it" if sub.is_dir() else "a file, not a case folder"
    for folder, case in found:
        names = _layout_names(folder, case.layout)
        left_out.update({str(p): f"not a file of the {case.layout} layout ({LAYOUT_FILES[case.layout]})"
                         for p in input_entries(folder, documents=False) if p.name not in names})
    cases = [c for _, c in found]
    if not cases:
        raise ConversionError(f"no BraTS case found in {root}: expected {_layouts_text()}")
    sources: dict[str, list[str]] = {}
    for c in cases:
        sources.setdefault(c.case, []).append(str(next(iter(c.sequences.values())).parent))
    check_unique_cases(sources)
    return sorted(cases, key=lambda c: c.case), left_out


def _read(path: Path, what: str) -> sitk.Image:
    if not path.is_file():
        raise ConversionError(f"{path}: {what} is missing; restore it, or choose the sequences every case has "
                              "with --sequences (e.g. --sequences flair t1ce)")
    try:
        check_complete(path)
        return sitk.ReadImage(str(path))
    except IncompleteFileError as e:
        raise ConversionError(f"{path}: cannot read the {what}: {e.reason}; replace the file or remove the "
                              "case") from None
    except RuntimeError as e:
        raise ConversionError(f"{path}: cannot read the {what} ({str(e).strip().splitlines()[-1]}); "
                              "replace the file or remove the case") from e


def _check_geometry(img: sitk.Image, ref: sitk.Image, path: Path, ref_path: Path) -> None:
    if img.GetSize() != ref.GetSize() or not np.allclose(img.GetSpacing(), ref.GetSpacing(), atol=1e-3):
        raise ConversionError(f"{path}: size {img.GetSize()} spacing {img.GetSpacing()} differs from {ref_path} "
                              f"({ref.GetSize()}, {ref.GetSpacing()}); all files of a case must share one grid")


def _check_labels(seg_arr: np.ndarray, labels: str, path: Path) -> None:
    """Values of a segmentation with ``labels`` "2021", "2023" or "2015" (``LABEL_VALUES``), or an error that says
    which convention the values look like."""
    allowed = LABEL_VALUES[labels]
    values = np.unique(seg_arr)
    bad = [int(v) if float(v).is_integer() else v for v in values.tolist() if v not in allowed]
    if not bad:
        return
    if labels == "2021" and bad == [3]:
        raise ConversionError(
            f"{path}: label 3 found, but BraTS 2021 labels are 0 background, 1 necrosis (NCR), 2 edema (ED), "
            "4 enhancing tumour (ET). BraTS 2023 and later use 3 for the enhancing tumour (and no 4): if these "
            "segmentations use those labels, pass --label_convention 2023 (3 is then read as the enhancing tumour); "
            "the 2023 file names (<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz) are recognised without the flag")
    if labels == "2023" and bad == [4]:
        raise ConversionError(
            f"{path}: label 4 found, but BraTS 2023 labels are 0 background, 1 necrosis (NETC), 2 edema (SNFH), "
            "3 enhancing tumour (ET). If these segmentations use the 2021 labels (4 = enhancing), pass "
            "--label_convention 2021; BraTS 2024 post-treatment data (4 = resection cavity) are not supported")
    raise ConversionError(f"{path}: unexpected label values {bad[:5]} (allowed {sorted(allowed)} for "
                          f"{'BRATS 2013/2015' if labels == '2015' else f'BraTS {labels}'} labels); "
                          "this is not a BraTS segmentation, fix or remove it")


def to_brats2021_labels(seg_arr: np.ndarray, labels: str) -> np.ndarray:
    """BraTS 2021 labels (0/1/2/4) of a segmentation with ``labels`` "2021", "2023" (3 enhancing -> 4) or "2015"
    (3 non-enhancing joins 1 necrosis as NCR/NET, the BraTS 2017+ convention)."""
    if labels == "2023":
        return np.where(seg_arr == 3, 4, seg_arr)
    if labels == "2015":
        return np.where(seg_arr == 3, 1, seg_arr)
    return seg_arr


def _labels_of(c: BratsCase, label_convention: str | None) -> str:
    return "2015" if c.layout == "2015" else label_convention or c.layout


def _write_case(c: BratsCase, out: Path, sequences: tuple[str, ...], labels: str) -> bool:
    """Copy one case into ``out``; returns whether its tumour is empty."""
    s = "Ts" if c.test else "Tr"
    ref_path = c.sequences[sequences[0]]
    ref = _read(ref_path, f"{sequences[0]} image")
    for ch, seq in enumerate(sequences):
        path = c.sequences[seq]
        if not path.name.endswith(".nii.gz"):
            raise ConversionError(f"{path}: expected a .nii.gz file")
        _check_geometry(_read(path, f"{seq} image"), ref, path, ref_path)
        copy_file(path, out / f"images{s}" / f"{c.case}_{ch:04d}.nii.gz")
    if c.seg is None:
        return True
    seg = _read(c.seg, "segmentation")
    _check_geometry(seg, ref, c.seg, ref_path)
    seg_arr = sitk.GetArrayFromImage(seg)
    _check_labels(seg_arr, labels, c.seg)
    src = c.seg
    if labels != "2021":
        relabelled = sitk.GetImageFromArray(to_brats2021_labels(seg_arr, labels).astype(np.uint8))
        relabelled.CopyInformation(seg)
        src = out / f".{c.case}_brats_labels.nii.gz"
        sitk.WriteImage(relabelled, str(src))
    write_atomic(out / f"labels{s}" / f"{c.case}.nii.gz",
                 lambda tmp: copy_BraTS_segmentation_and_convert_labels_to_nnUNet(str(src), str(tmp)))
    if src != c.seg:
        src.unlink()
    return not seg_arr.any()


def convert_brats(input_folder: str | Path, raw_folder: str | Path, dataset_id: int, name: str = "BraTS2021",
                  sequences: tuple[str, ...] = SEQUENCES, overwrite: bool = False, progress: bool = True,
                  label_convention: str | None = None, strict: bool = False) -> Path:
    """Convert the BraTS cases below ``input_folder`` to ``raw_folder/DatasetXXX_NAME``; returns that folder.

    ``label_convention`` ("2021" or "2023") sets the labels of the 2021- and 2023-layout segmentations; default:
    the one their file names imply. What does not fit a layout is named in one warning before anything is written
    (``report_left_out``); ``strict`` refuses instead.
    """
    sequences = tuple(sequences)
    if not sequences or len(set(sequences)) != len(sequences) or set(sequences) - set(SEQUENCES):
        raise ConversionError(f"--sequences {' '.join(sequences)}: choose distinct ones of {' '.join(SEQUENCES)}")
    if label_convention not in (None, "2021", "2023"):
        raise ConversionError(f"--label_convention {label_convention}: choose 2021 (0/1/2/4) or 2023 (0/1/2/3)")
    cases, left_out = find_brats_cases(input_folder, sequences)
    report_left_out(left_out, strict, f"Rename them to a BraTS layout ({_layouts_text()}) if they hold cases")
    no_seg = [c.case for c in cases if c.seg is None]
    if no_seg:
        warn(f"{len(no_seg)} of {len(cases)} case(s) have no segmentation and go to imagesTs without a label: "
             f"{name_list(no_seg)}. Add their segmentation if they should be training cases")
    labels_used = sorted({_labels_of(c, label_convention) for c in cases if c.seg is not None})
    with staged_dataset(raw_folder, dataset_id, name, overwrite) as out:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (out / sub).mkdir()
        n_empty = sum(_write_case(c, out, sequences, _labels_of(c, label_convention))
                      for c in tqdm(cases, desc="BraTS cases", disable=not progress))
        n_train = sum(not c.test for c in cases)
        generate_dataset_json(
            str(out), channel_names={i: CHANNEL_NAMES[s] for i, s in enumerate(sequences)}, labels=dict(LABELS),
            num_training_cases=n_train, file_ending=".nii.gz", regions_class_order=REGIONS_CLASS_ORDER,
            dataset_name=dataset_folder_name(dataset_id, name), converted_by=CONVERTED_BY,
            license="see the source collection (BraTS 2021: Synapse syn25829067; BRATS 2015: CC BY-NC-SA 3.0 CH)",
            reference="https://www.synapse.org/#!Synapse:syn25829067/wiki/610863",
            description="labels as nnU-Net's Dataset137: BraTS 2->1 edema, 1->2 NCR/NET, 4->3 enhancing; "
                        "2015 label 3 (non-enhancing) merged into NCR/NET; 2023 label 3 (enhancing) read as 4",
            arseg_conversion={"input": str(Path(input_folder).resolve()), "sequences": list(sequences),
                              "layouts": sorted({c.layout for c in cases}), "label_conventions": labels_used,
                              "left_out": left_out_record(left_out), "cases_without_seg": no_seg})
    n_test = len(cases) - n_train
    n_test_labelled = sum(c.test and c.seg is not None for c in cases)
    final = Path(raw_folder) / dataset_folder_name(dataset_id, name)
    print(f"Wrote {final}\n  {len(cases)} cases ({', '.join(sorted({c.layout for c in cases}))} layout), "
          f"sequences {' '.join(sequences)}\n  train {n_train}; test {n_test} ({n_test_labelled} with labels)"
          f"\n  cases without tumour or label: {n_empty}")
    return final


def _back_convention(pred_folder: Path) -> str:
    """2023 when the prediction folder's dataset.json (nnU-Net copies it there) says every label was 2023's."""
    try:
        conventions = load_json(str(pred_folder / "dataset.json")).get("arseg_conversion", {}).get("label_conventions")
    except (OSError, ValueError):
        return "2021"
    return "2023" if conventions == ["2023"] else "2021"


def convert_brats_back(pred_folder: str | Path, out_folder: str | Path, overwrite: bool = False,
                       progress: bool = True, label_convention: str | None = None) -> list[Path]:
    """nnU-Net predictions (0..3, ``.nii.gz``) -> BraTS labels in ``out_folder`` (never ``pred_folder``).

    ``label_convention`` "2021" gives 0/1/2/4, "2023" gives 0/1/2/3 (3 = enhancing); default: 2023 when the
    dataset was converted from 2023 labels (``pred_folder/dataset.json``), else 2021.
    """
    pred_folder, out_folder = Path(pred_folder), Path(out_folder)
    files = sorted(pred_folder.glob("*.nii.gz"))
    if not files:
        raise ConversionError(f"no .nii.gz prediction in {pred_folder}; pass nnU-Net's output folder with -i")
    if out_folder.resolve() == pred_folder.resolve():
        raise ConversionError(f"-o {out_folder} is the prediction folder; choose another so the predictions are kept")
    if label_convention not in (None, "2021", "2023"):
        raise ConversionError(f"--label_convention {label_convention}: choose 2021 (0/1/2/4) or 2023 (0/1/2/3)")
    convention = label_convention or _back_convention(pred_folder)
    out_folder.mkdir(parents=True, exist_ok=True)
    existing = [f.name for f in files if (out_folder / f.name).exists()]
    if existing and not overwrite:
        raise ConversionError(f"{out_folder / existing[0]} exists ({len(existing)} file(s)); pass --overwrite")
    written = []
    for f in tqdm(files, desc=f"BraTS {convention} labels", disable=not progress):
        img = _read(f, "prediction")
        arr = sitk.GetArrayFromImage(img)
        bad = sorted(set(np.unique(arr).tolist()) - {0, 1, 2, 3})
        if bad:
            raise ConversionError(f"{f}: values {bad[:5]} are not nnU-Net BraTS labels (0..3); pass the folder of "
                                  "nnU-Net's predictions for a dataset written by nnUNetv2_arseg_convert_brats")
        back_arr = convert_labels_back_to_BraTS(arr)
        if convention == "2023":
            back_arr = np.where(back_arr == 4, 3, back_arr)
        back = sitk.GetImageFromArray(back_arr.astype(np.uint8))
        back.CopyInformation(img)
        write_atomic(out_folder / f.name, lambda tmp: sitk.WriteImage(back, str(tmp)))
        written.append(out_folder / f.name)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = converter_parser("nnUNetv2_arseg_convert_brats", __doc__.split("\n\n")[0],
                              "folder with BraTS case folders (2021, 2023 or 2013/2015 layout)", "BraTS2021")
    parser.add_argument("--sequences", nargs="+", default=list(SEQUENCES), choices=SEQUENCES,
                        help="channels, in this order (default: t1 t1ce t2 flair; 2023 files t1n t1c t2w t2f)")
    parser.add_argument("--label_convention", choices=("2021", "2023"), default=None,
                        help="labels of the segmentations: 2021 (0/1/2/4, 4 = enhancing) or 2023 (0/1/2/3, "
                             "3 = enhancing); default: as the file names imply (<case>_seg: 2021, <case>-seg: 2023)")
    args = parser.parse_args(argv)
    run_converter(parser, args, lambda raw: convert_brats(args.i, raw, args.d, args.n, tuple(args.sequences),
                                                          args.overwrite, progress=not args.disable_progress_bar,
                                                          label_convention=args.label_convention,
                                                          strict=args.strict))


def main_back(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nnUNetv2_arseg_convert_brats_back",
                                     description="nnU-Net BraTS predictions (0..3) -> BraTS labels 0/1/2/4 "
                                                 "(or 0/1/2/3)")
    parser.add_argument("-i", required=True, help="folder with nnU-Net's .nii.gz predictions")
    parser.add_argument("-o", required=True, help="output folder (not the input folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace files already in -o")
    parser.add_argument("--label_convention", choices=("2021", "2023"), default=None,
                        help="2021: 0/1/2/4; 2023: 0/1/2/3 (3 = enhancing); default: 2023 if the dataset was "
                             "converted from 2023 labels (dataset.json in -i), else 2021")
    parser.add_argument("--disable_progress_bar", action="store_true")
    args = parser.parse_args(argv)
    try:
        convert_brats_back(args.i, args.o, args.overwrite, progress=not args.disable_progress_bar,
                           label_convention=args.label_convention)
    except ConversionError as e:
        sys.exit(f"nnUNetv2_arseg_convert_brats_back: error: {e}")


if __name__ == "__main__":
    main()
