"""Where the evaluator finds things: the raw dataset, sample files, rater files and reference labels of each case.

Layouts (docs/design.md): ``PRED/<case><ext>`` consensus, ``PRED/samples/<case>_sample<k:02d><ext>`` samples (named by
``nnunet_arseg.prediction_files``),
``RAW/labelsT{s,r}_raters/<case>_r<k><ext>`` raters (the ones ``dataset.json["arseg"]`` says each case has),
``RAW/labelsT{s,r}/<case><ext>`` reference labels; ``PRED/arseg_predict_args.json`` and ``PRED/arseg_cases/<case>.json``
the settings of the run and of each case.
"""
from __future__ import annotations

import re
from typing import Sequence

from batchgenerators.utilities.file_and_folder_operations import isdir, isfile, join, load_json, subfiles

from nnunet_arseg.config import DEFAULT_NUM_SAMPLES
from nnunet_arseg.prediction_files import ARGS_FILE, case_record_file, sample_files_by_case, settings_changes


_CHANNEL = re.compile(r"_\d{4}$")


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


def samples_per_case(pred_folders: Sequence[str], file_ending: str, num_samples: int | None = None,
                     cases: Sequence[str] | None = None) -> tuple[dict[str, list[str]], dict]:
    """What the N samples of each case are: ``({case: [sample file 0, ..., N-1]}, {"kind", "source", "folders"[,
    "N"]})``.

    One folder with ``samples/``: the samples of ``nnUNetv2_arseg_predict --save_samples``. One folder without: its
    one prediction ``<case><ext>`` per case (``nnUNetv2_predict``), counted as ``num_samples`` (default 16) identical
    samples. Several folders: sample k of a case is ``pred_folders[k]/<case><ext>`` (e.g. the folds of an nnU-Net
    ensemble, each predicted into its own folder); they must hold the same cases (of ``cases``, if given).
    """
    folders = list(pred_folders)
    twice = sorted({f for f in folders if folders.count(f) > 1})
    if twice:
        raise ValueError(f"-i {' '.join(twice)}: given more than once; each folder is one sample of every case")
    if len(folders) == 1:
        samples_folder = join(folders[0], "samples")
        found = sample_files_per_case(samples_folder, file_ending)
        if found:
            return found, {"kind": "samples", "folders": folders,
                           "source": f"the samples of nnUNetv2_arseg_predict --save_samples "
                                     f"({samples_folder}/<case>_sampleNN{file_ending})"}
        n = DEFAULT_NUM_SAMPLES if num_samples is None else num_samples
        return ({c: [join(folders[0], c + file_ending)] * n for c in consensus_cases(folders[0], file_ending)},
                {"kind": "one_prediction", "folders": folders, "N": n,
                 "source": f"one prediction per case ({folders[0]}/<case>{file_ending}, no samples/ folder), "
                           f"counted as N identical samples"})
    case_sets = {f: set(consensus_cases(f, file_ending)) for f in folders}
    common, every = set.intersection(*case_sets.values()), set.union(*case_sets.values())
    scope = every if cases is None else every & set(cases)
    lacking = {f: sorted(scope - c) for f, c in case_sets.items() if scope - c}
    if lacking:
        raise FileNotFoundError(
            f"the {len(folders)} prediction folders (one sample each) hold different cases: "
            f"{'; '.join(f'{f} lacks {_names(m)}' for f, m in lacking.items())}. Every folder needs a prediction "
            f"<case>{file_ending} of each scored case: predict the missing cases into those folders, or name the "
            f"cases to score with -cases")
    return ({c: [join(f, c + file_ending) for f in folders] for c in sorted(common)},
            {"kind": "one_per_folder", "folders": folders, "N": len(folders),
             "source": f"one sample per prediction folder (sample k of a case is FOLDER_k/<case>{file_ending}, "
                       f"e.g. one nnU-Net fold each)"})


