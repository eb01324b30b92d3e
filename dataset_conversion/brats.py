"""``nnUNetv2_arseg_convert_brats``: BraTS cases -> nnU-Net's region-based raw dataset, and predictions back.

Labels follow nnU-Net's own ``Dataset137_BraTS21.py`` (its functions do the work): BraTS 1 NCR/NET -> 2,
2 edema -> 1, 4 enhancing -> 3, with the regions whole tumour (1, 2, 3), tumour core (2, 3) and enhancing
tumour (3), ``regions_class_order`` (1, 2, 3). ``convert_brats_back`` (``nnUNetv2_arseg_convert_brats_back``)
maps predictions back to 0/1/2/4.

Layouts:
- BraTS 2021: ``<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz``, labels 0/1/2/4. Cases without ``seg`` become
  test images.
- BRATS 2013/2015 (DeepMedic preprocessing): ``[train|validation|test/]<case>/{T1,T1c,T2,Flair}_subtrMeanDivStd.nii.gz``
  and ``OTMultiClass.nii.gz`` with 0 bg, 1 necrosis, 2 edema, 3 non-enhancing, 4 enhancing. Label 3 is merged
  into label 1 (NCR/NET, tumour core) before the mapping, as BraTS 2017+ merged it, so it cannot be recovered
  by the inverse mapping. ``test/`` cases go to ``imagesTs``/``labelsTs``.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nnunetv2.dataset_conversion.Dataset137_BraTS21 import (convert_labels_back_to_BraTS,
                                                             copy_BraTS_segmentation_and_convert_labels_to_nnUNet)
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
from tqdm import tqdm

from dataset_conversion.raw_dataset import (CONVERTED_BY, ConversionError, check_case_id, check_unique_cases,
                                            converter_parser, copy_file, dataset_folder_name, run_converter,
                                            staged_dataset)
from nnunet_arseg.atomic import write_atomic

SEQUENCES = ("t1", "t1ce", "t2", "flair")  # nnU-Net's Dataset137 channel order
CHANNEL_NAMES = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "Flair"}
FILES_2015 = {"t1": "T1_subtrMeanDivStd.nii.gz", "t1ce": "T1c_subtrMeanDivStd.nii.gz",
              "t2": "T2_subtrMeanDivStd.nii.gz", "flair": "Flair_subtrMeanDivStd.nii.gz", "seg": "OTMultiClass.nii.gz"}
LABELS = {"background": 0, "whole tumor": (1, 2, 3), "tumor core": (2, 3), "enhancing tumor": (3,)}
REGIONS_CLASS_ORDER = (1, 2, 3)
_SPLITS_2015 = {"train": "train", "validation": "train", "val": "train", "test": "test"}


@dataclass(frozen=True)
class BratsCase:
    case: str
    layout: str  # "2021" or "2015"
    sequences: dict[str, Path]  # sequence -> file, for every requested sequence (may not exist)
    seg: Path | None
    test: bool


def _case_2021(folder: Path, sequences: tuple[str, ...]) -> BratsCase:
    seg = folder / f"{folder.name}_seg.nii.gz"
    return BratsCase(check_case_id(folder.name, folder), "2021",
                     {s: folder / f"{folder.name}_{s}.nii.gz" for s in sequences}, seg if seg.is_file() else None,
                     test=not seg.is_file())


def _case_2015(folder: Path, sequences: tuple[str, ...]) -> BratsCase:
    seg = folder / FILES_2015["seg"]
    test = _SPLITS_2015.get(folder.parent.name) == "test" or not seg.is_file()
    return BratsCase(check_case_id(folder.name, folder), "2015", {s: folder / FILES_2015[s] for s in sequences},
                     seg if seg.is_file() else None, test)


def find_brats_cases(root: str | Path, sequences: tuple[str, ...] = SEQUENCES) -> list[BratsCase]:
    """Case folders of either layout directly below ``root`` or below its split folders, sorted by case id."""
    root = Path(root)
    if not root.is_dir():
        raise ConversionError(f"input folder {root} does not exist; pass the folder with the BraTS cases with -i")
    cases = []
    for folder in sorted(p for p in [*root.iterdir(), *(q for d in root.iterdir() if d.is_dir() for q in d.iterdir())]
                         if p.is_dir()):
        if any((folder / f"{folder.name}_{s}.nii.gz").is_file() for s in (*SEQUENCES, "seg")):
            cases.append(_case_2021(folder, sequences))
        elif any((folder / f).is_file() for f in FILES_2015.values()):
            cases.append(_case_2015(folder, sequences))
    if not cases:
        raise ConversionError(f"no BraTS case found in {root}: expected <case>/<case>_{{t1,t1ce,t2,flair,seg}}.nii.gz "
                              "(BraTS 2021) or <case>/Flair_subtrMeanDivStd.nii.gz ... OTMultiClass.nii.gz (2015)")
    sources: dict[str, list[str]] = {}
    for c in cases:
        sources.setdefault(c.case, []).append(str(next(iter(c.sequences.values())).parent))
    check_unique_cases(sources)
    return sorted(cases, key=lambda c: c.case)


def _read(path: Path, what: str) -> sitk.Image:
    if not path.is_file():
        raise ConversionError(f"{path}: {what} is missing; restore it, or choose the sequences every case has "
                              "with --sequences (e.g. --sequences flair t1ce)")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise ConversionError(f"{path}: cannot read the {what} ({str(e).strip().splitlines()[-1]}); "
                              "replace the file or remove the case") from e


def _check_geometry(img: sitk.Image, ref: sitk.Image, path: Path, ref_path: Path) -> None:
    if img.GetSize() != ref.GetSize() or not np.allclose(img.GetSpacing(), ref.GetSpacing(), atol=1e-3):
        raise ConversionError(f"{path}: size {img.GetSize()} spacing {img.GetSpacing()} differs from {ref_path} "
                              f"({ref.GetSize()}, {ref.GetSpacing()}); all files of a case must share one grid")


def _check_labels(seg_arr: np.ndarray, allowed: set[int], path: Path) -> None:
    values = np.unique(seg_arr)
    bad = [int(v) if float(v).is_integer() else v for v in values.tolist() if v not in allowed]
    if bad:
        raise ConversionError(f"{path}: unexpected label values {bad[:5]} (allowed {sorted(allowed)}); "
                              "this is not a BraTS segmentation, fix or remove it")


def _write_case(c: BratsCase, out: Path, sequences: tuple[str, ...]) -> bool:
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
    _check_labels(seg_arr, {0, 1, 2, 4} if c.layout == "2021" else {0, 1, 2, 3, 4}, c.seg)
    src = c.seg
    if c.layout == "2015":  # non-enhancing (3) joins necrosis (1) as NCR/NET, the BraTS 2017+ convention
        merged = sitk.GetImageFromArray(np.where(seg_arr == 3, 1, seg_arr).astype(np.uint8))
        merged.CopyInformation(seg)
        src = out / f".{c.case}_brats_labels.nii.gz"
        sitk.WriteImage(merged, str(src))
    write_atomic(out / f"labels{s}" / f"{c.case}.nii.gz",
                 lambda tmp: copy_BraTS_segmentation_and_convert_labels_to_nnUNet(str(src), str(tmp)))
    if src != c.seg:
        src.unlink()
    return not seg_arr.any()


def convert_brats(input_folder: str | Path, raw_folder: str | Path, dataset_id: int, name: str = "BraTS2021",
                  sequences: tuple[str, ...] = SEQUENCES, overwrite: bool = False, progress: bool = True) -> Path:
    """Convert the BraTS cases below ``input_folder`` to ``raw_folder/DatasetXXX_NAME``; returns that folder."""
    sequences = tuple(sequences)
    if not sequences or len(set(sequences)) != len(sequences) or set(sequences) - set(SEQUENCES):
        raise ConversionError(f"--sequences {' '.join(sequences)}: choose distinct ones of {' '.join(SEQUENCES)}")
    cases = find_brats_cases(input_folder, sequences)
    with staged_dataset(raw_folder, dataset_id, name, overwrite) as out:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (out / sub).mkdir()
        n_empty = sum(_write_case(c, out, sequences) for c in tqdm(cases, desc="BraTS cases", disable=not progress))
        n_train = sum(not c.test for c in cases)
        generate_dataset_json(
            str(out), channel_names={i: CHANNEL_NAMES[s] for i, s in enumerate(sequences)}, labels=dict(LABELS),
            num_training_cases=n_train, file_ending=".nii.gz", regions_class_order=REGIONS_CLASS_ORDER,
            dataset_name=dataset_folder_name(dataset_id, name), converted_by=CONVERTED_BY,
            license="see the source collection (BraTS 2021: Synapse syn25829067; BRATS 2015: CC BY-NC-SA 3.0 CH)",
            reference="https://www.synapse.org/#!Synapse:syn25829067/wiki/610863",
            description="labels as nnU-Net's Dataset137: BraTS 2->1 edema, 1->2 NCR/NET, 4->3 enhancing; "
                        "2015 label 3 (non-enhancing) merged into NCR/NET",
            arseg_conversion={"input": str(Path(input_folder).resolve()), "sequences": list(sequences),
                              "layouts": sorted({c.layout for c in cases})})
    n_test = len(cases) - n_train
    n_test_labelled = sum(c.test and c.seg is not None for c in cases)
    final = Path(raw_folder) / dataset_folder_name(dataset_id, name)
    print(f"Wrote {final}\n  {len(cases)} cases ({', '.join(sorted({c.layout for c in cases}))} layout), "
          f"sequences {' '.join(sequences)}\n  train {n_train}; test {n_test} ({n_test_labelled} with labels)"
          f"\n  cases without tumour or label: {n_empty}")
    return final


def convert_brats_back(pred_folder: str | Path, out_folder: str | Path, overwrite: bool = False,
                       progress: bool = True) -> list[Path]:
    """nnU-Net predictions (0..3, ``.nii.gz``) -> BraTS labels 0/1/2/4 in ``out_folder`` (never ``pred_folder``)."""
    pred_folder, out_folder = Path(pred_folder), Path(out_folder)
    files = sorted(pred_folder.glob("*.nii.gz"))
    if not files:
        raise ConversionError(f"no .nii.gz prediction in {pred_folder}; pass nnU-Net's output folder with -i")
    if out_folder.resolve() == pred_folder.resolve():
        raise ConversionError(f"-o {out_folder} is the prediction folder; choose another so the predictions are kept")
    out_folder.mkdir(parents=True, exist_ok=True)
    existing = [f.name for f in files if (out_folder / f.name).exists()]
    if existing and not overwrite:
        raise ConversionError(f"{out_folder / existing[0]} exists ({len(existing)} file(s)); pass --overwrite")
    written = []
    for f in tqdm(files, desc="BraTS labels", disable=not progress):
        img = _read(f, "prediction")
        arr = sitk.GetArrayFromImage(img)
        _check_labels(arr, {0, 1, 2, 3}, f)
        back = sitk.GetImageFromArray(convert_labels_back_to_BraTS(arr).astype(np.uint8))
        back.CopyInformation(img)
        write_atomic(out_folder / f.name, lambda tmp: sitk.WriteImage(back, str(tmp)))
        written.append(out_folder / f.name)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = converter_parser("nnUNetv2_arseg_convert_brats", __doc__.split("\n\n")[0],
                              "folder with BraTS case folders (2021 or 2013/2015 layout)", "BraTS2021")
    parser.add_argument("--sequences", nargs="+", default=list(SEQUENCES), choices=SEQUENCES,
                        help="channels, in this order (default: t1 t1ce t2 flair)")
    args = parser.parse_args(argv)
    run_converter(parser, args, lambda raw: convert_brats(args.i, raw, args.d, args.n, tuple(args.sequences),
                                                          args.overwrite, progress=not args.disable_progress_bar))


def main_back(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nnUNetv2_arseg_convert_brats_back",
                                     description="nnU-Net BraTS predictions (0..3) -> BraTS labels 0/1/2/4")
    parser.add_argument("-i", required=True, help="folder with nnU-Net's .nii.gz predictions")
    parser.add_argument("-o", required=True, help="output folder (not the input folder)")
    parser.add_argument("--overwrite", action="store_true", help="replace files already in -o")
    parser.add_argument("--disable_progress_bar", action="store_true")
    args = parser.parse_args(argv)
    try:
        convert_brats_back(args.i, args.o, args.overwrite, progress=not args.disable_progress_bar)
    except ConversionError as e:
        sys.exit(f"nnUNetv2_arseg_convert_brats_back: error: {e}")


if __name__ == "__main__":
    main()
