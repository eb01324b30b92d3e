"""Where the evaluator finds things: the raw dataset, sample files, rater files and reference labels of each case.

Layouts (docs/design.md): ``PRED/<case><ext>`` consensus, ``PRED/samples/<case>_sample<k:02d><ext>`` samples (named by
``nnunet_arseg.inference.files``),
``RAW/labelsT{s,r}_raters/<case>_r<k><ext>`` raters, ``RAW/labelsT{s,r}/<case><ext>`` reference labels.
"""
from __future__ import annotations

import re

from batchgenerators.utilities.file_and_folder_operations import isdir, isfile, join, load_json, subfiles

from nnunet_arseg.inference.files import sample_files_by_case


def find_raw_dataset(dataset: str | None = None, raw_folder: str | None = None) -> str:
    """The raw dataset folder from ``-raw FOLDER`` or from ``-d ID_OR_NAME`` (via ``nnUNet_raw``)."""
    if raw_folder is not None:
        if not isfile(join(raw_folder, "dataset.json")):
            raise FileNotFoundError(f"-raw {raw_folder}: no dataset.json there; give the folder of a raw nnU-Net "
                                    f"dataset (the one holding dataset.json, imagesTr, labelsTr)")
        return raw_folder
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    if not nnUNet_raw.is_set():
        raise RuntimeError(f"-d {dataset}: the environment variable nnUNet_raw is not set; set it or give the "
                           f"dataset folder with -raw FOLDER")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError) as e:
        raise RuntimeError(f"-d {dataset}: unknown dataset ({e.__class__.__name__}: {str(e).splitlines()[0]}). "
                           f"Give an existing dataset ID or name under nnUNet_raw={nnUNet_raw.get()}, "
                           f"or the dataset folder with -raw FOLDER") from None
    folder = join(nnUNet_raw.get(), name)
    if not isfile(join(folder, "dataset.json")):
        raise FileNotFoundError(f"-d {dataset}: {folder} has no dataset.json; convert the dataset first "
                                f"(nnUNetv2_arseg_convert_*) or give -raw FOLDER")
    return folder


def load_dataset_json(path_or_dict) -> dict:
    if isinstance(path_or_dict, dict):
        return path_or_dict
    path = join(path_or_dict, "dataset.json") if isdir(path_or_dict) else path_or_dict
    if not isfile(path):
        raise FileNotFoundError(f"{path}: dataset.json not found")
    return load_json(path)


def rater_folders(raw_folder: str, dataset_json: dict) -> list[str]:
    """Existing rater folders named by ``dataset.json["arseg"]``, test folder first; [] without raters."""
    arseg = dataset_json.get("arseg") or {}
    if not arseg.get("num_raters"):
        return []
    names = [arseg.get("test_raters_folder", "labelsTs_raters"), arseg.get("raters_folder", "labelsTr_raters")]
    return [join(raw_folder, n) for n in names if isdir(join(raw_folder, n))]


def _indexed_files(folder: str, file_ending: str, tag: str) -> dict[str, dict[int, str]]:
    out: dict[str, dict[int, str]] = {}
    if not isdir(folder):
        return out
    pattern = re.compile(rf"(.+)_{tag}(\d+)")
    for f in subfiles(folder, suffix=file_ending, join=False, sort=True):
        m = pattern.fullmatch(f[:-len(file_ending)])
        if m:
            out.setdefault(m.group(1), {})[int(m.group(2))] = join(folder, f)
    return out


def _ordered(case: str, files: dict[int, str], what: str, folder: str, file_ending: str, tag: str,
             width: int = 0) -> list[str]:
    expected = list(range(len(files)))
    if sorted(files) != expected:
        missing = sorted(set(range(max(files) + 1)) - set(files))
        raise FileNotFoundError(f"case {case}: {what} files in {folder} are numbered {sorted(files)}; "
                                f"missing {[f'{case}_{tag}{k:0{width}d}{file_ending}' for k in missing]}. "
                                f"They must be numbered 0..K-1 without gaps")
    return [files[k] for k in expected]


def sample_files_per_case(samples_folder: str, file_ending: str) -> dict[str, list[str]]:
    """``{case: [sample file 0, ..., N-1]}`` from ``<case>_sample<k:02d><ext>``."""
    found = sample_files_by_case(samples_folder, file_ending)
    return {c: _ordered(c, f, "sample", samples_folder, file_ending, "sample", 2) for c, f in found.items()}


def rater_files_per_case(folders: list[str], file_ending: str) -> dict[str, list[str]]:
    """``{case: [rater file 0, ..., M-1]}`` from ``<case>_r<k><ext>``; earlier folders win."""
    out: dict[str, list[str]] = {}
    for folder in folders:
        for c, f in _indexed_files(folder, file_ending, "r").items():
            out.setdefault(c, _ordered(c, f, "rater", folder, file_ending, "r"))
    return out


def consensus_cases(pred_folder: str, file_ending: str) -> list[str]:
    """Cases with a consensus prediction ``PRED/<case><ext>``."""
    return [f[:-len(file_ending)] for f in subfiles(pred_folder, suffix=file_ending, join=False, sort=True)]


def reference_file(case: str, reference_folders: list[str], file_ending: str) -> str:
    for folder in reference_folders:
        path = join(folder, case + file_ending)
        if isfile(path):
            return path
    raise FileNotFoundError(f"case {case}: no reference label {case}{file_ending} in "
                            f"{' or '.join(reference_folders)}; give the right label folder with -ref FOLDER")