def rater_files_per_case(folders: list[str], file_ending: str, dataset_json: dict | None = None
                         ) -> dict[str, list[str]]:
    """``{case: [its M rater files]}`` from ``<case>_r<k><ext>``; earlier folders win.

    With a ``dataset_json`` declaring ``arseg.num_raters`` R, a case must have the raters 0..R-1, or exactly those
    ``arseg.raters_of_case[case]`` lists (a case with fewer raters); without one, 0..M-1 without gaps.
    """
    arseg = (dataset_json or {}).get("arseg") or {}
    out: dict[str, list[str]] = {}
    for folder in folders:
        for c, f in _indexed_files(folder, file_ending, "r").items():
            if c not in out:
                out[c] = (_declared_raters(c, f, arseg, folder, file_ending) if arseg.get("num_raters") else
                          _ordered(c, f, "rater", folder, file_ending, "r"))
    return out


def declared_raters(arseg: dict, case: str) -> list[int]:
    """The rater indices k of ``case`` by ``dataset.json["arseg"]``: those ``raters_of_case[case]`` lists, else
    0..num_raters-1; a clear error for a malformed list."""
    num_raters = int(arseg["num_raters"])
    listed = (arseg.get("raters_of_case") or {}).get(case)
    if listed is None:
        return list(range(num_raters))
    if not listed or len(set(listed)) != len(listed) or not {int(k) for k in listed} <= set(range(num_raters)):
        raise ValueError(f"dataset.json: arseg.raters_of_case[{case!r}] = {listed}: list the raters the case has, "
                         f"each once, as indices in 0..{num_raters - 1} (num_raters = {num_raters}), at least one; "
                         f"fix dataset.json or re-run the converter")
    return sorted(int(k) for k in listed)


def _declared_raters(case: str, files: dict[int, str], arseg: dict, folder: str, file_ending: str) -> list[str]:
    """The rater files of ``case`` that ``dataset.json["arseg"]`` says it has, in rater order."""
    num_raters = int(arseg["num_raters"])
    listed = (arseg.get("raters_of_case") or {}).get(case)
    expected = declared_raters(arseg, case)
    why = (f"dataset.json's arseg.raters_of_case lists raters {expected} for it" if listed is not None else
           f"dataset.json['arseg']['num_raters'] is {num_raters} and arseg.raters_of_case does not list the case")
    missing = [f"{case}_r{k}{file_ending}" for k in expected if k not in files]
    if missing:
        raise FileNotFoundError(f"case {case}: rater files {missing} are missing in {folder} ({why}). Restore them "
                                f"(e.g. convert the dataset again), or list the raters the case has in "
                                f"dataset.json['arseg']['raters_of_case']")
    extra = [files[k] for k in sorted(set(files) - set(expected))]
    if extra:
        raise ValueError(f"case {case}: {extra} are not raters of the case ({why}). Remove them or add their "
                         f"indices to dataset.json['arseg']['raters_of_case'] (num_raters: the most raters any "
                         f"case has)")
    return [files[k] for k in expected]


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


def label_cases(folder: str, file_ending: str) -> set[str]:
    """Cases with a label ``<case><ext>`` in ``folder``."""
    return {f[:-len(file_ending)] for f in subfiles(folder, suffix=file_ending, join=False)} if isdir(folder) else set()


def named_cases(names: Sequence[str], file_ending: str) -> list[str]:
    """Case ids given by the user: the ids, or one folder whose files name them (``<case>_XXXX<ext>`` images,
    ``<case><ext>`` labels or predictions)."""
    if len(names) == 1 and isdir(names[0]):
        ids = {_CHANNEL.sub("", f[:-len(file_ending)]) for f in subfiles(names[0], suffix=file_ending, join=False)}
        if not ids:
            raise FileNotFoundError(f"-cases {names[0]}: no *{file_ending} file there to take the case ids from")
        return sorted(ids)
    return sorted(set(names))


def expected_cases(predicted: set[str], raters_folders: Sequence[str], reference_folders: Sequence[str],
                   file_ending: str) -> tuple[set[str], list[str]]:
    """The cases a prediction folder must cover: every case of each rater or reference folder that holds at least
    one predicted case (as nnU-Net's evaluator requires every reference file to be predicted); and those folders."""
    expected, used = set(), []
    for folder in raters_folders:
        cases = set(_indexed_files(folder, file_ending, "r"))
        if cases & predicted:
            expected |= cases
            used.append(folder)
    for folder in reference_folders:
        cases = label_cases(folder, file_ending)
        if cases & predicted:
            expected |= cases
            used.append(folder)
    return expected, used


def missing_cases(predicted: set[str], expected: set[str], pred_folder: str, source: str,
                  allow_missing: bool = False) -> list[str]:
    """The cases of ``expected`` without a prediction; an error unless ``allow_missing``. ``source`` says where
    ``expected`` comes from, for the message."""
    missing = sorted(expected - predicted)
    if missing and not allow_missing:
        raise FileNotFoundError(
            f"{pred_folder}: {len(missing)} of the {len(expected)} cases of {source} have no prediction: "
            f"{_names(missing)}. Predict them (nnUNetv2_arseg_predict ... --continue_prediction), name the cases to "
            f"score with -cases, or pass --allow_missing to score the {len(expected) - len(missing)} predicted "
            f"cases only")
    return missing


def check_equal_sample_counts(samples_of: dict[str, list[str]], samples_folder: str) -> None:
    """Every case needs the same number of samples N (metrics such as GED depend on N)."""
    counts = {case: len(files) for case, files in samples_of.items()}
    if len(set(counts.values())) <= 1:
        return
    values = sorted(counts.values())
    common = max(set(values), key=values.count)
    odd = sorted(c for c, n in counts.items() if n != common)
    raise ValueError(
        f"{samples_folder}: cases have different numbers of samples: {len(counts) - len(odd)} cases have "
        f"N = {common} but {', '.join(f'{c} has N = {counts[c]}' for c in odd[:8])}"
        f"{f' (and {len(odd) - 8} more)' if len(odd) > 8 else ''}. Every case needs the same N (an interrupted "
        f"prediction?): predict those cases again with the same -num_samples (or delete their files and pass "
        f"--allow_missing)")


def check_against_run_record(pred_folder: str, samples_of: dict[str, list[str]], sample_source: dict) -> dict | None:
    """The samples of a folder of ``nnUNetv2_arseg_predict`` (one with its ``arseg_predict_args.json``) are those of
    its run: there are samples (``--save_samples``), each case has the number the run drew, and each case's record
    has the run's settings. Returns the run's record; a folder without it (``nnUNetv2_predict``'s) is not checked."""
    record_file = join(pred_folder, ARGS_FILE)
    if not isfile(record_file):
        return None
    record = load_json(record_file)
    if sample_source["kind"] == "one_prediction":
        if not record.get("save_samples"):
            raise ValueError(f"{pred_folder} was predicted by nnUNetv2_arseg_predict without --save_samples "
                             f"({record_file}), so it holds one consensus per case and none of its samples: predict "
                             f"again with --save_samples (the same command with --continue_prediction --save_samples "
                             f"adds them to this folder)")
        raise FileNotFoundError(f"{join(pred_folder, 'samples')} is missing although {record_file} says the run "
                                f"wrote samples (--save_samples): predict again (with --continue_prediction the "
                                f"cases without their samples are redone)")
    expected = record.get("samples_per_case")
    odd = sorted(c for c, files in samples_of.items() if expected is not None and len(files) != expected)
    if odd:
        raise ValueError(f"{join(pred_folder, 'samples')}: {record_file} says its run drew {expected} samples per case "
                         f"(num_samples x folds), but {', '.join(f'{c} has {len(samples_of[c])}' for c in odd[:8])}"
                         f"{f' (and {len(odd) - 8} more)' if len(odd) > 8 else ''}: samples of another run are mixed "
                         f"in, or lost. Predict again with nnUNetv2_arseg_predict --replace_outputs (or into an empty "
                         f"folder)")
    for case in sorted(samples_of):
        case_file = case_record_file(pred_folder, case)
        changes = settings_changes(load_json(case_file), record) if isfile(case_file) else []
        if changes:
            raise ValueError(f"case {case}: {case_file} says it was predicted with other settings than {record_file} "
                             f"(case -> folder: {', '.join(changes)}): outputs of two runs are mixed. Predict again "
                             f"with nnUNetv2_arseg_predict --replace_outputs (or into an empty folder)")
    return record


def _names(items: Sequence[str], limit: int = 10) -> str:
    return ", ".join(items[:limit]) + (f", ... (and {len(items) - limit} more)" if len(items) > limit else "")
